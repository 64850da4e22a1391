"""Every config's train step and scoring forward, lowered for GPU and TPU on this CPU.

An accelerator stalls on a conditional with a computed index (XLA:GPU copies the
index to the host and blocks the stream), on loops and on host callbacks. The
XLA:CPU kernels (models/cpu_kernels.py) contain such conditionals; lowered for
cuda or tpu, the default `kernels="auto"` must leave none of them.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperiqa_jax import lowering
from tests import train_utils

CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.py")
                 )


def test_every_config_is_listed():
    assert {"base", "small", "tiny", "ablation_multiscale", "ablation_single_scale",
            "resnet50_hyperiqa", "smart_iqa_scale", "demo"} <= set(CONFIGS)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", CONFIGS)
def test_accelerator_lowering_has_no_control_flow(name, dtype):
    config = train_utils.load_config(name)
    config.model.dtype = dtype
    assert config.model.kernels == "auto"
    for step, traced in lowering.trace_steps(config).items():
        for platform in ("cuda", "tpu"):
            counts = lowering.control_flow(traced.lower(lowering_platforms=(platform,)))
            assert counts.total == 0, (step, platform, counts)


def _tiny_train_step(kernels):
    config = train_utils.load_config("tiny")
    config.model.dtype = "float32"
    config.model.kernels = kernels
    config.model.backbone_overrides.depths = (2, 2, 2, 2)
    return lowering.trace_steps(config)["train"]


def test_cpu_lowering_keeps_the_cpu_kernels():
    # On the CPU "auto" lowers the CPU kernels: per block one barrier on the block input's
    # gradient, two transposed copies in the attention backward and one per Dense weight
    # gradient (qkv, proj, fc1, fc2), plus one per patch merging and the patch embedding.
    auto = lowering.control_flow(_tiny_train_step("auto").lower(lowering_platforms=("cpu",)))
    blocks, mergings = 8, 3
    assert auto.conditionals == blocks * (1 + 2 + 4) + mergings + 1
    # "generic" forces the accelerator path on the CPU too; "cpu" the CPU path everywhere.
    generic = _tiny_train_step("generic").lower(lowering_platforms=("cpu",))
    assert lowering.control_flow(generic).conditionals == 0
    forced = _tiny_train_step("cpu").lower(lowering_platforms=("cuda",))
    assert lowering.control_flow(forced).conditionals == auto.conditionals


def test_control_flow_counts_what_it_claims():
    x = jax.ShapeDtypeStruct((4,), jnp.float32)

    def conditional(v):
        return jax.lax.cond(v[0] > 0, jnp.sin, jnp.cos, v)

    def loop(v):
        return jax.lax.while_loop(lambda c: c[0] < 10, lambda c: c + 1, v)

    def callback(v):
        return jax.pure_callback(np.sin, x, v)

    def per_platform(v):  # A constant index: not counted.
        return jax.lax.platform_dependent(v, cpu=jnp.sin, default=jnp.cos)

    def count(fn, platform="cuda"):
        return lowering.control_flow(jax.jit(fn).trace(x).lower(lowering_platforms=(platform,)))

    assert count(conditional) == lowering.ControlFlow(conditionals=1)
    assert count(loop) == lowering.ControlFlow(loops=1)
    assert count(callback, "cpu").host_callbacks == 1
    assert count(per_platform) == lowering.ControlFlow()
    assert count(jnp.sin) == lowering.ControlFlow()
