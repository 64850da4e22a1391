r"""End-to-end demo on CPU: generate data, train a small Swin HyperIQA, evaluate.

    python -m hyperiqa_jax.demo [--workdir runs/demo] [--restart] [--config.train.epochs=2]

1. generates the demo data set once (photographs bundled with scikit-image and
   matplotlib, six distortions x four levels, each labelled with its
   condition's mean SSIM x 100, split by photograph);
2. trains the demo config (configs/demo.py) from random initialisation into the workdir
   (rerunning resumes; --restart starts over);
3. evaluates the final model on the unseen test photographs and prints SRCC /
   PLCC, the wall time, and where the figures and checkpoints are.
"""

import csv
import math
import os
import shutil
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from hyperiqa_jax import config_defaults


def define_flags():
    """Command-line flags (defined only when run as a program)."""
    config_flags.DEFINE_config_dict("config", config_defaults.demo_config(),
                                    "The demo config (override with --config.KEY=VALUE).")
    flags.DEFINE_string("workdir", "runs/demo", "Where the run is written.")
    flags.DEFINE_bool("restart", False, "Delete the workdir first instead of resuming.")


def run_demo(config, workdir, restart=False):
    """Data -> training -> evaluation; returns {'srcc', 'plcc', 'wall_seconds', ...}."""
    from hyperiqa_jax import data, evaluate, train

    t0 = time.time()
    workdir = Path(workdir)
    if restart and workdir.exists():
        shutil.rmtree(workdir)
    print("[1/3] demo data set ...", flush=True)
    root = config.data.root or data.ensure_demo_dataset()
    n_train = len(data.load_records("demo", root, config.data.train_split))
    n_test = len(data.load_records("demo", root, config.data.test_split))
    t_data = time.time() - t0
    print(f"      {root}: {n_train} train / {n_test} test images ({t_data:.0f}s)", flush=True)

    print(f"[2/3] training {config.model.backbone} (overrides "
          f"{dict(config.model.backbone_overrides)}) from scratch -> {workdir}", flush=True)
    with config.unlocked():
        config.data.root = root
    summary = train.train_and_evaluate(config, str(workdir))
    t_train = time.time() - t0 - t_data

    print("[3/3] evaluating the final model on the test photographs ...", flush=True)
    t1 = time.time()
    results = evaluate.run(str(workdir / "checkpoints"), [f"demo:{config.data.test_split}={root}"],
                           out=str(workdir / "eval"))
    r = results[0]
    wall = time.time() - t0
    print()
    print(evaluate.markdown_table(results))
    print()
    if r["srcc"] is not None and math.isfinite(r["srcc"]):
        print(f"Demo: test SRCC {r['srcc']:.4f}, PLCC {r['plcc']:.4f} on {r['num_images']} images "
              f"of unseen photographs (step {summary['step']}).")
    else:  # a constant prediction has no rank correlation
        print(f"Demo: test SRCC and PLCC undefined: the model gives all {r['num_images']} test "
              f"images the same score (step {summary['step']}); it has not learned.")
    per_distortion = distortion_srcc(root, workdir / "eval" / f"predictions_demo_"
                                     f"{config.data.test_split}.csv")
    print("SRCC per distortion: " + ", ".join(f"{k} {v:.2f}" for k, v in per_distortion.items()))
    print(f"Wall time {wall:.0f}s: data {t_data:.0f}s, training {t_train:.0f}s, "
          f"evaluation {time.time() - t1:.0f}s. Figures in {workdir / 'eval'}; score your own "
          f"images with: python -m hyperiqa_jax.predict --checkpoint {workdir} PATH...")
    return {"srcc": r["srcc"], "plcc": r["plcc"], "wall_seconds": wall, "summary": summary,
            "results": results, "srcc_per_distortion": per_distortion}


def distortion_srcc(root, predictions_csv):
    """{distortion: SRCC} over the test images, from evaluate's predictions file."""
    from scipy import stats

    with open(Path(root) / "manifest.csv", newline="") as f:
        kind = {os.path.normpath(os.path.join(root, row["path"])): row["distortion"]
                for row in csv.DictReader(f)}
    by_kind = {}
    with open(predictions_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row["prediction"]:
                pairs = by_kind.setdefault(kind[os.path.normpath(row["path"])], ([], []))
                pairs[0].append(float(row["prediction"]))
                pairs[1].append(float(row["mos"]))
    return {k: float(stats.spearmanr(*by_kind[k])[0]) for k in sorted(by_kind)}


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from hyperiqa_jax import train

    train.check_workdir(FLAGS.workdir)
    train.check_config(FLAGS.config)  # a bad override stops here, before the data is made
    run_demo(FLAGS.config, FLAGS.workdir, restart=FLAGS.restart)


if __name__ == "__main__":
    from hyperiqa_jax import cli

    # Non-finite loss: its message says which checkpoint is good and what to change.
    cli.run(main, define_flags=define_flags, expected=(FloatingPointError,))
