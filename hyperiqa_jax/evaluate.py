r"""Evaluates a checkpoint on one or more data sets (zero-shot cross-data-set tables).

    python -m hyperiqa_jax.evaluate --checkpoint runs/base \
        --data koniq10k:test=/data/koniq10k --data spaq=/data/spaq --data kadid10k=/data/kadid \
        [--protocol random|center|grid] [--num_crops 20] [--out runs/base/eval]

`--data NAME[:SPLIT]=ROOT`: NAME is one of koniq10k, spaq, kadid10k, agiqa3k,
livec, manifest, demo; SPLIT defaults to `all` (every image: zero-shot). Writes
`results.md` and `results.json` (SRCC / PLCC / KRCC / RMSE / PLCC after the
logistic fit, per data set), `predictions_<data>_<split>.csv` (path, MOS and
prediction per image), for a model with attention `attention_<data>_<split>.csv`
(each image's mean attention weight per backbone stage), and figures: predicted
vs MOS scatter per data set, per-stage attention by quality bin, and the
training curves of the run's `metrics.jsonl` when the checkpoint sits in a
training workdir. `--seed` picks the random split (random:test) as training's
config.seed did.
"""

import csv
import difflib
import json
import math
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

from hyperiqa_jax import metrics
from hyperiqa_jax.data.image import PROTOCOLS
from hyperiqa_jax.errors import ConfigError, UserError
from hyperiqa_jax.study_report import (
    quality_bins,
    stage_attention,
    stage_channels,
    stage_labels,
    write_stage_attention,
)


def define_flags():
    """Command-line flags (defined only when run as a program)."""
    flags.DEFINE_string("checkpoint", None, "Training workdir, best/ or a step folder.")
    flags.DEFINE_multi_string("data", [], "NAME[:SPLIT]=ROOT, repeatable.")
    flags.DEFINE_enum("protocol", None, list(PROTOCOLS),
                      "Crop protocol (default: the run's data.eval_protocol).")
    flags.DEFINE_integer("num_crops", None, "Crops per image (default: the run's "
                         "data.test_crops).")
    flags.DEFINE_integer("batch_size", None, "Crops per forward call over all local devices "
                         "(default: the run's train.eval_batch_size, whose numbers then match "
                         "the training-time evaluation's).")
    flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/eval or ./eval).")
    flags.DEFINE_integer("quality_bins", 5, "MOS quantile bins for the attention figure.")
    flags.DEFINE_integer("seed", 0, "Seed of random splits (random:test): the run's "
                         "config.seed gives its own test split.")


COLUMNS = ("srcc", "plcc", "krcc", "rmse", "plcc_logistic")


def parse_data_arg(arg):
    """'name[:split]=root' -> (name, split, root)."""
    from hyperiqa_jax.data import DATASETS

    if "=" not in arg:
        raise ConfigError(f"--data {arg!r}: expected NAME[:SPLIT]=ROOT, e.g. spaq=/data/spaq "
                          f"(NAME: {', '.join(DATASETS)})")
    key, root = arg.split("=", 1)
    name, _, split = key.partition(":")
    name = name.strip()
    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"--data {arg!r}: unknown data set {name!r}; {hint}"
                          f"NAME is one of {', '.join(DATASETS)}")
    return name, (split.strip() or "all"), root


def output_tag(name, split):
    """The <data>_<split> of the output file names."""
    return f"{name}_{split}".replace(":", "_").replace("/", "_")


def evaluate_dataset(model, name, split, root, *, seed=0):
    """Scores every record of one data set; returns (result dict, pred, mos, attention)."""
    from hyperiqa_jax import data

    records = data.load_records(name, root, split, seed=seed)
    if not records:
        raise UserError(f"{name} ({root}, split {split}) has no images")
    preds = np.full(len(records), np.nan)
    attention = [None] * len(records)
    errors = {}
    # Records, not paths: crops are seeded by the image's index in the split, as in
    # training-time evaluation, so the `random` protocol reproduces its numbers.
    for i, score, err, att in model.iter_scores(records, return_attention=True):
        preds[i], attention[i] = score, att
        if err is not None:
            errors[records[i].path] = err
    mos = np.array([r.score for r in records], np.float64)
    ok = np.isfinite(preds)
    result = {"data": name, "split": split, "root": str(root), **metrics.compute_all(preds[ok],
                                                                                     mos[ok]),
              "failed_images": len(errors), "protocol": model.protocol,
              "crops_per_image": model.num_crops}
    if errors:
        result["failed_examples"] = dict(list(errors.items())[:5])
    att = None if any(a is None for a, k in zip(attention, ok) if k) else np.stack(
        [a for a, k in zip(attention, ok) if k])
    result["predictions"] = [(r.path, r.score, p) for r, p in zip(records, preds)]
    return result, preds[ok], mos[ok], att


def write_predictions(rows, path):
    """predictions_<data>_<split>.csv: path, mos, prediction per image (empty if it failed)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "mos", "prediction"])
        for image, mos, pred in rows:
            writer.writerow([image, f"{mos:.6g}", f"{pred:.6f}" if math.isfinite(pred) else ""])


def markdown_table(results):
    head = "| data set | split | images | SRCC | PLCC | KRCC | RMSE | PLCC (logistic) |"
    rows = [head, "|" + "---|" * 8]
    for r in results:
        vals = " | ".join(_fmt(r[c]) for c in COLUMNS)
        rows.append(f"| {r['data']} | {r['split']} | {r['num_images']} | {vals} |")
    return "\n".join(rows)


def _fmt(x):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4f}"


# ---------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scatter(pred, mos, result, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(mos, pred, s=6, alpha=0.5)
    lo, hi = float(min(mos.min(), pred.min())), float(max(mos.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("MOS")
    ax.set_ylabel("predicted score")
    ax.set_title(f"{result['data']} ({result['split']}): SRCC {_fmt(result['srcc'])}, "
                 f"PLCC {_fmt(result['plcc'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention_by_bin(stages, mos, name, path, bins=5):
    """Mean per-stage attention ([N, stages]) of the images in each MOS quantile bin."""
    plt = _pyplot()
    which, labels = quality_bins(mos, bins)
    means = np.stack([stages[which == b].mean(0) if np.any(which == b) else
                      np.full(stages.shape[1], np.nan) for b in range(bins)])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / stages.shape[1]
    for k, label in enumerate(stage_labels(stages.shape[1])):
        ax.bar(np.arange(bins) + k * width, means[:, k], width, label=label)
    ax.set_xticks(np.arange(bins) + 0.4 - width / 2, labels)
    ax.legend(fontsize=8)
    ax.set_ylabel("mean attention weight")
    ax.set_title(f"{name}: attention per backbone stage by MOS bin", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_curves_figure(rows):
    """The training loss and the test correlations by step, one panel each that has rows.

    rows: metrics.jsonl's records. None when there is neither a loss nor a test row.
    """
    train = [r for r in rows if r["split"] == "train" and r.get("loss") is not None]
    test = {key: [(r["step"], r[key]) for r in rows
                  if r["split"] == "test" and r.get(key) is not None]
            for key in ("srcc", "plcc")}
    panels = [name for name, present in (("loss", train), ("test", any(test.values())))
              if present]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ax.set_xlabel("step")
        if panel == "loss":
            ax.plot([r["step"] for r in train], [r["loss"] for r in train])
            ax.set_ylabel("training loss")
        else:
            for key, points in test.items():
                if points:
                    ax.plot(*zip(*points), marker="o", label=key.upper())
            ax.set_ylabel("test correlation")
            ax.legend()
    fig.tight_layout()
    return fig


def plot_training_curves(metrics_path, path):
    """Writes `training_curves_figure` of a metrics.jsonl to `path`; False when it is empty."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    fig = training_curves_figure(rows)
    if fig is None:
        return False
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return True


def run(checkpoint, data_args, *, out=None, protocol=None, num_crops=None, batch_size=None,
        bins=5, seed=0):
    """Evaluates `checkpoint` on every `NAME[:SPLIT]=ROOT`; returns the list of results."""
    from hyperiqa_jax import checkpointing
    from hyperiqa_jax.scoring import QualityModel

    manager_dir, _ = checkpointing.resolve_checkpoint(checkpoint)
    workdir = manager_dir.parent if manager_dir.name in (checkpointing.BEST_DIR,
                                                         checkpointing.LATEST_DIR) else None
    out = Path(out or (workdir / "eval" if workdir else "eval"))
    out.mkdir(parents=True, exist_ok=True)
    # protocol None: the run's data.eval_protocol.
    model = QualityModel.from_checkpoint(checkpoint, batch_size=batch_size, protocol=protocol,
                                         num_crops=num_crops)
    results = []
    for arg in data_args:
        name, split, root = parse_data_arg(arg)
        result, pred, mos, att = evaluate_dataset(model, name, split, root, seed=seed)
        result["checkpoint"] = model.source
        tag = output_tag(name, split)
        predictions = result.pop("predictions")
        write_predictions(predictions, out / f"predictions_{tag}.csv")
        if len(pred) > 1:
            plot_scatter(pred, mos, result, out / f"scatter_{tag}.png")
        if att is not None:
            stages = stage_attention(att, stage_channels(model.config.model))
            write_stage_attention([p for p, _, s in predictions if math.isfinite(s)], stages,
                                  out / f"attention_{tag}.csv")
            if len(pred) >= bins:
                plot_attention_by_bin(stages, mos, name, out / f"attention_{tag}.png", bins)
        results.append(result)
        print(f"{name} ({split}): {result['num_images']} images, SRCC {_fmt(result['srcc'])} "
              f"PLCC {_fmt(result['plcc'])}", file=sys.stderr)
    if workdir is not None and (workdir / "metrics.jsonl").exists():
        plot_training_curves(workdir / "metrics.jsonl", out / "training_curves.png")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    (out / "results.md").write_text(markdown_table(results) + "\n")
    return results


def _json_default(x):
    return float(x) if isinstance(x, (np.floating, np.integer)) else str(x)


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS.checkpoint or not FLAGS.data:
        raise app.UsageError("--checkpoint and at least one --data NAME[:SPLIT]=ROOT are needed")
    for name in ("batch_size", "num_crops", "quality_bins"):
        if FLAGS[name].value is not None and FLAGS[name].value < 1:
            raise ConfigError(f"--{name}={FLAGS[name].value} must be at least 1")
    for arg in FLAGS.data:  # every --data before the first is scored
        parse_data_arg(arg)
    results = run(FLAGS.checkpoint, FLAGS.data, out=FLAGS.out, protocol=FLAGS.protocol,
                  num_crops=FLAGS.num_crops, batch_size=FLAGS.batch_size,
                  bins=FLAGS.quality_bins, seed=FLAGS.seed)
    print(markdown_table(results))


if __name__ == "__main__":
    from hyperiqa_jax import cli

    cli.run(main, define_flags=define_flags)
