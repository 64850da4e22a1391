"""Orbax checkpoints of a training run.

Layout of a workdir:

    checkpoints/<step>/{state, data_iter, meta}   the latest K, for resuming
    best/<step>/{state, meta}                     the best by test SRCC, for scoring

The best checkpoint lives in its own manager: Orbax's `best_fn` retention can
evict the newest checkpoint, which would break resuming. `state` is the full
train state (params, optimiser state, rng, step); the best copy holds only what
inference needs (params, batch_stats). `data_iter` is the grain iterator, so a
resumed run sees exactly the next batch. `meta` is JSON: the config, label
statistics and the metrics at that step, so a checkpoint is self-describing.

Restores go into abstract targets (`jax.ShapeDtypeStruct` with a sharding), so
a checkpoint written on N devices loads onto M.

Scoring, evaluation and export restore through one call,
`load_for_inference(path)`: whatever the user points at (a workdir, best/,
checkpoints/ or one step folder) -> the run's config, its model and the model
variables {params[, batch_stats]}, with a one-line UserError for each way that
can fail.
"""

import dataclasses
import os
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from hyperiqa_jax import config_defaults, models, state
from hyperiqa_jax.errors import UserError

LATEST_DIR = "checkpoints"
BEST_DIR = "best"


class Checkpointer:
    """The latest-K and best-by-SRCC checkpoint managers of one workdir."""

    def __init__(self, workdir, keep=2, async_save=True):
        workdir = Path(workdir).absolute()
        options = dict(create=True, enable_async_checkpointing=async_save)
        self.latest = ocp.CheckpointManager(
            workdir / LATEST_DIR,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, **options),
            item_names=("state", "data_iter", "meta"))
        self.best = ocp.CheckpointManager(
            workdir / BEST_DIR,
            options=ocp.CheckpointManagerOptions(max_to_keep=1, **options),
            item_names=("state", "meta"))

    def latest_step(self):
        return self.latest.latest_step()

    def save(self, step, state, data_iter, meta):
        """Saves the resumable state (async; errors surface at the next wait)."""
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta)), force=True)

    def save_best(self, step, inference_state, meta):
        if step in self.best.all_steps():
            return
        self.best.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(inference_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def has_data_position(self, step):
        """Whether `step` saved the data iterator for this process layout.

        Grain saves one iterator state per process; a checkpoint written by another
        process count has none for this one.
        """
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return (self.latest.directory / str(step) / "data_iter" / name).exists()

    def restore(self, step, abstract_state, data_iter=None):
        """Restores `state` (into `abstract_state`'s shardings) and the data iterator."""
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.latest.restore(step, args=ocp.args.Composite(**items))
        return restored.state, restored.meta

    def wait(self):
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self):
        self.latest.close()
        self.best.close()


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (for restoring onto any mesh).

    shardings: one sharding for every leaf, or a tree of them.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract_tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def find_checkpoint(path):
    """Resolves what a user points at to (manager directory, step).

    Accepts a workdir (prefers best/, else the latest of checkpoints/), a
    best/ or checkpoints/ directory (its newest step), or one step directory.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    for sub in (BEST_DIR, LATEST_DIR):
        if _steps(path / sub):
            return path / sub, max(_steps(path / sub))
    if _steps(path):
        return path, max(_steps(path))
    if path.name.isdigit() and (path / "meta").is_dir():
        return path.parent, int(path.name)
    raise FileNotFoundError(
        f"no checkpoint found under {path}: expected a training workdir (with {BEST_DIR}/ or "
        f"{LATEST_DIR}/), one of those folders, or a step folder inside one")


def _steps(directory):
    if not directory.is_dir():
        return []
    return [int(p.name) for p in directory.iterdir()
            if p.name.isdigit() and (p / "state").is_dir() and (p / "meta").is_dir()]


def read_meta(manager_dir, step):
    """The JSON `meta` item of one checkpoint (config, label statistics, metrics)."""
    with ocp.CheckpointManager(Path(manager_dir), item_names=("meta",),
                               options=ocp.CheckpointManagerOptions(create=False)) as m:
        return m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore_state(manager_dir, step, abstract_state):
    """Restores only the `state` item of one checkpoint into `abstract_state`."""
    with ocp.CheckpointManager(Path(manager_dir), item_names=("state",),
                               options=ocp.CheckpointManagerOptions(create=False)) as m:
        return m.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state))).state


def restore_variables(manager_dir, step, abstract_variables):
    """Restores only the model variables {params[, batch_stats]} of a checkpoint's `state`.

    Works for a train state (its optimiser state is left on disk) and for the
    inference variables that best/ holds.
    """
    target = ocp.args.PyTreeRestore(
        abstract_variables, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_variables))
    with ocp.CheckpointManager(Path(manager_dir), item_names=("state",),
                               options=ocp.CheckpointManagerOptions(create=False)) as m:
        return m.restore(step, args=ocp.args.Composite(state=target)).state


def config_from_meta(meta):
    """The run's ConfigDict: its saved config over config_defaults.reference_config().

    Keys added to the configs after the run was written take their defaults;
    JSON lists turn back into tuples.
    """
    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x
    config = config_defaults.reference_config().to_dict()
    for section, values in tuples(meta["config"]).items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section].update(values)
        else:
            config[section] = values
    return ml_collections.ConfigDict(config)


# ---------------------------------------------------------------------------- inference


@dataclasses.dataclass(frozen=True)
class InferenceCheckpoint:
    """What scoring needs of a checkpoint: its config, model, variables and meta."""

    config: ml_collections.ConfigDict
    model: models.HyperIQA
    variables: dict          # {params[, batch_stats]}
    meta: dict               # the checkpoint's JSON meta item
    directory: Path          # the manager folder (best/ or checkpoints/)
    step: int

    @property
    def source(self) -> str:
        """'<manager folder>/<step>': names the checkpoint in outputs and logs."""
        return f"{self.directory}/{self.step}"

    @property
    def label_stats(self) -> tuple[float, float]:
        """(mean, std) that turn the model's output into label units."""
        return tuple(float(x) for x in self.meta.get("label_mean_std", (0.0, 1.0)))

    @property
    def workdir(self) -> Path | None:
        """The training workdir holding this checkpoint, if it sits in one."""
        if self.directory.name in (BEST_DIR, LATEST_DIR):
            return self.directory.parent
        return None


def resolve_checkpoint(path):
    """`find_checkpoint`, saying what --checkpoint takes when `path` does not exist."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint path {os.path.abspath(path)} does not exist; --checkpoint "
                        "takes a training workdir (e.g. runs/demo, which `make demo` writes), "
                        "its best/ or checkpoints/ folder, or one step folder")
    return find_checkpoint(path)


def load_for_inference(path, sharding=None) -> InferenceCheckpoint:
    """Restores what scoring needs from a workdir (best, else latest), best/, checkpoints/
    or a step folder.

    Reads the meta item, rebuilds the run's config and model, and restores only the
    model variables (a train state's optimiser state stays on disk) onto `sharding`
    (default: the first local device). Raises a one-line UserError when the path
    holds no checkpoint, its meta is unreadable or holds no training config, or its
    parameters do not fit the model its config describes.
    """
    manager_dir, step = resolve_checkpoint(path)
    where = f"checkpoint {manager_dir}/{step}"
    try:
        meta = read_meta(manager_dir, step)
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: its meta item cannot be read ({_first_line(e)}); point "
                        "--checkpoint at a run written by hyperiqa_jax.train") from e
    if not {"model", "data", "train"} <= set(meta.get("config") or {}):
        raise UserError(f"{where}: its meta item holds no training config; point "
                        "--checkpoint at a run written by hyperiqa_jax.train")
    config = config_from_meta(meta)
    model = models.build_model(config.model)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = with_shardings(state.abstract_inference_variables(model, config.data.crop_size),
                            sharding)
    try:
        variables = restore_variables(manager_dir, step, target)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{where}: its parameters cannot be restored into the model its "
                        f"config describes ({_first_line(e)}); was it written by another "
                        "version of this code, or only partly?") from e
    return InferenceCheckpoint(config=config, model=model, variables=variables, meta=meta,
                               directory=manager_dir, step=step)


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------------------- checkpoint fit
# Whether a checkpoint's arrays fit a target tree, read from Orbax's metadata alone
# (shapes and dtypes, no array data), so that a mismatch is named before a restore fails.


def key_path_name(path):
    """'params/backbone/patch_embed/proj/kernel' for a jax key path (dict keys, indices, fields)."""
    def name(key):
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)
    return "/".join(name(k) for k in path)


def array_specs(tree):
    """{path name: (shape, dtype name)} of a tree of arrays, ShapeDtypeStructs or Orbax metadata."""
    return {key_path_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def saved_array_specs(manager_dir, step, item="state"):
    """`array_specs` of one checkpoint's `item`, from its metadata (raises if it cannot be read)."""
    directory = epath.Path(str(manager_dir)) / str(step) / item
    return array_specs(ocp.StandardCheckpointHandler().metadata(directory))


def _spec_text(spec):
    shape, dtype = spec
    return f"{dtype}[{','.join(str(s) for s in shape)}]"


def spec_differences(saved, expected):
    """Readable differences between a checkpoint's array specs and the expected ones.

    Model parameters come first; when any of them differ, the optimiser state's
    copies of the same differences are left out.
    """
    lines = []
    for path in sorted(set(saved) | set(expected), key=lambda p: (not p.startswith("params/"), p)):
        if path not in expected:
            lines.append((path, f"{path}: {_spec_text(saved[path])} in the checkpoint, absent "
                                "here"))
        elif path not in saved:
            lines.append((path, f"{path}: {_spec_text(expected[path])} here, absent in the "
                                "checkpoint"))
        elif saved[path] != expected[path]:
            lines.append((path, f"{path}: {_spec_text(saved[path])} in the checkpoint, "
                                f"{_spec_text(expected[path])} here"))
    in_params = [text for path, text in lines if path.startswith("params/")]
    return in_params or [text for _, text in lines]


def restore_latest_meta(checkpointer, step):
    """The `meta` item (JSON: config, label statistics) of a Checkpointer's resumable `step`."""
    return checkpointer.latest.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta


def meta_file(manager_dir, step):
    """The JSON file that holds one checkpoint's `meta` item (config, label statistics)."""
    return epath.Path(str(manager_dir)) / str(step) / "meta" / "metadata"
