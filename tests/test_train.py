"""Training loop: config errors, sharded step, loss falls, preemption + exact resume."""

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperiqa_jax import checkpointing, train
from hyperiqa_jax.data import device
from hyperiqa_jax.models import build_model
from tests import train_utils

REPO = Path(__file__).resolve().parents[1]


def _config(root, **train_overrides):
    c = train_utils.tiny_config(root=root)
    c.train.update(train_overrides)
    return c


def _final_params(workdir, config):
    """(step, {params[, batch_stats]}) of the latest checkpoint in `workdir`."""
    from hyperiqa_jax import state
    from hyperiqa_jax.models import build_model

    manager_dir, step = checkpointing.find_checkpoint(Path(workdir) / "checkpoints")
    abstract = state.abstract_inference_variables(build_model(config.model),
                                                  config.data.crop_size)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = checkpointing.with_shardings(abstract, sharding)
    return step, checkpointing.restore_variables(manager_dir, step, target)


# ---------------------------------------------------------------------------- config errors


def test_unknown_config_key_is_rejected_with_a_suggestion():
    c = train_utils.tiny_config()
    with c.unlocked():
        c.train.lrr = 1e-3
    with pytest.raises(ValueError, match=r"unknown config key 'train.lrr'.*'train.lr'"):
        train.check_config(c)


def test_crop_step_below_one_is_rejected():
    c = train_utils.tiny_config()
    c.data.crop_step = 0
    with pytest.raises(ValueError, match="data.crop_step=0 must be at least 1"):
        train.check_config(c)


def test_stem_stride_must_divide_the_patch_size():
    c = train_utils.tiny_config()
    c.model.backbone_overrides.update(stem_channels=4, patch_size=4, stem_stride=3)
    with pytest.raises(ValueError, match="stem_stride=3 must be a whole number that divides the "
                                         r"patch size \(4\)"):
        train.check_config(c)
    c.model.backbone_overrides.stem_stride = 2
    train.check_config(c)


def test_cli_rejects_unknown_override(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "hyperiqa_jax.train", "--config=configs/demo.py",
         f"--workdir={tmp_path}", "--config.train.lrr=0.1"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "lrr" in proc.stderr


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.py")
                                        ))
def test_every_config_passes_the_key_check(name):
    config = train_utils.load_config(name)
    train.check_config(config)


def test_missing_data_set_says_what_to_download(tmp_path):
    c = train_utils.tiny_config()
    c.data.name = "koniq10k"
    c.data.root = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="koniq10k.*https://"):
        train.train_and_evaluate(c, str(tmp_path / "wd"))


def test_missing_pretrained_backbone_says_how_to_convert(tmp_path, demo_root):
    c = _config(demo_root)
    c.pretrained_backbone = str(tmp_path / "no_such_weights")
    with pytest.raises(FileNotFoundError, match="weights_conversion.convert_timm"):
        train.train_and_evaluate(c, str(tmp_path / "wd"))


# ---------------------------------------------------------------------------- steps

SHARDED_STEP = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType
sys.path.insert(0, {repo!r})
from tests import train_utils
from hyperiqa_jax import optim, state, train
from hyperiqa_jax.models import build_model
train_utils.enable_compilation_cache()
jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, jax.devices()
c = train_utils.tiny_config()
train.check_config(c)
model = build_model(c.model)
tx = optim.make_optimizer(c.train, 10)
init = lambda r: state.init_train_state(model, tx, c.data.crop_size, r)
abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
rng = np.random.default_rng(0)
batch = {{"image": rng.integers(0, 256, (8, 56, 56, 3), dtype=np.uint8),
          "score": rng.uniform(0, 100, 8).astype(np.float32)}}
results = {{}}
for n in (1, 8):
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
    step, _, sh = train.compile_steps(model, tx, c, (50.0, 20.0), mesh, abstract)
    s = jax.jit(init, out_shardings=sh["state"])(jax.random.PRNGKey(0))
    with jax.set_mesh(mesh):
        for _ in range(2):
            s, m = step(s, jax.device_put(batch, sh["batch"]))
    assert len(s["params"]["hyper"]["fc1_weight_conv"]["kernel"].sharding.device_set) == n
    results[n] = (jax.device_get(s["params"]), jax.device_get(m))
(p1, m1), (p8, m8) = results[1], results[8]
diff = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p1, p8))
scale = jax.tree.leaves(jax.tree.map(lambda a: float(np.max(np.abs(a))), p1))
print(json.dumps({{"loss": [float(m1["loss"]), float(m8["loss"])],
                  "grad_norm": [float(m1["grad_norm"]), float(m8["grad_norm"])],
                  "max_param_diff": max(diff), "max_param": max(scale)}}))
"""


def test_sharded_step_over_8_devices_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED_STEP.format(repo=str(REPO))], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(r["loss"][0], r["loss"][1], rtol=1e-5)
    np.testing.assert_allclose(r["grad_norm"][0], r["grad_norm"][1], rtol=1e-4)
    # Two AdamW steps at lr 1e-3 move parameters by ~2e-3; the 8-way reduction order
    # changes gradients at the rounding level, which AdamW's division by each element's
    # running magnitude scales up where a gradient is itself that small: measured
    # 1.1e-5 apart. Gradients that differ (a missing all-reduce) move them by ~1e-3.
    assert r["max_param_diff"] < 2e-4, r


def test_loss_falls_on_demo_data(tmp_path, demo_root):
    """From random init the training loss falls (fitting the 24 training images)."""
    c = _config(demo_root, epochs=20, lr=1e-3, eval_every_epochs=100, warmup_steps=5)
    c.model.dropout = 0.0
    c.model.drop_path_rate = 0.0
    summary = train.train_and_evaluate(c, str(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 120
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.75 * first, (first, last)
    assert summary["stop_reason"] == "completed"
    assert (tmp_path / "summary.json").exists()
    assert list(tmp_path.glob("tb/events.out.tfevents.*"))
    tests = [r for r in rows if r["split"] == "test"]
    assert tests and {"srcc", "plcc", "krcc", "rmse", "plcc_logistic"} <= set(tests[-1])


def test_sigterm_checkpoint_then_resume_is_bit_identical(tmp_path, demo_root, monkeypatch):
    """6 steps straight == 3 steps, SIGTERM, restart, 3 more steps (params bit-identical)."""
    k = 3
    straight = train.train_and_evaluate(_config(demo_root, max_steps=2 * k), str(tmp_path / "a"))
    assert straight["step"] == 2 * k

    calls = {"n": 0}
    to_global = device.to_global

    def to_global_then_sigterm(batch, sharding):
        calls["n"] += 1
        # Batches are read DEVICE_PREFETCH ahead: this read happens as step k starts, so
        # the signal arrives during step k, which is saved, then the run exits.
        if calls["n"] == k + device.DEVICE_PREFETCH:
            os.kill(os.getpid(), signal.SIGTERM)
        return to_global(batch, sharding)

    monkeypatch.setattr(device, "to_global", to_global_then_sigterm)
    first = train.train_and_evaluate(_config(demo_root, max_steps=2 * k), str(tmp_path / "b"))
    monkeypatch.setattr(device, "to_global", to_global)
    assert first["stop_reason"].startswith("preempted") and first["step"] == k
    second = train.train_and_evaluate(_config(demo_root, max_steps=2 * k), str(tmp_path / "b"))
    assert second["start_step"] == k and second["step"] == 2 * k

    c = _config(demo_root)
    train.check_config(c)
    step_a, state_a = _final_params(tmp_path / "a", c)
    step_b, state_b = _final_params(tmp_path / "b", c)
    assert step_a == step_b == 2 * k
    same = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))),
                        state_a, state_b)
    assert all(jax.tree.leaves(same)), "resumed run differs from the straight run"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, demo_root, monkeypatch):
    wd = str(tmp_path)
    train.train_and_evaluate(_config(demo_root, max_steps=2), wd)
    monkeypatch.setattr(train, "score_loss", lambda pred, target, tc: jnp.mean(pred) * jnp.nan)
    with pytest.raises(FloatingPointError, match="non-finite training loss.*step 2"):
        train.train_and_evaluate(_config(demo_root, max_steps=6), wd)
    c = _config(demo_root)
    train.check_config(c)
    step, state = _final_params(wd, c)
    assert step == 2
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_demo_entry_point_runs_end_to_end(tmp_path, demo_root, capsys):
    from hyperiqa_jax import demo

    # As configs/demo.py: no evaluation inside training; the demo evaluates afterwards.
    c = _config(demo_root, epochs=1, eval_every_epochs=0, final_eval=False)
    result = demo.run_demo(c, tmp_path / "run")
    out = capsys.readouterr().out
    assert "[3/3]" in out and "Demo: test SRCC" in out and "Wall time" in out
    assert "SRCC per distortion" in out
    # The per-distortion SRCC: scipy's on evaluate's per-image predictions of that kind.
    import csv

    from scipy import stats
    with open(os.path.join(demo_root, "manifest.csv"), newline="") as f:
        kinds = {os.path.normpath(os.path.join(demo_root, r["path"])): r["distortion"]
                 for r in csv.DictReader(f)}
    with open(tmp_path / "run" / "eval" / "predictions_demo_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for kind, srcc in result["srcc_per_distortion"].items():
        mine = [r for r in rows if kinds[os.path.normpath(r["path"])] == kind]
        expected = stats.spearmanr([float(r["prediction"]) for r in mine],
                                   [float(r["mos"]) for r in mine])[0]
        assert srcc == pytest.approx(expected, abs=1e-12) or (np.isnan(srcc) and np.isnan(
            expected)), kind
    assert result["summary"]["step"] > 0 and result["results"][0]["num_images"] > 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and not [r for r in rows if r["split"] == "test"]
    assert result["summary"]["best_step"] is None


# ---------------------------------------------------------------------------- loss, loop rules


def _pairwise_hinge(pred, target, margin):
    """The ranking loss written out pair by pair (the closed form `score_loss` vectorises)."""
    total, pairs = 0.0, 0
    for i in range(len(pred)):
        for j in range(len(pred)):
            if target[i] != target[j]:
                sign = 1.0 if target[i] > target[j] else -1.0
                total += max(0.0, margin - sign * (pred[i] - pred[j]))
                pairs += 1
    return total / pairs


@pytest.mark.parametrize("loss", ["l1", "smooth_l1"])
def test_score_loss_matches_its_closed_form(loss):
    pred, target = [3.0, 2.0, 2.05, 0.25], [0.0, 0.0, 4.0, 1.5]
    errors = [p - t for p, t in zip(pred, target)]  # 3, 2, -1.95, -1.25: both Huber branches
    if loss == "l1":
        data_term = sum(abs(e) for e in errors) / 4
    else:
        data_term = sum(0.5 * e * e if abs(e) < 1 else abs(e) - 0.5 for e in errors) / 4
    tc = train_utils.tiny_config().train
    tc.loss, tc.ranking_loss_weight, tc.ranking_margin = loss, 0.0, 0.1
    got = train.score_loss(jnp.array(pred), jnp.array(target), tc)
    assert float(got) == pytest.approx(data_term, rel=1e-6)
    tc.ranking_loss_weight = 0.5
    got = train.score_loss(jnp.array(pred), jnp.array(target), tc)
    hinge = _pairwise_hinge(pred, target, 0.1)
    assert hinge > 0.1  # the example violates the margin
    assert float(got) == pytest.approx(data_term + 0.5 * hinge, rel=1e-6)


def test_step_normalises_uint8_crops_as_the_host_did():
    """The loss of uint8 crops normalised in the step = the model on host-normalised floats."""
    from hyperiqa_jax import data, state

    c = train_utils.tiny_config()
    c.model.dropout = c.model.drop_path_rate = 0.0
    model = build_model(c.model)
    # Compiled: op-by-op dispatch of the model costs far more than one compilation.
    variables = jax.jit(lambda r, d: state.init_variables(model, 56, r, d))(
        jax.random.PRNGKey(0), jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    scores = np.array([10.0, 40.0, 60.0, 90.0], np.float32)
    loss_and_grads = jax.jit(functools.partial(train.loss_and_grads, model=model,
                                               train_config=c.train, label_stats=(50.0, 20.0)))
    loss, _, _ = loss_and_grads(variables["params"], None, {"image": crops, "score": scores},
                                jax.random.PRNGKey(2))
    # The host path before this change: (x / 255 - mean) / std in float64, then float32.
    host = ((crops / 255.0 - data.IMAGENET_MEAN) / data.IMAGENET_STD).astype(np.float32)
    out = jax.jit(functools.partial(model.apply, train=False))(variables, host)["score"]
    expected = train.score_loss(out, (scores - 50.0) / 20.0, c.train)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        loss_and_grads(variables["params"], None, {"image": host, "score": scores},
                       jax.random.PRNGKey(2))


def test_check_config_does_not_change_the_config():
    c = train_utils.tiny_config()
    c.train.eval_batch_size = 0
    before = c.to_dict()
    train.check_config(c)
    assert c.to_dict() == before
    assert train.eval_batch_size(c.train) == c.train.batch_size


def test_patience_stops_early_and_eval_every_steps(tmp_path, demo_root):
    """A learning rate too small to change the SRCC: the second evaluation is no gain."""
    c = _config(demo_root, max_steps=5, eval_every_steps=1, eval_every_epochs=0, patience=1,
                lr=1e-12, schedule="constant", final_eval=False)
    summary = train.train_and_evaluate(c, str(tmp_path))
    assert summary["stop_reason"].startswith("early stopping") and summary["step"] == 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "test"] == [1, 2]
    assert summary["best_step"] == 1
    # The stop is checkpointed, and a rerun does not train on.
    again = train.train_and_evaluate(c, str(tmp_path))
    assert again["start_step"] == 2


def test_resnet_batch_stats_train_and_are_scored(tmp_path, demo_root):
    """C0 (ResNet-50): BatchNorm statistics update in training and are what best/ holds."""
    from hyperiqa_jax import QualityModel, state

    c = train_utils.load_config("resnet50_hyperiqa")
    c.data.update(name="demo", root=demo_root, resize=None, train_crops=1, test_crops=1,
                  eval_protocol="center", num_workers=1, worker_processes=0)
    c.model.dtype = "float32"
    c.train.update(batch_size=2, eval_batch_size=2, max_steps=2, eval_every_epochs=0,
                   log_every_steps=1)
    summary = train.train_and_evaluate(c, str(tmp_path))
    assert summary["step"] == 2 and summary["best_step"] == 2
    init = jax.jit(lambda r, d: state.init_variables(build_model(c.model), 224, r, d))(
        *jax.random.split(jax.random.PRNGKey(c.seed), 3)[:2])
    model = QualityModel.from_checkpoint(str(tmp_path))
    trained = jax.device_get(model.variables)
    assert "batch_stats" in trained
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                         trained["batch_stats"], init["batch_stats"]))
    assert max(moved) > 1e-4  # running means/vars moved towards the batches' statistics


def test_training_starts_from_a_converted_timm_backbone(tmp_path, demo_root):
    """timm Swin weights -> convert -> pretrained_backbone: step 0 holds exactly them."""
    timm = pytest.importorskip("timm")
    from hyperiqa_jax.params_io import save_params
    from weights_conversion import swin as swin_conversion

    c = _config(demo_root, max_steps=1, lr=1e-12, schedule="constant", weight_decay=0.0,
                final_eval=False, eval_every_epochs=0)
    overrides = dict(c.model.backbone_overrides)
    torch_model = timm.models.swin_transformer.SwinTransformer(
        img_size=56, in_chans=3, **overrides, num_classes=0)
    converted = swin_conversion.convert_state_dict(
        torch_model.state_dict(), c.model.backbone, img_size=56, **overrides)
    save_params(tmp_path / "backbone", converted, {"model": "tiny test Swin"})
    c.pretrained_backbone = str(tmp_path / "backbone")
    train.train_and_evaluate(c, str(tmp_path / "run"))
    _, variables = _final_params(tmp_path / "run", c)
    got = jax.tree_util.tree_flatten_with_path(variables["params"]["backbone"])[0]
    want = dict(jax.tree_util.tree_flatten_with_path(converted)[0])
    assert len(got) == len(want)
    for path, value in got:  # one AdamW step at lr 1e-12 moves nothing visible in float32
        np.testing.assert_allclose(np.asarray(value), np.asarray(want[path]), rtol=0,
                                   atol=1e-9)
