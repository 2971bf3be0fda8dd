"""python -m clip_jax.ingest FORMAT SOURCE --out DIR [options] [--runner=beam [-- BEAM OPTIONS]]:
the command line of `clip_jax.data.ingest` (which documents the formats, options and skip
reasons) and of its Apache Beam driver `clip_jax.data.ingest_beam`."""
import argparse
import os
import sys

from clip_jax import cli
from clip_jax.data import images, ingest, records
from clip_jax.data import spec as spec_lib


def _common_options():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, metavar="DIR",
                        help="output folder for the shards, skipped.jsonl and manifest.json "
                             "(created if missing)")
    common.add_argument("--max-size", type=int, default=256, metavar="PIXELS",
                        help="shrink images so that their short side is at most this; smaller "
                             "images are never enlarged (default: %(default)s)")
    common.add_argument("--min-size", type=int, default=images.DEFAULT_MIN_SIZE, metavar="PIXELS",
                        help="skip images whose short side is smaller (default: %(default)s)")
    common.add_argument("--max-pixels", type=int, default=images.DEFAULT_MAX_PIXELS, metavar="N",
                        help="skip images with more pixels, e.g. decompression bombs; only the "
                             "header is read (default: %(default)s)")
    common.add_argument("--max-bytes", type=int, default=images.DEFAULT_MAX_BYTES, metavar="N",
                        help="skip files larger than this (image files, caption files, wds "
                             "members, TFDS images), unread; FIFOs and devices are always "
                             "skipped "
                             "(default: %(default)s, 64 MiB)")
    common.add_argument("--quality", type=int, default=95, metavar="Q",
                        help="JPEG quality of the stored images, 1-100 (default: %(default)s)")
    common.add_argument("--records-per-shard", type=int, default=5000, metavar="N",
                        help="records per ArrayRecord shard (default: %(default)s)")
    common.add_argument("--workers", type=int, default=os.cpu_count(), metavar="N",
                        help="processes that decode and encode images; 0 works in this process "
                             "(default: the number of CPUs, %(default)s)")
    common.add_argument("--overwrite", action="store_true",
                        help="replace an earlier ingest in --out (only its manifest.json, "
                             "data-*.array_record and skipped.jsonl are removed); without it "
                             "such a folder is refused")
    common.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar on stderr (default: on)")
    common.add_argument("--runner", choices=ingest.RUNNERS, default="local",
                        help="local: this machine's --workers processes; beam: an Apache Beam "
                             "pipeline (pip install -e '.[beam]'), with Beam's own options after "
                             "'--', e.g. -- --runner=DataflowRunner --project=P --region=R "
                             "--temp_location=gs://B/tmp (default: Beam's DirectRunner); both "
                             "write the same output (default: %(default)s)")
    return common


def _templates_option(parser):
    parser.add_argument("--templates", metavar="FILE",
                        help="prompt templates, one per line, each with {} for the class name "
                             "(default: the built-in set of clip_jax.data.prompts)")


def build_parser():
    common = _common_options()
    parser = argparse.ArgumentParser(prog="python -m clip_jax.ingest",
                                     description=ingest.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT",
                                    title="formats (FORMAT --help for its options)")

    def add(name, help, source_help, nargs=None):
        sub = formats.add_parser(name, parents=[common], help=help, description=help)
        sub.add_argument("source", metavar="SOURCE", nargs=nargs, help=source_help)
        return sub

    csv_parser = add("csv", "a CSV or TSV file with a header: image path and caption columns; "
                            "the other columns are kept as metadata",
                     "the CSV file; relative image paths are resolved against its folder")
    csv_parser.add_argument("--image-column", default="filepath", metavar="NAME",
                            help="column holding the image path (default: %(default)s)")
    csv_parser.add_argument("--caption-column", default="caption", metavar="NAME",
                            help="column holding the caption (default: %(default)s)")
    csv_parser.add_argument("--delimiter", metavar="CHAR",
                            help=r"field separator; \t for tab (default: tab for a .tsv file, "
                                 "else comma)")

    add("captions", "a folder tree of images, each with a caption in a .txt file of the same "
                    "stem (cat.jpg + cat.txt)", "the top folder")

    imagefolder = add("imagefolder", "SOURCE/<class>/<images>: captions from the class folder "
                                     "names through prompt templates; records get labels",
                      "the folder holding one sub-folder per class")
    _templates_option(imagefolder)

    add("wds", "WebDataset tar shards (samples of <key>.jpg + <key>.txt)",
        "shard paths, globs or brace ranges such as 'shards-{00000..00099}.tar' "
        "(quote them for the shell)", nargs="+")

    tfds = add("tfds", "a TFDS dataset prepared on local disk in the array_record file format",
               "dataset name, or name:version")
    # No argparse default: the split's default is the data spec grammar's (spec.TRAIN_SPLIT).
    tfds.add_argument("--split", help=f"split to read (default: {spec_lib.TRAIN_SPLIT})")
    tfds.add_argument("--data-dir", metavar="DIR",
                      help="TFDS data folder (default: TFDS's own, ~/tensorflow_datasets)")
    tfds.add_argument("--image-key", default="image", metavar="FEATURE",
                      help="the Image feature (default: %(default)s)")
    captions = tfds.add_mutually_exclusive_group()
    captions.add_argument("--caption-key", metavar="FEATURE",
                          help="the Text feature holding the caption (default: caption)")
    captions.add_argument("--label-key", metavar="FEATURE",
                          help="a ClassLabel feature: captions from its class names through "
                               "the prompt templates, and records get labels")
    _templates_option(tfds)
    return parser


def summary(manifest):
    skipped = manifest["skipped"]
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items())
    return (f"{manifest['num_records']} records from {manifest['rows']} rows in "
            f"{len(manifest['shards'])} shards; skipped {sum(skipped.values())}"
            + (f" ({reasons})" if reasons else ""))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    beam_args = []
    if "--" in argv:                       # Beam's own options follow '--'
        at = argv.index("--")
        argv, beam_args = argv[:at], argv[at + 1:]
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    if beam_args and options["runner"] != "beam":
        parser.error(f"options after '--' are Beam's and need --runner=beam: {' '.join(beam_args)}")
    format, source, out = options.pop("format"), options.pop("source"), options.pop("out")
    with cli.stop_on(ingest.OptionError):
        manifest = ingest.run(format, source, out, beam_args=beam_args, **options)
    print(summary(manifest))
    print(f"manifest: {os.path.join(out, records.MANIFEST)}")


if __name__ == "__main__":
    main()
