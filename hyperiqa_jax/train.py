r"""Trains HyperIQA: sharded jit steps, Orbax checkpoints, evaluation during training.

    python -m hyperiqa_jax.train --config=configs/base.py --workdir=runs/base \
        --config.data.root=/data/koniq10k [--config.train.batch_size=16 ...]

The workdir collects everything: `checkpoints/` (latest K, resumable: rerun the
same command to continue exactly where it stopped), `best/` (best test SRCC,
what evaluate/predict read), `metrics.jsonl`, TensorBoard events in `tb/` and
`summary.json`.

Read top to bottom, the file follows the data: config -> mesh -> input ->
init -> steps -> checkpoint -> loop. The global batch is split along the `data`
mesh axis; parameters and optimiser state are replicated (a parameter-sharding
axis would go into the mesh and `state_sharding`). With several processes each
one reads its own shard of the input and process 0 alone writes logs.
"""

import dataclasses
import difflib
import json
import math
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags
from tqdm import tqdm

from hyperiqa_jax import checkpointing, data, distributed, metrics, optim
from hyperiqa_jax import models as models_lib
from hyperiqa_jax.cli import ConfigError, UserError
from hyperiqa_jax.logs import quiet_library_logs

# Keys a config may have beyond configs/common.py's seed_config, with defaults.
TRAIN_DEFAULTS = dict(
    max_steps=0,             # > 0: stop after this many steps (the schedule still spans epochs).
    eval_every_steps=0,      # > 0: also evaluate every N steps (besides per epoch).
    eval_batch_size=0,       # 0: same as batch_size.
    standardize_labels=False,  # train on (y - mean) / std of the train labels.
    loss="l1",               # "l1" or "smooth_l1" (Huber with delta 1 on the target scale).
    final_eval=True,         # evaluate after the last step (the demo evaluates afterwards instead).
)
# Model keys build_model reads with defaults (not in configs/common.py).
OPTIONAL_MODEL_KEYS = ("hyper_feature_widths", "attention_dropout", "small_target_init",
                       "attention_gate_bias")

DOWNLOAD_HINT = (
    "Converted backbone weights are an Orbax params directory. Download the timm "
    "checkpoint (e.g. swin_base_patch4_window7_224 from huggingface.co/timm) and convert it:\n"
    "  python -m weights_conversion.convert_timm --model NAME --checkpoint FILE --out DIR\n"
    "then pass --config.pretrained_backbone=DIR (or set it to '' to train from scratch).")


# ----------------------------------------------------------------------------
# Config.


def check_config(config):
    """Fills optional keys and rejects unknown keys and values that cannot work.

    Raises `ConfigError` naming the key, so a mistake stops the run before the
    first step instead of failing inside it (or, for a typo, being ignored).
    """
    from configs import common  # The reference key set lives with the configs.

    template = common.seed_config()
    with config.unlocked():
        for key, value in TRAIN_DEFAULTS.items():
            if key not in config.train:
                config.train[key] = value
    allowed = {"": set(template.keys()), "train": set(template.train.keys()) | set(TRAIN_DEFAULTS),
               "data": set(template.data.keys()),
               "model": set(template.model.keys()) | set(OPTIONAL_MODEL_KEYS)}
    for section, keys in allowed.items():
        node = config if not section else config.get(section)
        if node is None:
            raise ConfigError(f"config has no '{section}' section (start from "
                              "configs/common.py's seed_config())")
        for key in node.keys():
            if key not in keys:
                prefix = f"{section}." if section else ""
                where = prefix + key
                close = difflib.get_close_matches(key, sorted(keys), n=1)
                hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
                raise ConfigError(f"unknown config key '{where}'{hint} "
                                  f"(known keys are listed in configs/common.py)")
    _check_values(config)
    tc = config.train
    if tc.eval_batch_size == 0:
        with config.unlocked():
            tc.eval_batch_size = tc.batch_size
    n = jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        if tc[name] % n:
            raise ConfigError(f"train.{name}={tc[name]} must be divisible by the {n} devices")
    return config


# Values that must be at least 1 / at least 0 (`section.key`).
AT_LEAST_ONE = ("train.batch_size", "train.epochs", "train.log_every_steps",
                "train.checkpoint_every_steps", "train.keep_checkpoints", "data.crop_size",
                "data.train_crops", "data.test_crops", "data.mix_images", "data.prefetch",
                "data.crop_step", "model.img_size")
AT_LEAST_ZERO = ("train.max_steps", "train.eval_every_steps", "train.eval_every_epochs",
                 "train.eval_batch_size", "train.patience", "train.warmup_steps",
                 "train.weight_decay", "train.grad_clip", "train.lr_ratio",
                 "train.ranking_loss_weight", "data.num_workers")
CHOICES = {"train.loss": ("l1", "smooth_l1"),
           "train.schedule": ("cosine_epoch", "warmup_cosine", "constant"),
           "data.eval_protocol": ("random", "center", "grid")}
WHY = {"data.crop_step": " (1: crop corners anywhere; 8: on JPEG's 8x8 block grid)",
       "train.eval_batch_size": " (0: the same as train.batch_size)",
       "train.max_steps": " (0: train.epochs decides)"}


def _check_values(config):
    """Counts, ranges and names in the config (see check_config)."""
    from hyperiqa_jax.models.cpu_kernels import KERNELS
    from hyperiqa_jax.models.hyperiqa import ATTENTIONS
    from hyperiqa_jax.models.swin import REMAT, SWIN_CONFIGS, SwinTransformer

    def get(key):
        section, _, name = key.partition(".")
        return config[section].get(name)

    def number(key):
        value = get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return value

    for key in AT_LEAST_ONE:
        if get(key) is not None and number(key) < 1:
            raise ConfigError(f"{key}={get(key)} must be at least 1{WHY.get(key, '')}")
    for key in AT_LEAST_ZERO:
        if get(key) is not None and number(key) < 0:
            raise ConfigError(f"{key}={get(key)} must be at least 0{WHY.get(key, '')}")
    if not number("train.lr") > 0:
        raise ConfigError(f"train.lr={config.train.lr} must be positive")
    if not 0 <= number("data.max_bad_fraction") <= 1:
        raise ConfigError(f"data.max_bad_fraction={config.data.max_bad_fraction} must be "
                          "between 0 and 1 (the fraction of images allowed to fail to decode)")
    choices = dict(CHOICES, **{"model.attention": ATTENTIONS, "model.dtype": models_lib.DTYPES,
                               "model.kernels": KERNELS, "model.remat": REMAT})
    choices["model.backbone"] = tuple(SWIN_CONFIGS) + models_lib.RESNET_BACKBONES
    choices["data.name"] = data.DATASETS
    for key, allowed in choices.items():
        value = get(key)
        if value not in allowed:
            close = (difflib.get_close_matches(str(value), allowed, n=1)
                     or [a for a in allowed if str(value) and str(value) in a])
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}{hint}")
    if config.model.attention == "scale" and not config.model.multi_scale:
        raise ConfigError("model.attention='scale' weighs the four stages: it needs "
                          "model.multi_scale=True")
    overrides = set(dict(config.model.get("backbone_overrides") or {}))
    fields = {f.name for f in dataclasses.fields(SwinTransformer)} - {"parent", "name"}
    if config.model.backbone in SWIN_CONFIGS and overrides - fields:
        raise ConfigError(f"model.backbone_overrides has unknown Swin field(s) "
                          f"{sorted(overrides - fields)}; known: {', '.join(sorted(fields))}")
    try:  # the resize against the crop (the data module's own check)
        data.target_size(config.data.crop_size, config.data.crop_size, config.data.resize,
                         config.data.crop_size)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e) if isinstance(e, ConfigError) else
                          f"data.resize={config.data.resize!r}: {e}") from None


def _log(message):
    """Progress messages from process 0 (absl logging is left to the libraries)."""
    if jax.process_index() == 0:
        tqdm.write(message)


def _config_to_json(config):
    return json.loads(config.to_json_best_effort())


# ----------------------------------------------------------------------------
# Steps (pure functions of the state; jitted with shardings in `compile_steps`).


def init_state(model, tx, config, rng):
    """The train state: {step, params, opt_state, rng[, batch_stats]} (plain dict)."""
    crop = config.data.crop_size
    init_rng, dropout_rng, train_rng = jax.random.split(rng, 3)
    variables = model.init({"params": init_rng, "dropout": dropout_rng},
                           jnp.zeros((1, crop, crop, 3), jnp.float32), train=False)
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
             "opt_state": tx.init(variables["params"]), "rng": train_rng}
    if "batch_stats" in variables:
        state["batch_stats"] = variables["batch_stats"]
    return state


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


def train_step(state, batch, *, model, tx, train_config, label_stats):
    """One optimiser step; returns (new state, {loss, grad_norm})."""
    mean, std = label_stats
    target = (batch["score"] - mean) / std
    rng = jax.random.fold_in(state["rng"], state["step"])
    has_bn = "batch_stats" in state

    def loss_fn(params):
        variables = {"params": params}
        if has_bn:
            variables["batch_stats"] = state["batch_stats"]
        out, updates = model.apply(variables, batch["image"], train=True, rngs={"dropout": rng},
                                   mutable=["batch_stats"] if has_bn else [])
        return score_loss(out["score"].astype(jnp.float32), target, train_config), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    param_updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = dict(state, step=state["step"] + 1, opt_state=opt_state,
                     params=jax.tree.map(jnp.add, state["params"], param_updates))
    if has_bn:
        new_state["batch_stats"] = updates["batch_stats"]
    return new_state, {"loss": loss, "grad_norm": _global_norm(grads)}


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def predict_step(variables, images, *, model, label_stats):
    """Scores in label units (un-standardised) for a batch of crops."""
    mean, std = label_stats
    out = model.apply(variables, images, train=False)
    return out["score"].astype(jnp.float32) * std + mean


def inference_variables(state):
    variables = {"params": state["params"]}
    if "batch_stats" in state:
        variables["batch_stats"] = state["batch_stats"]
    return variables


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

    # Eval returns index and validity with the scores, all replicated: each process then
    # knows which image every score belongs to whatever the row order across processes.
    def eval_fn(variables, batch):
        return (predict_step(variables, batch["image"], model=model, label_stats=stats),
                batch["image_index"], batch["valid"])

    evaluate = jax.jit(eval_fn, out_shardings=repl)
    return train, evaluate, dict(state=state_sharding, batch=batch_sharding, repl=repl)


def to_global(local_batch, batch_sharding):
    """This process's slice of the batch -> one global array per key."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}


def local_slice(global_batch):
    """This process's rows of a batch that every process produced in full."""
    n, i = jax.process_count(), jax.process_index()
    return {k: v[len(v) // n * i: len(v) // n * (i + 1)] for k, v in global_batch.items()}


def run_evaluation(evaluate, variables, records, config, batch_sharding, label_protocol=None):
    """Per-image predictions (crop scores averaged) and metrics on `records`."""
    preds, indices, valids = [], [], []
    for batch in data.make_eval_batches(records, config.data,
                                        batch_size=config.train.eval_batch_size, seed=0,
                                        protocol=label_protocol):
        p, idx, ok = evaluate(variables, to_global(local_slice(batch), batch_sharding))
        preds.append(np.asarray(p))
        indices.append(np.asarray(idx))
        valids.append(np.asarray(ok))
    per_image = data.average_by_image(np.concatenate(preds), np.concatenate(indices),
                                      np.concatenate(valids), len(records))
    per_image = np.asarray(per_image)
    mos = np.array([r.score for r in records], np.float64)
    ok = np.isfinite(per_image)  # images that failed to decode have no prediction
    return per_image, metrics.compute_all(per_image[ok], mos[ok])


# ----------------------------------------------------------------------------
# Logging (process 0 only).


class MetricWriter:
    """metrics.jsonl (one JSON object per line) and TensorBoard scalars."""

    def __init__(self, workdir):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.path = Path(workdir) / "metrics.jsonl"
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(Path(workdir) / "tb"))
        except ImportError:  # TensorBoard is optional; metrics.jsonl is the record.
            self.tb = None

    def write(self, step, epoch, split, values):
        if not self.enabled:
            return
        row = {"step": int(step), "epoch": epoch, "split": split,
               **{k: _jsonable(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{split}/{k}", v, int(step))

    def close(self):
        if self.enabled and self.tb is not None:
            self.tb.close()


def _jsonable(v):
    v = float(v) if isinstance(v, (np.floating, np.integer, jax.Array)) else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


# ----------------------------------------------------------------------------
# The run.


def load_train_test_records(config):
    """Train and test records (the data module's errors say what to download where)."""
    dc = config.data
    kw = dict(label=dc.label or None, seed=config.seed)
    return (data.load_records(dc.name, dc.root, dc.train_split, **kw),
            data.load_records(dc.name, dc.root, dc.test_split, **kw))


def load_pretrained_backbone(path, backbone_params):
    """Converted backbone params from `path`, checked against the model's shapes."""
    from hyperiqa_jax import params_io

    if not Path(path).exists():
        raise FileNotFoundError(f"pretrained_backbone {path} does not exist.\n{DOWNLOAD_HINT}")
    loaded, _ = params_io.load_params(path)
    if set(loaded) == {"backbone"}:
        loaded = loaded["backbone"]
    want = {jax.tree_util.keystr(k): v.shape
            for k, v in jax.tree_util.tree_flatten_with_path(backbone_params)[0]}
    got = {jax.tree_util.keystr(k): np.shape(v)
           for k, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    if want != got:
        missing = sorted(set(want) - set(got))[:5]
        extra = sorted(set(got) - set(want))[:5]
        shape = [k for k in set(want) & set(got) if want[k] != got[k]][:5]
        raise ConfigError(f"pretrained_backbone {path} does not fit the configured backbone: "
                          f"missing {missing}, unexpected {extra}, wrong shape {shape}. "
                          "Convert the checkpoint that matches config.model.backbone.")
    return jax.tree.map(lambda ref, x: np.asarray(x, ref.dtype), backbone_params, loaded)


class _StopSignal:
    """Turns SIGTERM into a flag read at step boundaries (checkpoint, then exit)."""

    def __init__(self):
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

    def any_process(self):
        if jax.process_count() == 1:
            return self.received
        from jax.experimental import multihost_utils
        return bool(multihost_utils.process_allgather(np.array(self.received)).any())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from `workdir` if it holds a checkpoint); returns the run summary."""
    check_config(config)
    tc = config.train
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    t_start = time.time()

    # ---- Mesh: one `data` axis over every device of every process.
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))

    # ---- Input: this process's shard of the train set; the test set in full.
    train_records, test_records = load_train_test_records(config)
    if not train_records:
        raise UserError(f"no training images in {config.data.name} ({config.data.root})")
    scores = np.array([r.score for r in train_records], np.float64)
    label_stats = ((float(scores.mean()), float(scores.std()) or 1.0)
                   if tc.standardize_labels else (0.0, 1.0))
    global_batch = tc.batch_size
    local_batch = global_batch // jax.process_count()
    steps_per_epoch = data.steps_per_epoch(len(train_records), config.data, global_batch)
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch
    train_ds = data.make_train_dataset(
        train_records, config.data, batch_size=local_batch, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    train_iter = iter(train_ds)

    # ---- Model, optimiser and initial state (shapes first, then a sharded init).
    model = models_lib.build_model(config.model)
    tx = optim.make_optimizer(tc, steps_per_epoch)
    rng = jax.random.PRNGKey(config.seed)
    init_fn = lambda r: init_state(model, tx, config, r)
    abstract_state = jax.eval_shape(init_fn, rng)
    train_fn, eval_fn, shardings = compile_steps(model, tx, config, label_stats, mesh,
                                                 abstract_state)

    # ---- Checkpoint: resume if the workdir has one, else initialise.
    ckpt = checkpointing.Checkpointer(workdir, keep=tc.keep_checkpoints)
    resume_step = ckpt.latest_step()
    run_meta = {"best_srcc": None, "best_step": None, "evals_since_best": 0}
    if resume_step is not None:
        target = checkpointing.with_shardings(abstract_state, shardings["state"])
        # The grain iterator state is saved per process; a checkpoint from another
        # process count has none for this layout, so the data position is rebuilt
        # from the step count (skip that many batches of this process's stream).
        iter_file = (Path(str(ckpt.latest.directory)) / str(resume_step) / "data_iter" /
                     f"process_{jax.process_index()}-of-{jax.process_count()}.json")
        same_layout = iter_file.exists()
        state, meta = ckpt.restore(resume_step, target, train_iter if same_layout else None)
        if not same_layout:
            _log(f"Checkpoint written by another process count: skipping {resume_step} "
                 "batches of the input to its position")
            for _ in range(resume_step):
                next(train_iter)
        run_meta.update({k: meta.get(k, v) for k, v in run_meta.items()})
        label_stats_saved = tuple(meta["label_mean_std"])
        if not np.allclose(label_stats_saved, label_stats):
            raise UserError(f"the training labels changed since the checkpoint in {workdir} was "
                            "written: use a new --workdir, or the data it was trained on")
        _log(f"Resumed from {ckpt.latest.directory} at step {resume_step}")
    else:
        state = jax.jit(init_fn, out_shardings=shardings["state"])(rng)
        if config.pretrained_backbone:
            backbone = load_pretrained_backbone(config.pretrained_backbone,
                                                abstract_state["params"]["backbone"])
            params = dict(state["params"], backbone=backbone)
            state["params"] = jax.device_put(params, shardings["state"]["params"])
    start_step = int(state["step"])

    def meta_now(step, extra=None):
        return {"config": _config_to_json(config), "label_mean_std": list(label_stats),
                "step": int(step), "epoch": step / steps_per_epoch, **run_meta, **(extra or {})}

    # ---- Loop.
    writer = MetricWriter(workdir)
    if is_main:
        n_params = sum(x.size for x in jax.tree.leaves(abstract_state["params"]))
        _log(f"{len(train_records)} train / {len(test_records)} test images, {steps_per_epoch} "
             f"steps/epoch, {total_steps} steps, {n_params / 1e6:.2f}M params, "
             f"{jax.device_count()} device(s)")
    stop_reason, last_eval = "completed", None
    last_loss, steps_done, t_train = None, 0, 0.0

    def evaluate(step):
        nonlocal last_eval, stop_reason
        t0 = time.time()
        _, m = run_evaluation(eval_fn, inference_variables(state), test_records, config,
                              shardings["batch"])
        m["eval_seconds"] = time.time() - t0
        writer.write(step, step / steps_per_epoch, "test", m)
        last_eval = dict(m, step=step)
        srcc = m["srcc"] if math.isfinite(m["srcc"]) else -math.inf
        if run_meta["best_srcc"] is None or srcc > run_meta["best_srcc"]:
            run_meta.update(best_srcc=srcc, best_step=step, evals_since_best=0)
            ckpt.save_best(step, inference_variables(state),
                           meta_now(step, {"metrics": m, "state_kind": "inference"}))
        else:
            run_meta["evals_since_best"] += 1
            if tc.patience and run_meta["evals_since_best"] >= tc.patience:
                stop_reason = f"early stopping (no SRCC gain in {tc.patience} evaluations)"
        if is_main:
            _log(f"step {step} test: SRCC {m['srcc']:.4f} PLCC {m['plcc']:.4f} "
                 f"KRCC {m['krcc']:.4f} RMSE {m['rmse']:.3f} ({m['eval_seconds']:.1f}s)")

    def check_finite(loss, step):
        if not math.isfinite(loss):
            ckpt.wait()
            good = ckpt.latest_step()
            raise FloatingPointError(
                f"non-finite training loss ({loss}) at step {step}. Stopped without saving; "
                f"the last good checkpoint is step {good} in {workdir / 'checkpoints'}. "
                "Lower train.lr, keep train.grad_clip on, or check the labels.")

    bar = None
    if is_main:
        bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                   dynamic_ncols=True, file=sys.stderr)
    pending, t_log, images_since_log = None, time.time(), 0
    step = start_step
    with jax.set_mesh(mesh), _StopSignal() as stop:
        while step < total_steps:
            batch = to_global(next(train_iter), shardings["batch"])
            t0 = time.time()
            state, step_metrics = train_fn(state, batch)
            step += 1
            # Read the previous step's loss: the device is already busy with this one.
            if pending is not None:
                last_loss = float(pending[1]["loss"])
                check_finite(last_loss, pending[0])
            pending = (step, step_metrics)
            steps_done += 1
            images_since_log += global_batch
            t_train += time.time() - t0

            epoch_end = step % steps_per_epoch == 0
            if step % tc.log_every_steps == 0 or step == total_steps:
                m = jax.device_get(step_metrics)
                last_loss = float(m["loss"])
                check_finite(last_loss, step)
                ips = images_since_log / max(time.time() - t_log, 1e-9)
                lrs = {f"lr_{k}": float(s(step - 1)) for k, s in
                       optim.lr_schedules(tc, steps_per_epoch).items()}
                writer.write(step, step / steps_per_epoch, "train",
                             {"loss": last_loss, "grad_norm": float(m["grad_norm"]),
                              "images_per_second": ips, **lrs})
                t_log, images_since_log = time.time(), 0
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{ips:.1f}")
            if bar is not None:
                bar.update(1)

            do_eval = ((epoch_end and tc.eval_every_epochs
                        and (step // steps_per_epoch) % tc.eval_every_epochs == 0)
                       or (tc.eval_every_steps and step % tc.eval_every_steps == 0)
                       or (step == total_steps and tc.final_eval))
            if do_eval:
                evaluate(step)
            preempted = stop.any_process()
            if (step % tc.checkpoint_every_steps == 0 or epoch_end or do_eval
                    or step == total_steps or preempted or stop_reason != "completed"):
                last_loss = float(step_metrics["loss"])
                check_finite(last_loss, step)
                ckpt.save(step, state, train_iter, meta_now(step, {"state_kind": "train"}))
            if preempted:
                stop_reason = "preempted (SIGTERM): checkpoint saved, rerun to resume"
            if stop_reason != "completed":
                break
    if bar is not None:
        bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()

    summary = {
        "workdir": str(workdir), "stop_reason": stop_reason, "start_step": start_step,
        "step": step, "total_steps": total_steps, "epoch": step / steps_per_epoch,
        "steps_per_epoch": steps_per_epoch, "final_loss": last_loss,
        "train_images_per_second": steps_done * global_batch / t_train if t_train else None,
        "wall_seconds": time.time() - t_start, "label_mean_std": list(label_stats),
        "best_step": run_meta["best_step"], "best_srcc": run_meta["best_srcc"],
        "last_eval": last_eval, "num_train_images": len(train_records),
        "num_test_images": len(test_records), "devices": jax.device_count(),
        "checkpoints": str(workdir / checkpointing.LATEST_DIR),
        "best_checkpoint": str(workdir / checkpointing.BEST_DIR),
    }
    if is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
        print(format_summary(summary), flush=True)
    return summary


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


def define_flags():
    """Command-line flags (defined only when run as a program)."""
    config_flags.DEFINE_config_file("config", None, "Training config file.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")


def check_workdir(workdir):
    """A workdir must be a folder or not exist yet (it is created)."""
    path = Path(workdir)
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
    from hyperiqa_jax.data.pipeline import BadImageTracker

    tracker = BadImageTracker(len(records), float(data_config.max_bad_fraction))
    for record in records[::max(1, len(records) // sample)][:sample]:
        try:
            data.load_resized(record.path, data_config.resize, data_config.crop_size,
                              draft=bool(data_config.get("decode_draft", False)))
        except data.ImageDecodeError as e:
            tracker.report(e)


def main(argv):
    FLAGS = flags.FLAGS
    quiet_library_logs()
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
    # Both again inside train_and_evaluate; here before any set-up (seconds, not minutes).
    check_config(FLAGS.config)
    backbone = FLAGS.config.pretrained_backbone
    steps = (Path(FLAGS.workdir) / checkpointing.LATEST_DIR).glob("[0-9]*")
    fresh_run = not any(steps)  # a resumed run does not load the backbone
    if backbone and fresh_run and not Path(backbone).exists():
        raise ConfigError(
            f"pretrained_backbone {backbone} does not exist: convert timm weights with "
            "`python -m weights_conversion.convert_timm --model NAME --checkpoint FILE --out DIR` "
            "(needs the torch extra) and pass --config.pretrained_backbone=DIR, or '' to train "
            "from scratch")
    check_images(load_train_test_records(FLAGS.config)[0], FLAGS.config.data)
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    from hyperiqa_jax import allocator, cli

    allocator.preload(__name__)
    # Non-finite loss: its message says which checkpoint is good and what to change.
    cli.run(main, define_flags=define_flags, expected=(FloatingPointError,))
