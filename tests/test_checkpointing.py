"""Checkpoints: retention (latest K + separate best), iterator state, other device counts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperiqa_jax import checkpointing
from tests import train_utils

REPO = Path(__file__).resolve().parents[1]


def _state(value):
    return {"step": jnp.asarray(value, jnp.int32), "params": {"w": jnp.full((3, 2), float(value))},
            "rng": jax.random.PRNGKey(value)}


def _iterator():
    return iter(grain.MapDataset.range(100).seed(0).shuffle().repeat().batch(4)
                .to_iter_dataset())


def test_latest_k_and_best_are_kept_separately(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, keep=2)
    it = _iterator()
    for step in range(1, 6):
        next(it)
        ckpt.save(step, _state(step), it, {"step": step, "state_kind": "train"})
        if step == 2:  # the best SRCC happens early: it must survive, and not evict the newest
            ckpt.save_best(step, {"params": _state(step)["params"]},
                           {"step": step, "state_kind": "inference"})
    ckpt.wait()
    assert ckpt.latest.all_steps() == [4, 5]
    assert ckpt.best.all_steps() == [2]
    assert ckpt.latest_step() == 5
    ckpt.close()
    # A workdir resolves to its best checkpoint; checkpoints/ to its newest step.
    assert checkpointing.find_checkpoint(tmp_path) == (tmp_path / "best", 2)
    assert checkpointing.find_checkpoint(tmp_path / "checkpoints") == (tmp_path / "checkpoints", 5)
    assert checkpointing.find_checkpoint(tmp_path / "checkpoints" / "4") == (
        tmp_path / "checkpoints", 4)
    assert checkpointing.read_meta(tmp_path / "best", 2)["state_kind"] == "inference"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpointing.find_checkpoint(tmp_path / "checkpoints" / "4" / "meta")


def test_restore_state_and_data_iterator(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, keep=3)
    it = _iterator()
    for _ in range(3):
        next(it)
    ckpt.save(3, _state(3), it, {"step": 3})
    ckpt.wait()
    expected_next = next(it)

    fresh = _iterator()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = checkpointing.with_shardings(jax.eval_shape(lambda: _state(0)),
                                          jax.tree.map(lambda _: sharding, _state(0)))
    state, meta = ckpt.restore(3, target, fresh)
    ckpt.close()
    assert meta == {"step": 3}
    np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 3.0))
    np.testing.assert_array_equal(state["rng"], jax.random.PRNGKey(3))
    np.testing.assert_array_equal(next(fresh), expected_next)


SAVE_ON_8 = r"""
import json, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, {repo!r})
from tests import train_utils
from hyperiqa_jax import optim, state as state_lib, train
from hyperiqa_jax.models import build_model
train_utils.enable_compilation_cache()
assert jax.device_count() == 8
c = train_utils.tiny_config()
c.train.lr = 1e-2
model, state = train_utils.save_init_checkpoint({workdir!r}, c)
# One step so the optimiser state is not all zeros, then save that sharded over 8 devices.
tx = optim.make_optimizer(c.train, 1)
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
abstract = jax.eval_shape(lambda r: state_lib.init_train_state(model, tx, 56, r),
                          jax.random.PRNGKey(0))
step, _, sh = train.compile_steps(model, tx, c, (50.0, 20.0), mesh, abstract)
state = jax.device_put(state, sh["state"])
rng = np.random.default_rng(0)
batch = {{"image": rng.integers(0, 256, (8, 56, 56, 3), dtype=np.uint8),
          "score": rng.uniform(0, 100, 8).astype(np.float32)}}
with jax.set_mesh(mesh):
    state, _ = step(state, jax.device_put(batch, sh["batch"]))
from hyperiqa_jax import checkpointing
import grain
ckpt = checkpointing.Checkpointer({workdir!r})
ckpt.save(1, state, iter(grain.MapDataset.range(4).to_iter_dataset()),
          {{"config": json.loads(c.to_json_best_effort()), "label_mean_std": [50.0, 20.0],
           "step": 1, "state_kind": "train"}})
ckpt.wait()
leaves = jax.tree.leaves(jax.device_get(state))
np.savez({workdir!r} + "/leaves.npz", *leaves)
print(len(state["params"]["hyper"]["fc1_weight_conv"]["kernel"].sharding.device_set))
"""


def test_checkpoint_from_8_devices_restores_on_1(tmp_path):
    """Parameters and optimiser state saved sharded over 8 devices load onto 1."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c",
                           SAVE_ON_8.format(repo=str(REPO), workdir=str(tmp_path))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "8"

    from hyperiqa_jax import optim
    from hyperiqa_jax import state as state_lib
    from hyperiqa_jax.models import build_model

    assert jax.device_count() == 1
    meta = checkpointing.read_meta(tmp_path / "checkpoints", 1)
    config = checkpointing.config_from_meta(meta)
    tx = optim.make_optimizer(config.train, 1)
    abstract = jax.eval_shape(
        lambda r: state_lib.init_train_state(build_model(config.model), tx, 56, r),
        jax.random.PRNGKey(0))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = checkpointing.with_shardings(abstract, sharding)
    state = checkpointing.restore_state(tmp_path / "checkpoints", 1, target)
    saved = np.load(tmp_path / "leaves.npz")
    leaves = jax.tree.leaves(state)
    assert len(leaves) == len(saved.files)
    for i, leaf in enumerate(leaves):
        np.testing.assert_array_equal(np.asarray(leaf), saved[f"arr_{i}"])
    assert int(state["step"]) == 1
    # The Adam moments came back too (non-zero after one step).
    mu = jax.tree.leaves(state["opt_state"])
    assert any(np.any(np.asarray(x) != 0) for x in mu if np.asarray(x).ndim > 0)


def test_config_round_trips_through_meta():
    c = train_utils.tiny_config()
    meta = {"config": json.loads(c.to_json_best_effort())}
    back = checkpointing.config_from_meta(meta)
    assert back.model.backbone_overrides.depths == (1, 1, 1, 1)
    assert back.train.lr == c.train.lr
    assert back.to_dict() == c.to_dict()


def test_config_of_an_older_run_gets_the_new_keys_defaults():
    from hyperiqa_jax import config_defaults

    c = train_utils.tiny_config()
    saved = json.loads(c.to_json_best_effort())
    del saved["data"]["worker_processes"], saved["train"]["stop_check_every_steps"]
    back = checkpointing.config_from_meta({"config": saved})
    defaults = config_defaults.reference_config()
    assert back.data.worker_processes == defaults.data.worker_processes
    assert back.train.stop_check_every_steps == defaults.train.stop_check_every_steps
    assert back.data.crop_size == c.data.crop_size == 56
