r"""Scores image files with a trained checkpoint; writes CSV `path,score,error`.

    python -m hyperiqa_jax.predict --checkpoint runs/demo [--output scores.csv] \
        photo.jpg folder/ 'shots/*.png'

Scores are on the training labels' scale, higher = better quality (KonIQ-10k
MOS: 0-100; the demo model's SSIM x 100: 0-100). Each image's score is the mean
over crops on a fixed grid (deterministic; --protocol/--num_crops change it),
after the resize the model was trained with, so any image size works.

Paths may be files, folders (searched recursively for image files) or glob
patterns. A file that cannot be read gets an empty score and its error in the
CSV; the run goes on. Exit status: 1 if any file failed, else 0.
"""

import csv
import glob
import os
import sys

from absl import app, flags

from hyperiqa_jax.logs import quiet_library_logs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm",
                    ".pgm")

def define_flags():
    """Command-line flags (defined only when run as a program)."""
    flags.DEFINE_string(
        "checkpoint", None, "Training workdir (uses its best checkpoint), best/ or a step folder.")
    flags.DEFINE_string("output", None, "CSV file to write (default: standard output).")
    flags.DEFINE_integer("batch_size", 64, "Crops per device batch (all images mixed).")
    flags.DEFINE_enum("protocol", "grid", ["grid", "center", "random"],
                      "Crop placement: fixed grid (default), one centre crop, or "
                      "seeded random crops.")
    flags.DEFINE_integer("num_crops", None, "Crops per image (default: the run's "
                         "data.test_crops).")


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


def predict_files(model, paths, writer, progress=True):
    """Scores `paths` with a QualityModel, writing rows; returns the number of failures."""
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
    return failed


def main(argv):
    FLAGS = flags.FLAGS
    quiet_library_logs()
    patterns = argv[1:]
    if not FLAGS.checkpoint:
        raise app.UsageError("--checkpoint is required")
    if not patterns:
        raise app.UsageError("give at least one image file, folder or glob")
    from hyperiqa_jax.scoring import QualityModel

    paths = expand_paths(patterns)
    model = QualityModel.from_checkpoint(FLAGS.checkpoint, batch_size=FLAGS.batch_size,
                                         protocol=FLAGS.protocol, num_crops=FLAGS.num_crops)
    out = open(FLAGS.output, "w", newline="") if FLAGS.output else sys.stdout
    try:
        writer = csv.writer(out)
        writer.writerow(["path", "score", "error"])
        failed = predict_files(model, paths, writer, progress=sys.stderr.isatty() or
                               bool(FLAGS.output))
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"scored {len(paths) - failed} of {len(paths)} images ({failed} failed); "
          f"checkpoint {model.source}; higher scores = better quality"
          + (f"; wrote {FLAGS.output}" if FLAGS.output else ""), file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    define_flags()
    app.run(main)
