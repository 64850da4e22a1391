r"""Trains HyperIQA: sharded jit steps, Orbax checkpoints, evaluation during training.

    python -m hyperiqa_jax.train --config=configs/base.py --workdir=runs/base \
        --config.data.root=/data/koniq10k [--config.train.batch_size=16 ...]

The workdir collects everything: `checkpoints/` (latest K, resumable: rerun the
same command to continue exactly where it stopped), `best/` (best test SRCC,
what evaluate/predict read), `metrics.jsonl`, TensorBoard events in `tb/` and
`summary.json`. It may be a `gs://` path (etils.epath, as Orbax uses).
Exit status: 0 when the run ends, 75 (EXIT_PREEMPTED) after SIGTERM stopped it
with a checkpoint saved (the launchers requeue or rerun on it), 2 for a user error.

Read top to bottom, the file follows the data: config -> steps -> evaluation
-> logging -> the run (mesh, input, state, loop). The global batch is split
along the `data` mesh axis; parameters and optimiser state are replicated.
Crops arrive as uint8 and are normalised inside the jitted step; the next
batches are already on the device while a step runs (`DeviceBatches`). With
several processes each one reads and evaluates its own share of the images and
process 0 alone writes logs.
"""

import dataclasses
import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags
from tqdm import tqdm

from hyperiqa_jax import checkpointing, data, distributed, metrics, optim, params_io, scoring, state
from hyperiqa_jax import models as models_lib
from hyperiqa_jax.config_checks import check_config, eval_batch_size
from hyperiqa_jax.data import device
from hyperiqa_jax.data.image import normalize
from hyperiqa_jax.errors import ConfigError, UserError
from hyperiqa_jax.logs import MetricWriter, format_summary, jsonable
from hyperiqa_jax.paths import is_url

# ----------------------------------------------------------------------------
# Config.


def _log(message):
    """Progress messages from process 0 (absl logging is left to the libraries)."""
    if jax.process_index() == 0:
        tqdm.write(message)


def _config_to_json(config):
    return json.loads(config.to_json_best_effort())


# Exit status after SIGTERM stopped the run with a checkpoint saved (EX_TEMPFAIL of
# sysexits.h, "try again"): a job scheduler's requeue path acts on it; 0 means finished.
EXIT_PREEMPTED = 75
PREEMPTED = "preempted (SIGTERM): checkpoint saved, rerun to resume"


def workdir_path(workdir):
    """The workdir as an epath.Path: local paths made absolute, `gs://...` kept."""
    return epath.Path(workdir if is_url(workdir) else os.path.abspath(workdir))


# ----------------------------------------------------------------------------
# Steps (pure functions of the state; jitted with shardings in `compile_steps`).


def score_loss(pred, target, train_config):
    """L1 (or smooth L1) plus the optional pairwise ranking hinge loss."""
    err = pred - target
    if train_config.loss == "l1":
        loss = jnp.mean(jnp.abs(err))
    elif train_config.loss == "smooth_l1":
        loss = jnp.mean(jnp.where(jnp.abs(err) < 1, 0.5 * err**2, jnp.abs(err) - 0.5))
    else:
        raise ValueError(f"unknown train.loss {train_config.loss!r}: use 'l1' or 'smooth_l1'")
    if train_config.ranking_loss_weight:
        # Every ordered pair with different labels: the prediction gap must reach the margin.
        sign = jnp.sign(target[:, None] - target[None, :])
        gap = pred[:, None] - pred[None, :]
        hinge = jax.nn.relu(train_config.ranking_margin - sign * gap) * (sign != 0)
        loss += train_config.ranking_loss_weight * hinge.sum() / jnp.maximum((sign != 0).sum(), 1)
    return loss


def loss_and_grads(params, batch_stats, batch, rng, *, model, train_config, label_stats):
    """(loss, gradient w.r.t. params, new batch_stats or None) for a batch of uint8 crops.

    The differentiable half of `train_step`; the parity check against PyTorch
    compares its gradients directly.
    """
    if batch["image"].dtype != jnp.uint8:
        raise TypeError(f"batch['image'] must be uint8 crops (normalised inside the step), got "
                        f"{batch['image'].dtype}")
    mean, std = label_stats
    target = (batch["score"] - mean) / std
    images = normalize(batch["image"])
    mutable = ["batch_stats"] if batch_stats is not None else []

    def loss_fn(params):
        variables = {"params": params}
        if batch_stats is not None:
            variables["batch_stats"] = batch_stats
        out, updates = model.apply(variables, images, train=True, rngs={"dropout": rng},
                                   mutable=mutable)
        loss = score_loss(out["score"].astype(jnp.float32), target, train_config)
        return loss, updates.get("batch_stats")

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, new_stats


def train_step(state_, batch, *, model, tx, train_config, label_stats):
    """One optimiser step; returns (new state, {loss, grad_norm})."""
    rng = jax.random.fold_in(state_["rng"], state_["step"])
    loss, grads, batch_stats = loss_and_grads(
        state_["params"], state_.get("batch_stats"), batch, rng, model=model,
        train_config=train_config, label_stats=label_stats)
    updates, opt_state = tx.update(grads, state_["opt_state"], state_["params"])
    new_state = dict(state_, step=state_["step"] + 1, opt_state=opt_state,
                     params=optax.apply_updates(state_["params"], updates))
    if batch_stats is not None:
        new_state["batch_stats"] = batch_stats
    return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}


def eval_step(variables, batch, *, model, label_stats):
    """Crop scores in label units, with the rows' image index and validity."""
    score, _ = scoring.predict_scores(model, variables, batch["image"], label_stats)
    return score, batch["image_index"], batch["valid"]


def compile_steps(model, tx, config, label_stats, mesh, abstract_state):
    """jit-ted train and eval steps with the mesh's shardings; returns (train, eval, shardings)."""
    repl = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    state_sharding = jax.tree.map(lambda _: repl, abstract_state)
    stats = tuple(float(x) for x in label_stats)
    train = jax.jit(
        lambda s, b: train_step(s, b, model=model, tx=tx, train_config=config.train,
                                label_stats=stats),
        in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, repl),
        donate_argnums=0)
    # Outputs replicated: each process sees every row, whichever process decoded it.
    evaluate = jax.jit(lambda v, b: eval_step(v, b, model=model, label_stats=stats),
                       out_shardings=repl)
    return train, evaluate, dict(state=state_sharding, batch=batch_sharding, repl=repl)


# ----------------------------------------------------------------------------
# Evaluation.


def evaluate_split(eval_fn, variables, source, config, batch_sharding):
    """Per-image predictions (crop scores averaged) and metrics on a test split.

    Each process decodes its share of the images (`make_eval_batches`); the
    eval step's outputs are replicated, so every process gets every score.
    """
    count = jax.process_count()
    batches = data.make_eval_batches(source, config.data,
                                     batch_size=eval_batch_size(config.train) // count, seed=0,
                                     process_index=jax.process_index(), process_count=count)

    def dispatch(batch):
        scores, index, valid = eval_fn(variables, device.to_global(batch, batch_sharding))
        return scores, None, index, valid

    outputs = scoring.overlapped(batches, dispatch)
    crops = data.num_eval_crops(config.data)
    per_image = np.array([s for _, s, _ in scoring.iter_image_scores(outputs, len(source),
                                                                     crops)])
    mos = data.split_scores(source)
    ok = np.isfinite(per_image)  # images that failed to decode have no prediction
    return per_image, metrics.compute_all(per_image[ok], mos[ok])


# ----------------------------------------------------------------------------
# The run: small helpers, then the loop.


def load_train_test_records(config):
    """Train and test image sources: Records, or TfdsSources when data.tfds_dir is set.

    Their labels: data.split_scores(source). The data module's errors say what to
    download or build where.
    """
    dc = config.data
    return (data.load_split(dc, dc.train_split, seed=config.seed),
            data.load_split(dc, dc.test_split, seed=config.seed))


def label_statistics(train_labels, standardize):
    """(mean, std) the loss standardises labels with; (0, 1) when it does not."""
    if not standardize:
        return 0.0, 1.0
    return float(train_labels.mean()), float(train_labels.std()) or 1.0


@dataclasses.dataclass(frozen=True)
class Progress:
    """What the loop decides with, saved in every checkpoint's meta."""

    best_srcc: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0


def initial_state(config, init_fn, abstract_state, shardings):
    """Step 0: a sharded init, with the converted backbone if the config names one."""
    train_state = jax.jit(init_fn, out_shardings=shardings["state"])(
        jax.random.PRNGKey(config.seed))
    if config.pretrained_backbone:
        backbone = params_io.load_backbone(config.pretrained_backbone,
                                            abstract_state["params"]["backbone"])
        params = dict(train_state["params"], backbone=backbone)
        train_state["params"] = jax.device_put(params, shardings["state"]["params"])
    return train_state


def _flat_settings(tree, prefix):
    """{'model.backbone_overrides.embed_dim': 24, ...}; lists as tuples (JSON keeps none)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def setting_changes(saved_config, config, section):
    """'SECTION.KEY is SAVED in the checkpoint, NOW here' per differing setting of `section`."""
    saved = _flat_settings(saved_config[section].to_dict(), f"{section}.")
    now = _flat_settings(config[section].to_dict(), f"{section}.")
    return [f"{key} is {saved.get(key, 'unset')!r} in the checkpoint, {now.get(key, 'unset')!r} "
            "here" for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]


def _first(items, n=3):
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def check_checkpoint_fits(ckpt, step, abstract_state, config):
    """Raises a one-line UserError when checkpoint `step` does not fit the train state.

    Read from the checkpoint's metadata and saved config, before any restore: the
    message names the settings and the arrays that differ. UnreadableCheckpoint
    when those cannot be read.
    """
    manager_dir = epath.Path(str(ckpt.latest.directory))
    try:
        saved = checkpointing.saved_array_specs(manager_dir, step)
        meta = checkpointing.restore_latest_meta(ckpt, step)
    except Exception as e:  # truncated or missing files: Orbax, tensorstore or JSON errors
        raise UnreadableCheckpoint(ckpt, step, e) from e
    differences = checkpointing.spec_differences(saved, checkpointing.array_specs(abstract_state))
    if not differences:
        return
    changes = []
    if isinstance(meta, dict) and "config" in meta:  # the model's arrays, else the optimiser's
        section = "model" if differences[0].startswith("params/") else "train"
        changes = setting_changes(checkpointing.config_from_meta(meta), config, section)
    meta_path = checkpointing.meta_file(manager_dir, step)
    where = (f"`python -m json.tool {meta_path}` shows it" if meta_path.exists()
             else f"its meta in {manager_dir / str(step)} holds it")
    todo = (f"Rerun with the config it was trained with ({where}), or train into a new --workdir"
            if changes else "Its saved config matches this one, so other code wrote it: train "
            "into a new --workdir")
    settings = f" ({_first(changes)})" if changes else ""
    raise UserError(f"the checkpoint at step {step} in {manager_dir} does not fit this "
                    f"config{settings}: {_first(differences)}. {todo}")


class UnreadableCheckpoint(UserError):
    """The newest checkpoint of a workdir cannot be read; names the older one (deletes nothing)."""

    def __init__(self, ckpt, step, error):
        manager_dir = epath.Path(str(ckpt.latest.directory))
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        older = [s for s in ckpt.latest.all_steps() if s < step]
        if older:
            todo = (f"step {max(older)} is the checkpoint before it: to resume from there, move "
                    f"{manager_dir / str(step)} out of {manager_dir} and rerun; or train into a "
                    "new --workdir")
        else:
            todo = (f"there is no older checkpoint: move {manager_dir / str(step)} out of "
                    f"{manager_dir} to start over, or train into a new --workdir")
        super().__init__(f"the newest checkpoint, step {step} in {manager_dir}, cannot be read "
                         f"(truncated or damaged files? {type(error).__name__}: {reason}); "
                         f"nothing was deleted. {todo}")


def resume(ckpt, step, abstract_state, shardings, batches, label_stats, workdir, config):
    """The train state, data position and progress saved at `step`.

    A checkpoint of another model, or one that cannot be read, stops with a
    one-line UserError that says what differs or which older step there is.
    """
    check_checkpoint_fits(ckpt, step, abstract_state, config)
    target = checkpointing.with_shardings(abstract_state, shardings["state"])
    # Without a saved position for this process layout, the data position is rebuilt
    # from the step count (skip that many batches of this process's stream).
    same_layout = ckpt.has_data_position(step)
    try:
        train_state, meta = ckpt.restore(step, target, batches if same_layout else None)
    except Exception as e:  # the metadata fit: the array or iterator files are damaged
        raise UnreadableCheckpoint(ckpt, step, e) from e
    if not same_layout:
        _log(f"Checkpoint written by another process count: skipping {step} batches of the "
             "input to its position")
        batches.skip(step)
    if not np.allclose(tuple(meta["label_mean_std"]), label_stats):
        raise UserError(f"the training labels changed since the checkpoint in {workdir} was "
                        "written: use a new --workdir, or the data it was trained on")
    progress = Progress(**{k: meta.get(k) for k in ("best_srcc", "best_step")},
                        evals_since_best=meta.get("evals_since_best", 0))
    _log(f"Resumed from {ckpt.latest.directory} at step {step}")
    return train_state, progress


def is_eval_step(step, train_config, steps_per_epoch, total_steps):
    tc = train_config
    epoch_end = step % steps_per_epoch == 0
    return bool((epoch_end and tc.eval_every_epochs
                 and (step // steps_per_epoch) % tc.eval_every_epochs == 0)
                or (tc.eval_every_steps and step % tc.eval_every_steps == 0)
                or (step == total_steps and tc.final_eval))


def is_checkpoint_step(step, train_config, steps_per_epoch, total_steps):
    return (step % train_config.checkpoint_every_steps == 0 or step % steps_per_epoch == 0
            or step == total_steps)


def update_progress(progress, srcc, step, patience):
    """(new progress, whether this evaluation is the best so far, early-stop reason or None)."""
    srcc = srcc if math.isfinite(srcc) else -math.inf
    if progress.best_srcc is None or srcc > progress.best_srcc:
        return Progress(best_srcc=srcc, best_step=step, evals_since_best=0), True, None
    progress = dataclasses.replace(progress, evals_since_best=progress.evals_since_best + 1)
    stop = None
    if patience and progress.evals_since_best >= patience:
        stop = f"early stopping (no SRCC gain in {patience} evaluations)"
    return progress, False, stop


def check_finite(loss, step, ckpt, workdir):
    """Raises when the loss is NaN/inf, naming the last good checkpoint (none is written)."""
    if not math.isfinite(loss):
        ckpt.wait()
        raise FloatingPointError(
            f"non-finite training loss ({loss}) at step {step}. Stopped without saving; "
            f"the last good checkpoint is step {ckpt.latest_step()} in "
            f"{workdir / checkpointing.LATEST_DIR}. Lower train.lr, keep train.grad_clip on, "
            "or check the labels.")


class StopSignal:
    """Turns SIGTERM into a stop at a step boundary (checkpoint, then exit).

    One process reads its own flag every step (no synchronisation). Several
    processes agree every `every` steps (one all-gather), so all of them stop
    after the same step and the checkpoint resumes exactly.
    """

    def __init__(self, every):
        self.every = every
        self.received = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not the main thread: leave signals alone.
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step):
        if jax.process_count() == 1:
            return self.received
        if step % self.every:
            return False
        from jax.experimental import multihost_utils
        return bool(multihost_utils.process_allgather(np.array(self.received)).any())


def evaluate_and_keep_best(eval_fn, train_state, test_records, config, shardings, ckpt,
                           progress, step, meta):
    """Evaluates on the test split; saves best/ (with its per-image predictions) on a new best.

    Returns (metrics, new progress, early-stop reason or None).
    """
    t0 = time.time()
    variables = state.inference_variables(train_state)
    predictions, m = evaluate_split(eval_fn, variables, test_records, config, shardings["batch"])
    m["eval_seconds"] = time.time() - t0
    progress, is_best, early_stop = update_progress(progress, m["srcc"], step,
                                                    config.train.patience)
    if is_best:  # `evaluate` on best/ reproduces these predictions image by image
        ckpt.save_best(step, variables, dict(
            meta, **dataclasses.asdict(progress), metrics=m, state_kind="inference",
            test_predictions=[jsonable(x) for x in predictions]))
    _log(f"step {step} test: SRCC {m['srcc']:.4f} PLCC {m['plcc']:.4f} KRCC {m['krcc']:.4f} "
         f"RMSE {m['rmse']:.3f} ({m['eval_seconds']:.1f}s)")
    return m, progress, early_stop


def checkpoint_meta(config, label_stats, step, steps_per_epoch, progress):
    """The JSON saved with a checkpoint: config, label statistics, step and progress."""
    return {"config": _config_to_json(config), "label_mean_std": list(label_stats),
            "step": int(step), "epoch": step / steps_per_epoch, **dataclasses.asdict(progress)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       records=None) -> dict:
    """Trains (resuming from `workdir` if it holds a checkpoint); returns the run summary.

    `records`: the (train, test) sources of a caller that has already checked the
    config and loaded them (`main`); without them both happen here.
    """
    if records is None:
        check_config(config)
        records = load_train_test_records(config)
    train_records, test_records = records
    data.pipeline.mark_flags_parsed()
    tc = config.train
    workdir = workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    t_start = time.time()

    # ---- Mesh: one `data` axis over every device of every process.
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))

    # ---- Input: this process's shard of the train set; its share of the test set.
    if not len(train_records):
        raise UserError(f"no training images in {config.data.name} ({config.data.root})")
    label_stats = label_statistics(data.split_scores(train_records), tc.standardize_labels)
    global_batch = tc.batch_size
    steps_per_epoch = data.steps_per_epoch(len(train_records), config.data, global_batch)
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch
    train_ds = data.make_train_dataset(
        train_records, config.data, batch_size=global_batch // jax.process_count(),
        seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())

    # ---- Model, optimiser, steps.
    model = models_lib.build_model(config.model)
    tx = optim.make_optimizer(tc, steps_per_epoch)
    init_fn = lambda rng: state.init_train_state(model, tx, config.data.crop_size, rng)
    abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
    train_fn, eval_fn, shardings = compile_steps(model, tx, config, label_stats, mesh,
                                                 abstract_state)
    batches = device.DeviceBatches(iter(train_ds), shardings["batch"])

    # ---- State: resume if the workdir has a checkpoint, else initialise.
    ckpt = checkpointing.Checkpointer(workdir, keep=tc.keep_checkpoints)
    if ckpt.latest_step() is not None:
        train_state, progress = resume(ckpt, ckpt.latest_step(), abstract_state, shardings,
                                       batches, label_stats, workdir, config)
    else:
        train_state = initial_state(config, init_fn, abstract_state, shardings)
        progress = Progress()
    start_step = int(train_state["step"])

    writer = MetricWriter(workdir)
    n_params = sum(x.size for x in jax.tree.leaves(abstract_state["params"]))
    _log(f"{len(train_records)} train / {len(test_records)} test images, {steps_per_epoch} "
         f"steps/epoch, {total_steps} steps, {n_params / 1e6:.2f}M params, "
         f"{jax.device_count()} device(s)")
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
               dynamic_ncols=True, file=sys.stderr, disable=not is_main)

    # ---- Loop. The host reads device values only at log, evaluation and checkpoint steps.
    stop_reason, last_eval, last_loss = "completed", None, None
    t_loop = t_log = time.time()
    t_eval, step = 0.0, start_step
    with jax.set_mesh(mesh), StopSignal(tc.stop_check_every_steps) as stop:
        while step < total_steps:
            train_state, step_metrics = train_fn(train_state, next(batches))
            step += 1
            bar.update(1)

            if step % tc.log_every_steps == 0 or step == total_steps:
                m = jax.device_get(step_metrics)
                last_loss = float(m["loss"])
                check_finite(last_loss, step, ckpt, workdir)
                steps_logged = step % tc.log_every_steps or tc.log_every_steps
                ips = steps_logged * global_batch / max(time.time() - t_log, 1e-9)
                lrs = {f"lr_{k}": float(s(step - 1)) for k, s in
                       optim.lr_schedules(tc, steps_per_epoch).items()}
                writer.write(step, step / steps_per_epoch, "train",
                             {"loss": last_loss, "grad_norm": float(m["grad_norm"]),
                              "images_per_second": ips, **lrs})
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{ips:.1f}")
                t_log = time.time()

            evaluated = is_eval_step(step, tc, steps_per_epoch, total_steps)
            if evaluated:
                m, progress, early_stop = evaluate_and_keep_best(
                    eval_fn, train_state, test_records, config, shardings, ckpt, progress, step,
                    checkpoint_meta(config, label_stats, step, steps_per_epoch, progress))
                writer.write(step, step / steps_per_epoch, "test", m)
                last_eval, t_eval = dict(m, step=step), t_eval + m["eval_seconds"]
                stop_reason = early_stop or stop_reason

            preempted = stop.should_stop(step)
            if (is_checkpoint_step(step, tc, steps_per_epoch, total_steps) or evaluated
                    or preempted or stop_reason != "completed"):
                last_loss = float(step_metrics["loss"])
                check_finite(last_loss, step, ckpt, workdir)
                ckpt.save(step, train_state, batches, dict(
                    checkpoint_meta(config, label_stats, step, steps_per_epoch, progress),
                    state_kind="train"))
            if preempted:
                stop_reason = PREEMPTED
            if stop_reason != "completed":
                break
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()

    t_train = time.time() - t_loop - t_eval  # the first step's compilation included
    summary = {
        "workdir": str(workdir), "stop_reason": stop_reason, "start_step": start_step,
        "step": step, "total_steps": total_steps, "epoch": step / steps_per_epoch,
        "steps_per_epoch": steps_per_epoch, "final_loss": last_loss,
        "train_images_per_second": (step - start_step) * global_batch / t_train,
        "wall_seconds": time.time() - t_start, "label_mean_std": list(label_stats),
        "best_step": progress.best_step, "best_srcc": progress.best_srcc,
        "last_eval": last_eval, "num_train_images": len(train_records),
        "num_test_images": len(test_records), "devices": jax.device_count(),
        "checkpoints": str(workdir / checkpointing.LATEST_DIR),
        "best_checkpoint": str(workdir / checkpointing.BEST_DIR),
    }
    if is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=jsonable))
        print(format_summary(summary), flush=True)
    return summary


def define_flags():
    """Command-line flags (defined only when run as a program)."""
    config_flags.DEFINE_config_file("config", None, "Training config file.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs (may be gs://).")
    distributed.define_flags()


def check_workdir(workdir):
    """A workdir must be a folder or not exist yet (it is created)."""
    if is_url(workdir):
        return  # a bucket path: Orbax creates it
    path = epath.Path(os.path.abspath(workdir))
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--workdir {workdir}: {parent} is a file, not a folder; give a "
                            "folder for the run (it is created if it does not exist)")
        if parent.exists():
            break


def check_images(records, data_config, sample=32):
    """Decodes a spread of `sample` training images before any set-up.

    Fails (TooManyBadImagesError, the pipeline's own rule and message) only when
    these alone exceed data.max_bad_fraction of all images, which the run would
    reach anyway; a folder of unreadable files then fails in a second instead of
    after the compilation.
    """
    from hyperiqa_jax.data.pipeline import BadImageTracker, as_source

    source = as_source(records)
    tracker = BadImageTracker(len(source), float(data_config.max_bad_fraction))
    for i in range(0, len(source), max(1, len(source) // sample))[:sample]:
        image, _, name = source[i]
        try:
            data.load_resized(image, data_config.resize, data_config.crop_size, name=name,
                              draft=bool(data_config.decode_draft))
        except data.ImageDecodeError as e:
            tracker.report(e)


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required, e.g. "
                             "--config=configs/demo.py --workdir=runs/demo")
    check_workdir(FLAGS.workdir)
    try:  # multi-host start-up, before anything touches a device
        distributed.initialize()
    except ValueError as e:  # the cluster settings (flags / JAX_* variables) do not fit
        raise ConfigError(str(e)) from e
    # Before any set-up: a wrong setting fails in seconds, not after the compilation.
    check_config(FLAGS.config)
    backbone = FLAGS.config.pretrained_backbone
    steps = (workdir_path(FLAGS.workdir) / checkpointing.LATEST_DIR).glob("[0-9]*")
    fresh_run = not any(steps)  # a resumed run does not load the backbone
    if backbone and fresh_run and not epath.Path(backbone).exists():
        raise ConfigError(
            f"pretrained_backbone {backbone} does not exist: convert timm weights with "
            "`python -m weights_conversion.convert_timm --model NAME --checkpoint FILE --out DIR` "
            "(needs the torch extra) and pass --config.pretrained_backbone=DIR, or '' to train "
            "from scratch")
    records = load_train_test_records(FLAGS.config)
    check_images(records[0], FLAGS.config.data)
    summary = train_and_evaluate(FLAGS.config, FLAGS.workdir, records)
    return exit_status(summary)


def exit_status(summary):
    """0 for a finished run, EXIT_PREEMPTED when SIGTERM stopped it (checkpoint saved).

    With several processes all of them first meet here: a launcher that stops the
    others when one exits non-zero (srun --kill-on-bad-exit) then cannot cut short a
    peer that is still closing its checkpoint or writing the summary.
    """
    if summary["stop_reason"] != PREEMPTED:
        return 0
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("hyperiqa_jax.train preempted exit")
    return EXIT_PREEMPTED


if __name__ == "__main__":
    from hyperiqa_jax import cli

    # Non-finite loss: its message says which checkpoint is good and what to change.
    cli.run(main, define_flags=define_flags, expected=(FloatingPointError,))
