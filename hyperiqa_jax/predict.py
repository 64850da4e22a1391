r"""Scores image files with a trained checkpoint; writes CSV `path,score,error`.

    python -m hyperiqa_jax.predict --checkpoint runs/demo [--output scores.csv] \
        [--report report.html] photo.jpg folder/ 'shots/*.png'

Scores are on the training labels' scale, higher = better quality (KonIQ-10k
MOS: 0-100; the demo model's SSIM x 100: 0-100). Each image's score is the mean
over crops on a fixed grid (deterministic; --protocol/--num_crops change it),
after the resize the model was trained with, so any image size works.

Paths may be files, folders (searched recursively for image files) or glob
patterns. A file that cannot be read gets an empty score and its error in the
CSV; the run goes on. `--report report.html` also writes a self-contained HTML
page: a thumbnail, score and path of every scored image, best first, and the
files that failed with their error (hyperiqa_jax/report.py).

Exit status: 0 when every file was scored, 1 if any file failed, 2 for a usage
error (no checkpoint there, no image files found, an output folder missing).
"""

import csv
import glob
import os
import sys

from absl import app, flags

from hyperiqa_jax.errors import ConfigError, UserError
from hyperiqa_jax.logs import quiet_library_logs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm",
                    ".pgm")


def define_flags():
    """Command-line flags (defined only when run as a program)."""
    flags.DEFINE_string(
        "checkpoint", None, "Training workdir (uses its best checkpoint), best/ or a step folder.")
    flags.DEFINE_string("output", None, "CSV file to write (default: standard output).")
    flags.DEFINE_integer("batch_size", 64, "Crops per forward call, split over all local "
                         "devices (not per device); crops of several images are mixed, the last "
                         "call is padded. Rounded up to a multiple of the local device count.")
    flags.DEFINE_enum("protocol", "grid", ["grid", "center", "random"],
                      "Crop placement: fixed grid (default), one centre crop, or "
                      "seeded random crops.")
    flags.DEFINE_integer("num_crops", None, "Crops per image (default: the run's "
                         "data.test_crops).")
    flags.DEFINE_string("report", None, "Also write a self-contained HTML page of the scored "
                        "images (thumbnails, best first) and the failed files to this file.")


def expand_paths(patterns):
    """Files, folders (recursive, image extensions) and globs -> list of paths, in order.

    A pattern that matches nothing is kept as is, so it is reported as an error.
    """
    out = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = []
            for root, dirs, files in os.walk(pattern):
                dirs.sort()
                found += [os.path.join(root, f) for f in sorted(files)
                          if f.lower().endswith(IMAGE_EXTENSIONS)]
            out += found
        elif os.path.exists(pattern):
            out.append(pattern)
        elif glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            out += matches or [pattern]
        else:
            out.append(pattern)
    return out


def predict_files(model, paths, writer, progress=True, results=None):
    """Scores `paths` with a QualityModel, writing rows; returns the number of failures.

    results: a list that collects (path, score, error) per file, if given.
    """
    from tqdm import tqdm

    failed = 0
    rows = model.iter_scores(paths)
    bar = tqdm(rows, total=len(paths), desc="scoring", unit="img", disable=not progress,
               file=sys.stderr)
    for i, score, error in bar:
        if error is None:
            writer.writerow([paths[i], f"{score:.4f}", ""])
        else:
            failed += 1
            writer.writerow([paths[i], "", error])
        if results is not None:
            results.append((paths[i], score, error))
    return failed


def _check_output_file(flag, path):
    """An output file must be creatable: its folder exists and it is not a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        example = os.path.join(path, "scores.csv" if flag == "output" else "report.html")
        raise ConfigError(f"--{flag} {path} is a folder; give a file name, e.g. {example}")
    if not os.path.isdir(folder):
        raise ConfigError(f"--{flag} {path}: the folder {folder} does not exist; create it first")


def main(argv):
    FLAGS = flags.FLAGS
    quiet_library_logs()
    patterns = argv[1:]
    if not FLAGS.checkpoint:
        raise app.UsageError("--checkpoint is required")
    if not patterns:
        raise app.UsageError("give at least one image file, folder or glob")
    for name in ("batch_size", "num_crops"):
        if FLAGS[name].value is not None and FLAGS[name].value < 1:
            raise ConfigError(f"--{name}={FLAGS[name].value} must be at least 1")
    for name in ("output", "report"):
        if FLAGS[name].value:
            _check_output_file(name, FLAGS[name].value)
    paths = expand_paths(patterns)
    if not paths:
        raise UserError(f"no image files in {' '.join(patterns)} (folders are searched for "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    from hyperiqa_jax.scoring import QualityModel

    model = QualityModel.from_checkpoint(FLAGS.checkpoint, batch_size=FLAGS.batch_size,
                                         protocol=FLAGS.protocol, num_crops=FLAGS.num_crops)
    results = []
    out = open(FLAGS.output, "w", newline="") if FLAGS.output else sys.stdout
    try:
        writer = csv.writer(out)
        writer.writerow(["path", "score", "error"])
        failed = predict_files(model, paths, writer, progress=sys.stderr.isatty() or
                               bool(FLAGS.output), results=results)
    finally:
        if out is not sys.stdout:
            out.close()
    if FLAGS.report:
        from hyperiqa_jax import report

        report.write_report(FLAGS.report, results, source=model.source,
                            title=f"Image quality: {' '.join(patterns)}")
    wrote = [f for f in (FLAGS.output, FLAGS.report) if f]
    print(f"scored {len(paths) - failed} of {len(paths)} images ({failed} failed); "
          f"checkpoint {model.source}; higher scores = better quality"
          + (f"; wrote {', '.join(wrote)}" if wrote else ""), file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    from hyperiqa_jax import cli

    cli.run(main, define_flags=define_flags)
