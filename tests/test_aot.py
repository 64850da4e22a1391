"""The train step compiled by the TPU and GPU compilers on this CPU (hyperiqa_jax.aot).

The compiles run `python -m hyperiqa_jax.aot` in subprocesses, side by side: the
command puts the compilers (the tpu-aot and gpu-aot extras, which `make install` puts
in .venv/aot-compilers) on its own path, and the test process keeps its plain JAX.
The model is the tests' tiny HyperIQA (56 px crops), whose compile takes seconds.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperiqa_jax import aot, hlo_stats, models
from hyperiqa_jax.errors import UserError
from tests import train_utils

REPO = Path(__file__).resolve().parents[1]

# Far beyond a v5e chip's 16 GiB for the tiny model (about 5 MB per image in training).
TOO_LARGE_BATCH = 16384

COMMANDS = {
    "tpu": ["--target=tpu:v5e-4", "--batch=2"],
    "gpu": ["--target=gpu:h100x2", "--batch=2"],
    "tpu_too_large": ["--target=tpu:v5e-4", f"--batch={TOO_LARGE_BATCH}"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: CompletedProcess} of the commands above, started together."""
    config = tmp_path_factory.mktemp("aot") / "tiny.py"
    config.write_text("from tests import train_utils\n\n\ndef get_config():\n"
                      "    return train_utils.tiny_config()\n")
    env = dict(os.environ, HYPERIQA_ALLOCATOR="system",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    started = {name: subprocess.Popen(
        [sys.executable, "-m", "hyperiqa_jax.aot", f"--config={config}", "--steps=train",
         "--json", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for name, args in COMMANDS.items()}
    done = {}
    for name, proc in started.items():
        out, err = proc.communicate(timeout=900)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def train_report(run):
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)["steps"]["train"]


def tiny_parameter_count():
    model = models.build_model(train_utils.tiny_config().model, "tpu")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 56, 56, 3))))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


def check_data_parallel_step(report, chips):
    assert report["fits"] and report["peak_bytes"] <= report["hbm_bytes"]
    assert report["dtype"] == "bfloat16"  # "auto" follows the target, not this CPU
    # The gradient's all-reduce over every chip of the `data` axis carries each parameter
    # once, in bfloat16 or float32 (the compiler picks per tensor), plus the loss.
    over_all = [c for c in report["collectives"]
                if c["kind"] == "all-reduce" and c["group_size"] == chips]
    reduced = sum(c["bytes"] for c in over_all)
    params = tiny_parameter_count()
    assert 2 * params <= reduced <= 4 * params + 1024, (reduced, params)
    assert all(c["group_size"] == chips for c in report["collectives"])
    assert set(report["control_flow"].values()) == {0}, report["control_flow"]


def test_tpu_step_compiles_fits_and_all_reduces_gradients(runs):
    report = train_report(runs["tpu"])
    check_data_parallel_step(report, chips=4)
    assert report["flops"] > 0 and report["bytes_accessed"] > 0


def test_gpu_step_compiles_fits_and_all_reduces_gradients(runs):
    report = train_report(runs["gpu"])
    check_data_parallel_step(report, chips=2)
    assert report["custom_calls"].get("__cublas$lt$matmul", 0) > 0  # products in cuBLAS
    assert report["flops"] is None  # XLA:GPU gives no cost analysis


def test_a_batch_that_cannot_fit_is_one_line(runs):
    run = runs["tpu_too_large"]
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not fit" in errors[0], run.stderr[-3000:]
    assert f"batch {TOO_LARGE_BATCH} per chip" in errors[0]


# ----------------------------------------------------------------------------
# The pieces, without a compiler.


@pytest.mark.parametrize("spec, chips, shape", [
    ("tpu:v5e-4", 4, (2, 2)), ("tpu:v5e-8", 8, (2, 4)), ("tpu:v5e-256", 256, (16, 16)),
    ("tpu:v6e-4", 4, (2, 2)), ("tpu:v4-8", 4, (2, 2, 1)), ("tpu:v5p-32", 16, (2, 2, 4)),
    ("tpu:v5p-128", 64, (4, 4, 4)), ("tpu:v5p-512", 256, (4, 8, 8))])
def test_tpu_slices_as_cloud_tpu_names_them(spec, chips, shape):
    target = aot.parse_target(spec)
    assert target.chips == chips
    assert aot.slice_shape(chips, aot.TPU_FAMILIES[target.chip.name].dims) == shape


@pytest.mark.parametrize("spec", ["tpu:v9-4", "tpu:v5p-6", "tpu:v5e-12", "gpu:a100", "gpu:h100x12",
                                  "v5e-4"])
def test_unknown_targets_are_user_errors(spec):
    with pytest.raises(UserError):
        aot.parse_target(spec)


def test_auto_precision_follows_the_target_platform():
    config = train_utils.tiny_config().model
    assert config.dtype == "auto"
    assert models.compute_dtype(config, "tpu") == jnp.bfloat16
    assert models.compute_dtype(config, "cuda") == jnp.bfloat16
    assert models.compute_dtype(config, "cpu") == jnp.float32


@pytest.mark.parametrize("per_image, limit", [(5.0, 1000.0), (3.0, 100.0), (0.7, 50.0)])
def test_max_batch_search_finds_the_largest_multiple_in_few_compiles(per_image, limit):
    state = 10.0

    def linear(batch):
        used = state + per_image * batch
        return used <= limit, used

    best, tries = aot.search_max_batch(linear, limit, start=8, state_bytes=state)
    largest = int((limit - state) / per_image)
    assert best == largest // 8 * 8
    assert len(tries) <= 4, tries


def test_max_batch_search_is_exact_when_memory_is_not_linear():
    # A compiler that rematerialises near the limit: used memory flattens out, and only
    # batches up to 200 fit.
    def saturating(batch):
        return batch <= 200, 100 * (1 - np.exp(-batch / 60))

    best, tries = aot.search_max_batch(saturating, 100.0, start=8, state_bytes=0.0)
    assert best == 200
    assert len(tries) <= 12, tries


# A compiled module's text, written by hand in the form XLA prints it.
MODULE = """\
HloModule step

%fused (param_0: bf16[8,49,32], param_1: bf16[8,49,32]) -> bf16[8,49,49] {
  %param_0 = bf16[8,49,32]{2,1,0:T(8,128)(2,1)} parameter(0)
  %param_1 = bf16[8,49,32]{2,1,0:T(8,128)(2,1)} parameter(1)
  ROOT %dot.1 = bf16[8,49,49]{2,1,0:T(8,128)(2,1)} dot(%param_0, %param_1), \
lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={2}
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

ENTRY %main (p0: bf16[8,49,32], p1: bf16[8,49,32], p2: f32[300], p3: f32[4,14,14,8], \
p4: f32[3,3,8,16]) -> (bf16[8,49,49], f32[300], f32[4,14,14,16]) {
  %p0 = bf16[8,49,32]{2,1,0:T(8,128)(2,1)} parameter(0)
  %p1 = bf16[8,49,32]{2,1,0:T(8,128)(2,1)} parameter(1)
  %p2 = f32[300]{0:T(256)} parameter(2)
  %p3 = f32[4,14,14,8]{3,2,1,0} parameter(3)
  %p4 = f32[3,3,8,16]{3,2,1,0} parameter(4)
  %fusion = bf16[8,49,49]{2,1,0:T(8,128)(2,1)} fusion(%p0, %p1), kind=kOutput, calls=%fused, \
metadata={op_name="jit(f)/jvp(HyperIQA)/backbone/layers_2/blocks_5/attn/dot_general"}
  %conv = f32[4,14,14,16]{3,2,1,0} convolution(%p3, %p4), window={size=3x3 pad=1_1x1_1}, \
dim_labels=b01f_01io->b01f
  %all-reduce = f32[300]{0:T(256)} all-reduce(%p2), replica_groups=[1,4]<=[4], to_apply=%add
  ROOT %t = (bf16[8,49,49]{2,1,0:T(8,128)(2,1)}, f32[300]{0:T(256)}, f32[4,14,14,16]{3,2,1,0}) \
tuple(%fusion, %all-reduce, %conv)
}
"""


def test_module_costs_from_shapes_and_tiles():
    module = hlo_stats.parse_module(MODULE)
    costs = {c.name: c for c in hlo_stats.costs(module)}
    fusion = costs["fusion"]
    # Tiles of 8 x 128: 49 rows -> 56, 32 and 49 columns -> 128, in bfloat16.
    assert fusion.bytes == 3 * (8 * 56 * 128 * 2)
    assert fusion.flops == 2 * 8 * 49 * 49 * 32
    assert fusion.origin == hlo_stats.Origin("forward", "backbone/layers_2/blocks_5/attn",
                                             "dot_general")
    assert fusion.origin.stage == "stage 2" and fusion.origin.op == "attn"
    # A 3x3 convolution with padding 1: the taps on the padding multiply nothing.
    taps_per_side = 3 * 14 - 2  # the first and last rows miss one tap each
    assert costs["conv"].flops == 2 * 4 * 16 * taps_per_side ** 2 * 8
    assert costs["conv"].bytes == 4 * (4 * 14 * 14 * 8 + 3 * 3 * 8 * 16 + 4 * 14 * 14 * 16)
    (reduce,) = hlo_stats.collectives(module)
    assert (reduce.kind, reduce.group_size, reduce.bytes) == ("all-reduce", 4, 300 * 4)
    assert costs["all-reduce"].bytes == 2 * 512 * 4  # 300 padded to the 256-element tile


def test_backward_instructions_are_told_from_forward_ones():
    op = "jit(f)/transpose(jvp(HyperIQA))/backbone/layers_0/blocks_1/mlp/fc1/dot_general"
    origin = hlo_stats.origin(op)
    assert origin == hlo_stats.Origin("backward", "backbone/layers_0/blocks_1/mlp/fc1",
                                      "dot_general")
    assert origin.stage == "stage 0" and origin.op == "mlp/fc1"
    assert hlo_stats.origin("jit(f)/add").direction == "update"
