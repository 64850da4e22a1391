"""Console logging of the command-line programs, and a training run's metric records."""

import importlib.util
import json
import math
import sys

import jax
import numpy as np
from absl import logging
from etils import epath

from hyperiqa_jax.paths import is_url


def quiet_library_logs():
    """Orbax logs every save and restore at INFO: show warnings only, unless -v/--verbosity."""
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)


def tensorboard_writer(logdir):
    """tensorboardX's SummaryWriter for `logdir`, or None when it cannot write there.

    tensorboardX writes a gs:// folder itself when google-cloud-storage is installed
    (it uploads the event file at each flush, every 2 minutes, and at close); without
    it, or for another kind of URL, the run goes on with metrics.jsonl alone, after
    one warning.
    """
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # TensorBoard is optional; metrics.jsonl is the record.
        return None
    logdir = str(logdir)
    if is_url(logdir):
        if not (logdir.startswith("gs://") and _importable("google.cloud.storage")):
            print(f"warning: no TensorBoard events in {logdir} (tensorboardX writes local "
                  "folders, and gs:// with google-cloud-storage installed); metrics.jsonl "
                  "has every value", file=sys.stderr, flush=True)
            return None
    return SummaryWriter(logdir)


def _importable(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


class MetricWriter:
    """metrics.jsonl (one JSON object per line) and TensorBoard scalars in tb/ (process 0
    only).

    A bucket workdir (gs://...) cannot be appended to: there metrics.jsonl is
    rewritten whole at each write. TensorBoard events go to WORKDIR/tb on a bucket
    too (`tensorboard_writer`); metrics.jsonl is the record either way.
    """

    def __init__(self, workdir):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.remote = is_url(workdir)
        self.lines = []
        if self.remote and self.path.exists():  # a resumed run keeps the earlier rows
            self.lines = self.path.read_text().splitlines(keepends=True)
        self.tb = tensorboard_writer(epath.Path(workdir) / "tb")

    def write(self, step, epoch, split, values):
        if not self.enabled:
            return
        row = {"step": int(step), "epoch": epoch, "split": split,
               **{k: jsonable(v) for k, v in values.items()}}
        line = json.dumps(row) + "\n"
        if self.remote:
            self.lines.append(line)
            self.path.write_text("".join(self.lines))
        else:
            with self.path.open("a") as f:
                f.write(line)
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{split}/{k}", v, int(step))

    def close(self):
        if self.enabled and self.tb is not None:
            self.tb.close()


def jsonable(v):
    v = float(v) if isinstance(v, (np.floating, np.integer, jax.Array)) else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def format_summary(s):
    ev = s["last_eval"] or {}
    lines = [
        "Run summary",
        f"  stopped:     {s['stop_reason']} at step {s['step']}/{s['total_steps']} "
        f"(epoch {s['epoch']:.2f})",
        f"  wall time:   {s['wall_seconds']:.1f}s; train throughput "
        f"{(s['train_images_per_second'] or 0):.1f} images/s on {s['devices']} device(s)",
        f"  final loss:  {s['final_loss']}",
    ]
    if ev:
        lines.append(f"  last eval:   step {ev['step']}: SRCC {ev['srcc']:.4f}  PLCC "
                     f"{ev['plcc']:.4f}  KRCC {ev['krcc']:.4f}  RMSE {ev['rmse']:.3f}  "
                     f"PLCC(logistic) {ev['plcc_logistic']:.4f}")
    if s["best_step"] is not None:
        lines.append(f"  best:        SRCC {s['best_srcc']:.4f} at step {s['best_step']} "
                     f"-> {s['best_checkpoint']}")
    return "\n".join(lines)
