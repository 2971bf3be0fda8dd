"""The ingest as an Apache Beam pipeline: `python -m clip_jax.ingest ... --runner=beam`.

The same ingest as `clip_jax.data.ingest` (the same readers, the same `process_chunk` of
`ingest_rows.py` for every row, the same record encoding), driven by Beam instead of one
machine's process pool, so that it scales out on Dataflow, Flink or Spark. Its output is
the local ingest's, byte for byte, whatever the runner and its number of workers: the
same shards holding the same records in the same order, the same `skipped.jsonl` lines
and the same manifest.

The pipeline:
1. `read`: one element per part of the input (`Prepared.parts`: a wds shard, a range of
   TFDS examples, the whole listing of a csv/captions/imagefolder input); a worker reads
   the part's rows (light descriptions, or a tar member's bytes) and numbers them.
2. `Reshuffle`, then rows in batches of `CHUNK_ROWS` through `process_chunk` on any
   worker: read, check, convert, resize, encode; a bad row becomes a skip.
3. The results grouped by block (`BLOCK_ROWS` consecutive rows of a part) and sorted; the
   blocks' row and record counts, summed in input order, give every row its input row
   number and every record its position in the dataset.
4. Records grouped by output shard (`position // records_per_shard`), sorted, and written
   as `data-NNNNN.array_record`; the skipped rows sorted into `skipped.jsonl`; last, once
   both are written, `manifest.json`.

Memory per worker is bounded by a block's results (`BLOCK_ROWS` records) and by an output
shard's records (`--records-per-shard`). Writing shards ourselves, rather than with
array_record's Beam sink (`array_record.beam`), is what keeps the output identical to the
local ingest's: the sink chooses its own record-to-file assignment and file names.

Runner options follow `--`: `python -m clip_jax.ingest wds 'shards-{0000..0999}.tar'
--out gs://bucket/ingested --runner=beam -- --runner=DataflowRunner --project=P
--region=R --temp_location=gs://bucket/tmp` (the default runner is Beam's DirectRunner).
"""
import collections
import json

from clip_jax import paths
from clip_jax.data import ingest_rows, records

BLOCK_ROWS = 1000      # rows of a part grouped together to number them (a worker's memory)


def _read_part(numbered_part):
    part_number, part = numbered_part
    for index, row in enumerate(part()):
        yield (part_number, index // BLOCK_ROWS), row._replace(index=index)


def _process(keyed_rows, settings):
    rows = [row for _, row in keyed_rows]
    for (block, _), result in zip(keyed_rows, ingest_rows.process_chunk(rows, settings)):
        yield block, result


def _block_counts(block):
    """(block, (rows, records, repairs of its records))."""
    key, results = block
    kept = [r for r in results if r.record is not None]
    return key, (len(results), len(kept), collections.Counter(x for r in kept for x in r.repairs))


def _offsets(counts):
    """{block: (rows before it, records before it)} in input order."""
    offsets, rows, kept = {}, 0, 0
    for key in sorted(counts):
        offsets[key] = (rows, kept)
        rows, kept = rows + counts[key][0], kept + counts[key][1]
    return offsets


def _totals(counts):
    """(rows, repairs) over every block."""
    rows, repaired = 0, collections.Counter()
    for block_rows, _, block_repaired in counts:
        rows += block_rows
        repaired.update(block_repaired)
    return rows, repaired


def _place(block, offsets, records_per_shard):
    """A block's results with their input row numbers: ('record', shard, (position, bytes))
    or ('skipped', row, result)."""
    key, results = block
    row, position = offsets[key]
    for result in sorted(results, key=lambda r: r.index):
        if result.record is not None:
            yield "record", position // records_per_shard, (position, result.record)
            position += 1
        else:
            yield "skipped", row, result
        row += 1


def _write_shard(shard, out):
    """Writes one output shard's records, in order, into `out` (which may be remote: then
    through a local file, `paths.staged`); returns its manifest entry."""
    from array_record.python.array_record_module import ArrayRecordWriter
    number, placed = shard
    placed = sorted(placed, key=lambda p: p[0])
    name = records.shard_name(number)
    with paths.staged(paths.join(out, name)) as local:
        writer = ArrayRecordWriter(local, "group_size:1")
        for _, record in placed:
            writer.write(record)
        writer.close()
    return {"path": name, "num_records": len(placed)}


def _write_skipped(skipped, out):
    lines = [json.dumps({"row": row, "source": r.source, "reason": r.skip[0], "detail": r.skip[1]})
             + "\n" for row, r in sorted(skipped, key=lambda s: s[0])]
    paths.write_text(paths.join(out, records.SKIPPED_LOG), "".join(lines))
    return collections.Counter(r.skip[0] for _, r in skipped)


def _finish(_, out, shards, skipped, totals, manifest_fields):
    rows, repaired = totals
    counts = {"num_records": rows - sum(skipped.values()), "rows": rows,
              "shards": sorted(shards, key=lambda s: s["path"]),
              "skipped": dict(sorted(skipped.items())), "repaired": dict(sorted(repaired.items()))}
    records.write_manifest(out, {**counts, **manifest_fields})


def run(prepared, out, settings, records_per_shard, manifest_fields, beam_args=()):
    """Runs the Beam pipeline over `prepared` (an `ingest_rows.Prepared`), writing into `out`
    (already checked and cleared by `ingest.run`). `beam_args`: Beam's own options."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    AsSingleton = beam.pvalue.AsSingleton

    with beam.Pipeline(options=PipelineOptions(list(beam_args))) as p:
        results = (p | "parts" >> beam.Create(list(enumerate(prepared.parts)))
                   | "read" >> beam.FlatMap(_read_part)
                   | "spread" >> beam.Reshuffle()
                   | "batch" >> beam.BatchElements(min_batch_size=1,
                                                   max_batch_size=ingest_rows.CHUNK_ROWS)
                   | "process" >> beam.FlatMap(_process, settings))
        blocks = results | "by block" >> beam.GroupByKey()
        counts = blocks | "count" >> beam.Map(_block_counts)
        offsets = counts | "all counts" >> beam.combiners.ToDict() | "offsets" >> beam.Map(_offsets)
        totals = (counts | "counts" >> beam.Values() | "all" >> beam.combiners.ToList()
                  | "totals" >> beam.Map(_totals))
        placed = blocks | "place" >> beam.FlatMap(_place, AsSingleton(offsets), records_per_shard)
        shards = (placed | "kept" >> beam.Filter(lambda p: p[0] == "record")
                  | "key shard" >> beam.Map(lambda p: (p[1], p[2]))
                  | "by shard" >> beam.GroupByKey()
                  | "write shards" >> beam.Map(_write_shard, out))
        skipped = (placed | "skipped" >> beam.Filter(lambda p: p[0] == "skipped")
                   | "row" >> beam.Map(lambda p: (p[1], p[2]))
                   | "all skipped" >> beam.combiners.ToList()
                   | "write skipped" >> beam.Map(_write_skipped, out))
        _ = (p | "once" >> beam.Create([None])
             | "manifest" >> beam.Map(_finish, out, beam.pvalue.AsList(shards),
                                      AsSingleton(skipped), AsSingleton(totals), manifest_fields))
    return records.read_manifest(out)
