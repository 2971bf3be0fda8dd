"""Benchmarks: `python -m clip_jax.benchmark [MODE] --config=configs/X.py [options]`.

A tool over the library, not part of it: nothing in training, evaluation or inference
imports this package (tests/test_imports.py). It lives inside clip_jax, rather than beside
the scripts in benchmarks/, so that the command works from an installed package on a pod.
One module per mode (train, data, evaluate, checkpoint, loss), `timing` for the one timing
loop every mode and script uses, `photos` for the one generated photo corpus; `__main__`
is the command line.

  train (default)  compiles the real train step of the config and times --steps steps on a
                   device-resident batch after --warmup steps (blocking on each step's
                   result), --repeats times. Reports samples/s, step times (median/min/max),
                   the FLOP/s executed (XLA's cost analysis of the step, recomputed forward
                   passes included), the model's FLOP/s (the step without rematerialisation,
                   plain model code; both `cost.step_flops`, towers unrolled) and
                   MFU = model FLOP/s / (peak x devices), the peak
                   per device given by --peak_tflops, else the data sheet's dense bfloat16
                   peak on an H100/H200/A100/B200 (SXM), else measured here: the best rate
                   of square matmuls of several sizes in the compute dtype
                   (`measure_peak_tflops`); HFU uses executed FLOPs.
  data             times the input pipeline alone: this process's host batches (read,
                   decode, crop, tokenise) for `--source` (default: the config's
                   data.source), with each worker count in --workers. Reports images/s,
                   and images/s per core (in this process) with the pipeline's JPEG decoder
                   (simplejpeg) and with PIL alone, in alternating windows.
  evaluate         evaluation throughput of the config's model (randomly initialised) on
                   --source (an ImageFolder, ingested directory or CSV; default:
                   --images generated 500x375 JPEGs): image features from the files end to
                   end, decoding + centre crop alone, the image tower alone, and prompt
                   texts through the text tower. Reports images/s and texts/s. Then the
                   linear probe's JAX solver: seconds per L-BFGS iteration on --probe_rows x
                   --probe_dim random features of --probe_classes classes (scikit-learn's
                   beside it), and the estimate for ImageNet-1k's 1.28M training images.
  checkpoint       saves the config's freshly initialised train state --repeats times into
                   --checkpoint_dir (default: a temporary directory) and restores it
                   (optimiser moments filled with random values, like a trained state's).
                   Reports the blocking part of a save (what training waits for), the
                   whole save, the restore (with its checksum verification), and the size.
  loss             compiled memory per device of each contrastive loss + its backward
                   (--losses; the embeddings, scale and bias only: no towers) at each global
                   batch in --global_batches (--embed_dim, float32), compiled ahead of time
                   from shapes (nothing runs), and the largest global batch whose peak fits
                   in --budget_gib per device. Peak = XLA's argument + output + temp bytes
                   of the compiled program (`compiled.memory_analysis()`). The batch is split
                   over all devices JAX sees; the config is not used. For N simulated
                   devices on a CPU machine, start it with
                   XLA_FLAGS=--xla_force_host_platform_device_count=N in the environment.

Figures are medians over --repeats timing windows; with --json the last line printed is
one JSON object holding them (`samples_per_sec` for train, `images_per_sec` per worker
count for data). The config's keys can be overridden as in training
(`--config.batch_size=32`).
"""
