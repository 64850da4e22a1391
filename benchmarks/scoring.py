r"""Scoring throughput of a checkpoint: the predict command and QualityModel.score against
one image at a time, and the work apart.

    python -m benchmarks.scoring --checkpoint runs/demo       # 200 generated 1024x768 JPEGs
    python -m benchmarks.scoring --checkpoint runs/tiny --images /data/photos --json out.json

Images: --num_images generated JPEGs of --image_size (benchmarks.input_pipeline's), or
the first --num_images files of --images DIR. Rows (images, seconds, images/s):

- predict_cli: `python -m hyperiqa_jax.predict` in a child process, end to end (start,
  imports, restore, compilation, decoding, scoring, CSV), with the time to its first
  CSV row and its rate after the first batch;
- quality_model: QualityModel.score in this process (loading, first call apart);
- jax_per_image: one image at a time, as pyiqa scores a folder: decode and crop a
  file, one call on its crops, read the score back;
- decode_only; model_only_one_image, model_only_batched: the model alone on crops in
  memory (of the first WORK_IMAGES images), one image's crops or --batch_size rows
  per call.

Each row runs whole passes over the images, after a warm-up, for --min_seconds.
Ratios: each scorer over jax_per_image; the ceiling, the model alone at its best over
jax_per_image (no scorer of these crops beats it on this machine); batched over one
image per call. Agreement: each scorer's largest |score difference| from
jax_per_image (the CSV has 4 decimals). Scores are in the checkpoint's label units.
Comparisons with the PyTorch reference: benchmarks.throughput --vs.
"""

import csv
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from benchmarks import throughput
from hyperiqa_jax.errors import ConfigError

WORK_IMAGES = 8  # images whose crops are held in memory to time the model alone
# CSV rows of the predict command that arrive this close together left the model in one
# batch (it writes a batch's rows at once).
SAME_BATCH_S = 0.005
LABELS = {"predict_cli": "predict CLI (end to end)", "quality_model": "QualityModel.score",
          "jax_per_image": "JAX, one image at a time", "decode_only": "decode and crop only",
          "model_only_one_image": "model only, one image per call",
          "model_only_batched": "model only, batch_size rows per call"}


def define_flags(flag_values=None):
    """The command's flags (absl), on `flag_values` (default: the global FLAGS)."""
    fv = dict(flag_values=flag_values) if flag_values is not None else {}
    flags.DEFINE_string("checkpoint", None, "Training workdir (its best checkpoint), best/ or "
                        "a step folder.", **fv)
    flags.DEFINE_string("images", None, "Score the image files of this folder instead of "
                        "generated JPEGs.", **fv)
    flags.DEFINE_integer("num_images", 200, "Images to score (with --images: at most).", **fv)
    flags.DEFINE_string("image_size", "1024x768", "WIDTHxHEIGHT of the generated JPEGs.", **fv)
    flags.DEFINE_integer("batch_size", 64, "Crops per model call of predict and "
                         "QualityModel.score, and of the batched model-only row.", **fv)
    flags.DEFINE_float("min_seconds", 10.0, "Time each row over whole passes until at least "
                       "this long.", **fv)
    flags.DEFINE_bool("predict_cli", True, "Time the predict command (--nopredict_cli: skip).",
                      **fv)
    flags.DEFINE_string("json", None, "Also write every number to this JSON file.", **fv)


def timed_passes(score_all, count, min_seconds):
    """Calls score_all() (one pass over `count` images) until `min_seconds` have passed;
    (the row, the first pass's scores)."""
    seconds, first = [], None
    while not seconds or sum(seconds) < min_seconds:
        start = time.perf_counter()
        scores = score_all()
        seconds.append(time.perf_counter() - start)
        first = scores if first is None else first
    row = {"images": count * len(seconds), "seconds": sum(seconds),
           "images_per_s": count * len(seconds) / sum(seconds), "passes": len(seconds)}
    return row, np.asarray(first, np.float64)


def scorer_row(score_paths, paths, min_seconds):
    """The row of a scorer, a callable from a list of paths to their scores: its first call
    on one image (compilation), then passes over `paths`; (the row, the scores).

    Another scorer (an exported model, say) is one more entry of in_process_scorers.
    """
    start = time.perf_counter()
    score_paths(paths[:1])
    warmup_s = time.perf_counter() - start
    row, scores = timed_passes(lambda: score_paths(paths), len(paths), min_seconds)
    return {**row, "warmup_s": warmup_s}, scores


def in_process_scorers(model, forward) -> dict:
    """Name -> scorer (see scorer_row) of the in-process rows; QualityModel.score first."""
    def one_at_a_time(paths):
        return [np.mean(np.asarray(forward(model.variables, model.crops(p)), np.float64))
                for p in paths]

    return {"quality_model": model.score, "jax_per_image": one_at_a_time}


def work_rows(model, forward, paths, batch_size, min_seconds) -> dict:
    """Decoding and cropping alone, and the model alone on crops held in memory."""
    rows = {"decode_only": timed_passes(lambda: [model.crops(p) for p in paths], len(paths),
                                        min_seconds)[0]}
    held = [model.crops(p) for p in paths[:WORK_IMAGES]]
    rows["model_only_one_image"] = timed_passes(
        lambda: [np.asarray(forward(model.variables, x)) for x in held], len(held),
        min_seconds)[0]
    batch = np.concatenate(held * -(-batch_size // sum(map(len, held))))[:batch_size]
    np.asarray(forward(model.variables, batch))  # compiles the batch's shape
    rows["model_only_batched"] = timed_passes(
        lambda: np.asarray(forward(model.variables, batch)), batch_size / model.num_crops,
        min_seconds)[0]
    return rows


def run_predict_cli(checkpoint, paths, batch_size, repeats):
    """The predict command on `paths` given `repeats` times; (the row, pass 1's scores).

    Its CSV comes unbuffered, each line time-stamped on arrival: the first row's
    time is start-up, restore, compilation and the first batch.
    """
    command = [sys.executable, "-m", "hyperiqa_jax.predict", "--checkpoint", str(checkpoint),
               "--batch_size", str(batch_size), *map(str, paths * repeats)]
    stamps, lines = [], []
    with tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        with subprocess.Popen(command, cwd=throughput.REPO, stdout=subprocess.PIPE,
                              stderr=stderr, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED="1")) as proc:
            for line in proc.stdout:
                stamps.append(time.perf_counter() - start)
                lines.append(line)
        wall = time.perf_counter() - start
        stderr.seek(0)
        rows = list(csv.DictReader(lines))
        if proc.returncode or len(rows) != len(paths) * repeats:
            raise RuntimeError(f"the predict command failed (status {proc.returncode}, "
                               f"{len(rows)} rows):\n{stderr.read()[-3000:]}")
    first = stamps[1]  # after the header
    in_first = sum(t - first <= SAME_BATCH_S for t in stamps[1:])
    after = (len(rows) - in_first) / (stamps[-1] - first) if len(rows) > in_first else None
    row = {"images": len(rows), "seconds": wall, "images_per_s": len(rows) / wall,
           "passes": repeats, "time_to_first_score_s": first, "images_in_first_batch": in_first,
           "after_first_batch_images_per_s": after,
           "command": shlex.join(["python", *command[1:7]]) + " FILES"}
    return row, np.array([float(r["score"] or "nan") for r in rows[:len(paths)]])


def predict_cli_row(checkpoint, paths, batch_size, min_seconds):
    """run_predict_cli once, then again with the files repeated to last `min_seconds`."""
    row, scores = run_predict_cli(checkpoint, paths, batch_size, 1)
    if row["seconds"] < min_seconds:
        repeats = math.ceil(min_seconds / row["seconds"]) + 1
        row = run_predict_cli(checkpoint, paths, batch_size, repeats)[0]
    return row, scores


def benchmark(args, paths) -> dict:
    """Every row, ratio and score difference (the JSON)."""
    import jax

    from hyperiqa_jax.scoring import QualityModel, predict_scores

    runs, scores = {}, {}
    if args.predict_cli:  # first: this process holds no device memory yet
        runs["predict_cli"], scores["predict_cli"] = predict_cli_row(
            args.checkpoint, paths, args.batch_size, args.min_seconds)
        print(f"predict CLI: {runs['predict_cli']['images_per_s']:.2f} images/s", flush=True)
    start = time.perf_counter()
    model = QualityModel.from_checkpoint(args.checkpoint, batch_size=args.batch_size)
    load_s = time.perf_counter() - start
    forward = jax.jit(lambda v, x: predict_scores(model.model, v, x, model.label_stats)[0])
    for name, score_paths in in_process_scorers(model, forward).items():
        runs[name], scores[name] = scorer_row(score_paths, paths, args.min_seconds)
        print(f"{LABELS[name]}: {runs[name]['images_per_s']:.2f} images/s", flush=True)
    runs["quality_model"]["load_s"] = load_s
    runs.update(work_rows(model, forward, paths, args.batch_size, args.min_seconds))

    rate = {name: run["images_per_s"] for name, run in runs.items()}
    loop = rate["jax_per_image"]
    ratios = {f"{name}_vs_jax_per_image": rate[name] / loop for name in scores
              if name != "jax_per_image"}
    ratios["ceiling_vs_jax_per_image"] = max(rate["model_only_one_image"],
                                             rate["model_only_batched"]) / loop
    ratios["model_batched_vs_one_image"] = (rate["model_only_batched"] /
                                            rate["model_only_one_image"])
    differences = {f"max_abs_diff_{name}_vs_jax_per_image":
                   float(np.max(np.abs(s - scores["jax_per_image"])))
                   for name, s in scores.items() if name != "jax_per_image"}
    return {"command": throughput.command_line("benchmarks.scoring", args),
            "environment": throughput.environment(),
            "settings": {"num_images": len(paths), "checkpoint": str(args.checkpoint),
                         "crop_size": model.crop_size, "num_crops": model.num_crops,
                         "protocol": model.protocol, "batch_size": model.batch_size,
                         "label_mean_std": list(model.label_stats),
                         "min_seconds": args.min_seconds},
            "runs": runs, "ratios": ratios,
            "scores": {**differences, "paths": list(map(str, paths)),
                       "per_image": {name: s.tolist() for name, s in scores.items()}}}


def start_up(name, run) -> str:
    """What a row took before its timed passes (in its seconds only end to end)."""
    if name == "predict_cli":
        after = run["after_first_batch_images_per_s"]
        return (f"first score after {run['time_to_first_score_s']:.1f} s"
                + (f", then {after:.2f} images/s" if after else ""))
    if name == "quality_model":
        return f"load {run['load_s']:.1f} s, first call {run['warmup_s']:.1f} s"
    return f"first image {run['warmup_s']:.1f} s" if "warmup_s" in run else ""


def format_table(result) -> str:
    s, env = result["settings"], result["environment"]
    lines = [f"{s['num_images']} images, {s['num_crops']} {s['protocol']} crops of "
             f"{s['crop_size']} px, batch {s['batch_size']}, {env['device']}, "
             f"{env['cpu_count']} CPUs", f"{'row':<38}{'images':>8}{'seconds':>9}"
             f"{'images/s':>10}  start-up (outside images/s unless end to end)"]
    for name, label in LABELS.items():
        run = result["runs"].get(name)
        if run is None:
            continue
        lines.append(f"{label:<38}{run['images']:>8.0f}{run['seconds']:>9.2f}"
                     f"{run['images_per_s']:>10.2f}  {start_up(name, run)}".rstrip())
    lines += ["ratios (images/s):"] + [f"  {k:<40}{v:7.2f}" for k, v in result["ratios"].items()]
    lines += ["largest |score difference|:"] + [
        f"  {k:<50}{v:.2e}" for k, v in result["scores"].items() if k.startswith("max_abs")]
    return "\n".join(lines)


def image_paths(args, folder):
    """The files to score: the first --num_images of --images, or generated JPEGs."""
    from benchmarks.input_pipeline import make_jpegs
    from hyperiqa_jax import predict

    if args.images:
        paths = predict.expand_paths([args.images])[:args.num_images]
        if not paths:
            raise ConfigError(f"--images {args.images}: no image files there")
        return paths
    try:
        width, height = (int(x) for x in args.image_size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--image_size {args.image_size}: give WIDTHxHEIGHT, e.g. "
                          "1024x768") from None
    return make_jpegs(folder, args.num_images, width, height)


def main(argv, flag_values=None) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flag_values if flag_values is not None else flags.FLAGS
    if not args.checkpoint:
        raise app.UsageError("--checkpoint is required (a training workdir)")
    if args.num_images < 1 or args.batch_size < 1:
        raise ConfigError("--num_images and --batch_size must be at least 1")
    if not os.path.exists(args.checkpoint):
        raise ConfigError(f"--checkpoint {args.checkpoint}: no such training workdir")
    if args.images and not os.path.isdir(args.images):
        raise ConfigError(f"--images {args.images}: not a folder")
    with tempfile.TemporaryDirectory(prefix="scoring_bench_") as folder:
        result = benchmark(args, image_paths(args, folder))
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    ratio = result["ratios"]["quality_model_vs_jax_per_image"]
    print(f"QualityModel.score: {ratio:.2f}x the one-image loop's images/s"
          + (f"; wrote {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    from hyperiqa_jax import cli

    cli.run(main, define_flags=define_flags)
