"""The throughput benchmark: both frameworks, consistent numbers, and the JAX step users run.

Speed itself is measured by the benchmark command, never asserted here.
"""

import json

import jax
import numpy as np
import pytest

from benchmarks import throughput


def spy(monkeypatch, module, name):
    """Counts the calls (traces, under jit) of module.name while delegating to it."""
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_vs_runs_both_frameworks(capsys, monkeypatch):
    from hyperiqa_jax import cli, train

    evaluated = spy(monkeypatch, train, "eval_step")
    assert cli.call(throughput.main, ["--vs", "--model", "nano", "--mode", "eval", "--batch",
                                      "1", "--repeats", "2", "--json"],
                    define_flags=throughput.define_flags) == 0
    assert evaluated  # the eval step is training's evaluation step
    result = json.loads(capsys.readouterr().out)
    assert set(result["frameworks"]) == {"jax", "torch"}
    jax_entry, torch_entry = result["frameworks"]["jax"], result["frameworks"]["torch"]
    for entry in (jax_entry, torch_entry):
        assert len(entry["times_s"]) == 2
        assert entry["median_s"] == pytest.approx(np.median(entry["times_s"]))
        assert entry["images_per_s"] == pytest.approx(1 / entry["median_s"])
    # XLA's count of the compiled step (optimised HLO) against the unoptimised one: the
    # same model, so close; the nano model's forward is tens of MFLOPs per image.
    assert 1e7 < jax_entry["flops_per_step"] < 1e9
    assert jax_entry["flops_per_step"] == pytest.approx(jax_entry["flops_lowered"], rel=0.2)
    assert jax_entry["mfu"] is None  # no peak known for the CPU
    assert torch_entry["layout"] == "nchw" and torch_entry["compiled"] is False
    ratios = [t / j for j, t in zip(jax_entry["times_s"], torch_entry["times_s"])]
    assert result["ratios"] == pytest.approx(ratios)
    assert result["median_ratio"] == pytest.approx(np.median(ratios))


@pytest.mark.slow
def test_jax_runner_times_train_train_step(monkeypatch):
    """The timed step is the training code's: state.init_train_state and train.train_step
    are what get traced, each call advances the state's step counter and updates the
    parameters."""
    from hyperiqa_jax import state, train

    inits = spy(monkeypatch, state, "init_train_state")
    steps = spy(monkeypatch, train, "train_step")
    config = throughput.model_config("nano", "float32")
    rng = np.random.RandomState(0)
    runner = throughput.JaxRunner(config, "train",
                                  rng.randint(0, 256, (1, 56, 56, 3)).astype(np.uint8),
                                  np.array([50.0], np.float32))
    assert inits and steps
    before = jax.device_get(runner.state["params"])  # the state is donated: a host copy
    for _ in range(2):
        runner.step()
    runner.sync()
    assert int(runner.state["step"]) == 2
    assert set(runner.last) == {"loss", "grad_norm"} and np.isfinite(float(runner.last["loss"]))
    got = jax.tree.leaves(jax.device_get(runner.state["params"]))
    moved = sum(not np.array_equal(g, b) for g, b in zip(got, jax.tree.leaves(before)))
    assert moved > len(got) // 2
    # The JSON's FLOPs are the compiled executable's own cost analysis.
    cost = runner.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert runner.flops() == float(cost["flops"]) > 1e7
    assert runner.memory()["temp_mb"] > 0


def test_model_config_sets_the_dtype():
    from hyperiqa_jax import train

    config = throughput.model_config("micro", "bfloat16")
    assert config.model.dtype == "bfloat16"
    assert dict(config.model.backbone_overrides)["depths"] == (1, 1, 1, 1)
    assert throughput.model_config("base", "float32").model.dtype == "float32"
    demo = throughput.model_config("demo", "float32")
    assert demo.data.name == "demo" and dict(demo.model.backbone_overrides)["stem_channels"] > 0
    nano = throughput.model_config("nano", "float32")
    assert nano.data.crop_size == nano.model.img_size == 56
    for size in throughput.MODELS:
        train.check_config(throughput.model_config(size, "bfloat16"))


def test_jax_only_overrides():
    """What the PyTorch reference cannot build: the demo's stem, not the micro backbone."""
    demo = throughput.model_config("demo", "float32")
    assert throughput.jax_only_overrides(demo.model) == ["patch_norm", "stem_channels"]
    for size in ("nano", "micro", "base"):
        assert throughput.jax_only_overrides(throughput.model_config(size, "float32").model) == []


def test_demo_model_is_jax_only(capsys):
    """The reference has no local-energy stem: asking for it is a usage error, not a crash."""
    from hyperiqa_jax import cli

    assert cli.call(throughput.main, ["--vs", "--model", "demo", "--mode", "train"],
                    define_flags=throughput.define_flags) == 2
    assert "--framework jax" in capsys.readouterr().err


def test_peak_lookup():
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert throughput.peak_flops("NVIDIA H100 PCIe", "float32") == 378e12  # not the SXM's
    assert throughput.peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert throughput.peak_flops("NVIDIA H200", "float32") == 494e12  # TF32, dense
    assert throughput.peak_flops("TPU v5p", "float32") == 459e12  # bf16 passes on TPU
    assert throughput.peak_flops("cpu") is None
