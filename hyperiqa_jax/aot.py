r"""Compiles the train and scoring steps for TPUs and NVIDIA GPUs on a machine without them.

    python -m hyperiqa_jax.aot --target=tpu:v5p-8 --config=configs/base.py --batch=128
    python -m hyperiqa_jax.aot --target=gpu:h100x8 --config=configs/base.py --batch=128 --json
    python -m hyperiqa_jax.aot --target=tpu:v5e-4 --config=configs/base.py --max_batch
    python -m hyperiqa_jax.aot --target=tpu:v5p-8 --config=configs/base.py --profile

The accelerators' own compilers run here, on the CPU, without a device: the TPU
compiler of libtpu (`jax.experimental.topologies.get_topology_desc` describes a
slice that is not attached) and XLA's GPU compiler from the CUDA plugin, given a
description of the GPU (`gpu_target_config`). The step is the one train.py runs
(`lowering.trace_steps`: train.compile_steps on a `data` mesh of the target's
chips), so the figures are those of the compiled program a TPU or GPU would run:
per chip, the memory against its HBM, FLOPs and bytes accessed, XLA's own time
estimate where the platform gives one (TPU), the roofline bound from the chip's
published peak (`CHIPS`), fusions and custom calls (cuBLAS, cuDNN), collectives
and the compile time. They are compiler estimates, not measurements.

The compilers are the `tpu-aot` and `gpu-aot` extras (pyproject.toml); `make
install` puts them in `.venv/aot-compilers`, which only this command puts on its
path: installed in an environment, they make every JAX process there look for a
TPU and a GPU. This command itself keeps JAX on the CPU (JAX_PLATFORMS=cpu).

`--max_batch` finds the largest per-chip batch that fits, with and without
`remat`, by compiling: memory grows about linearly with the batch, so a line
through the state's size and one compiled batch predicts the next guess.
`--profile` adds the train step's static profile: its top instructions by bytes
and by FLOPs, mapped back to the model (hlo_stats.py).
"""

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import jax
from absl import app, flags
from jax.sharding import Mesh
from tqdm import tqdm

from hyperiqa_jax import cli, config_checks, hlo_stats, lowering, models
from hyperiqa_jax.errors import UserError

GIB = 2**30

# ----------------------------------------------------------------------------
# Chips, as their vendors publish them (docs/benchmarks.md, "Compiled for TPU and GPU
# without a device", cites the pages): dense bfloat16 peak, HBM per chip, HBM bandwidth.


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    platform: str        # JAX's name: "tpu" or "cuda"
    bf16_tflops: float   # dense, per chip
    hbm_gib: float
    hbm_gbps: float      # 1e9 bytes/s
    title: str


CHIPS = {
    "v4": Chip("v4", "tpu", 275, 32, 1200, "TPU v4"),
    "v5e": Chip("v5e", "tpu", 197, 16, 819, "TPU v5e"),
    "v5p": Chip("v5p", "tpu", 459, 95, 2765, "TPU v5p"),
    "v6e": Chip("v6e", "tpu", 918, 32, 1638, "TPU v6e"),
    "h100": Chip("h100", "cuda", 989, 80, 3350, "NVIDIA H100 SXM"),
    "h200": Chip("h200", "cuda", 989, 141, 4800, "NVIDIA H200 SXM"),
}


@dataclasses.dataclass(frozen=True)
class TpuFamily:
    """How libtpu names a slice of this generation."""

    topology: str         # prefix of the topology name, e.g. "v5" in "v5:2x2x1"
    chip_config: str      # "megacore": one device per chip of two TensorCores
    cores_per_chip: int   # the N of "v5p-N" counts TensorCores
    dims: int             # 2-D torus (v5e, v6e) or 3-D (v4, v5p)
    accelerator_type: str


TPU_FAMILIES = {
    "v4": TpuFamily("v4", "megacore", 2, 3, "v4"),
    "v5e": TpuFamily("v5e", "default", 1, 2, "v5litepod"),
    "v5p": TpuFamily("v5", "megacore", 2, 3, "v5p"),
    "v6e": TpuFamily("v6e", "default", 1, 2, "v6e"),
}


def slice_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The chip grid of a slice, as Cloud TPU lays them out (v5e-8: 2x4, v5p-32: 2x2x4).

    From the smallest full host (2x2, 2x2x1) the smallest side doubles, the last one
    of equal sides first.
    """
    if chips == 1 and dims == 2:
        return (1, 1)
    shape = [2, 2] if dims == 2 else [2, 2, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        shape[len(shape) - 1 - shape[::-1].index(smallest)] *= 2
    if math.prod(shape) != chips:
        raise UserError(f"{chips} chips is not a slice shape; use 4, 8, 16, ... chips")
    return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice of a TPU generation or a host of GPUs, e.g. `tpu:v5p-8` or `gpu:h100x8`."""

    spec: str
    chip: Chip
    chips: int

    @property
    def platform(self) -> str:
        return self.chip.platform

    def devices(self):
        """Compile-only devices of the target (no device needs to be attached)."""
        from jax.experimental import topologies

        if self.platform == "tpu":
            family = TPU_FAMILIES[self.chip.name]
            shape = slice_shape(self.chips, family.dims)
            # Sides of 16 chips close into rings (v5e-128 and larger); 3-D slices of
            # full 4x4x4 cubes are tori.
            if family.dims == 2:
                wrap = tuple(s >= 16 for s in shape) + (False,)
            else:
                wrap = (all(s % 4 == 0 for s in shape),) * 3
            host = (1, 1, 1) if self.chips == 1 else (2, 2, 1)
            return topologies.get_topology_desc(
                topology_name=f"{family.topology}:{'x'.join(map(str, shape))}",
                platform="tpu", chip_config_name=family.chip_config,
                chips_per_host_bounds=host, num_slices=1, wrap=wrap).devices
        hosts, per_host = (1, self.chips) if self.chips <= 8 else (self.chips // 8, 8)
        return topologies.get_topology_desc(
            platform="cuda", topology=f"1x{hosts}x{per_host}",
            target_config=gpu_target_config(self.chip)).devices

    def hbm_bytes(self) -> int:
        return int(self.chip.hbm_gib * GIB)

    def usable_bytes(self) -> int:
        """What a step may use: the TPU's HBM (its compiler enforces it); on a GPU, the
        share JAX's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default)."""
        if self.platform == "tpu":
            return self.hbm_bytes()
        return int(self.hbm_bytes() * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                           "0.75")))


def parse_target(spec: str) -> Target:
    """`tpu:<generation>-<N>` (N as Cloud TPU counts it) or `gpu:<chip>[x<count>]`."""
    platform, _, rest = spec.partition(":")
    tpus = ", ".join(f"tpu:{n}-{4 * f.cores_per_chip}" for n, f in TPU_FAMILIES.items())
    help_text = f"use e.g. {tpus}, gpu:h100, gpu:h100x8, gpu:h200x8"
    if platform == "tpu":
        match = re.fullmatch(r"(v[0-9a-z]+)-(\d+)", rest)
        if not match or match.group(1) not in TPU_FAMILIES:
            raise UserError(f"--target={spec}: unknown TPU slice; {help_text}")
        family = TPU_FAMILIES[match.group(1)]
        cores = int(match.group(2))
        if cores % family.cores_per_chip:
            raise UserError(f"--target={spec}: {match.group(1)} slices count "
                            f"{family.cores_per_chip} cores per chip; {help_text}")
        chips = cores // family.cores_per_chip
        slice_shape(chips, family.dims)  # checks the count
        return Target(spec, CHIPS[match.group(1)], chips)
    if platform == "gpu":
        match = re.fullmatch(r"([a-z]+[0-9]+)(?:x([0-9]+))?", rest)
        if not match or match.group(1) not in CHIPS or CHIPS[match.group(1)].platform != "cuda":
            raise UserError(f"--target={spec}: unknown GPU; {help_text}")
        count = int(match.group(2) or 1)
        if count < 1 or (count > 8 and count % 8):
            raise UserError(f"--target={spec}: 1 to 8 GPUs, or hosts of 8")
        return Target(spec, CHIPS[match.group(1)], count)
    raise UserError(f"--target={spec}: {help_text}")


# ----------------------------------------------------------------------------
# The GPU's description for XLA (its GpuTargetConfigProto, in text form). H100 SXM and
# H200 are the same GH100 chip with different memory: the CUDA programming guide's limits
# for compute capability 9.0 and the published SM count, clock, L2, memory and bandwidth.

GH100 = dict(sm_count=132, clock_ghz=1.98, l2_bytes=50 * 2**20, fp32_lanes_per_sm=128)


def gpu_target_config(chip: Chip) -> str:
    """XLA's target description of an NVIDIA chip, for a compile without the GPU."""
    name = f"{chip.title} {chip.hbm_gib:g}GB"
    return f"""
gpu_device_info {{
  name: "{name}"
  device_vendor: "NVIDIA Corporation"
  cuda_compute_capability {{ major: 9 minor: 0 }}
  core_count: {GH100["sm_count"]}
  fpus_per_core: {GH100["fp32_lanes_per_sm"]}
  clock_rate_ghz: {GH100["clock_ghz"]}
  device_memory_size: {int(chip.hbm_gib * GIB)}
  memory_bandwidth: {int(chip.hbm_gbps * 1e9)}
  l2_cache_size: {GH100["l2_bytes"]}
  threads_per_warp: 32
  threads_per_block_limit: 1024
  threads_per_core_limit: 2048
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  shared_memory_per_block: {48 * 1024}
  shared_memory_per_block_optin: {227 * 1024}
  shared_memory_per_core: {228 * 1024}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{name}"
"""


# XLA:GPU picks between Triton and cuBLAS for each product by timing both on the
# device; without one, Triton's tiling search fails on Swin's products. cuBLAS then
# runs them all (a GPU's autotuner may pick Triton for some, with other fusions).
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}

# ----------------------------------------------------------------------------
# The compilers: in the environment, or in the folder `make install` fills.

COMPILERS_DIR = "aot-compilers"
COMPILER_MODULES = {"tpu": ("libtpu", "tpu-aot"), "cuda": ("jax_cuda12_plugin", "gpu-aot")}


def use_compilers(target: Target):
    """Makes the target's compiler importable and keeps JAX's own backend on the CPU.

    Must run before JAX starts its backends (the first array, or jax.devices()).
    """
    platform = target.platform
    module, extra = COMPILER_MODULES[platform]
    folder = Path(sys.prefix) / COMPILERS_DIR
    if importlib.util.find_spec(module) is None and folder.is_dir():
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()
    if importlib.util.find_spec(module) is None:
        raise UserError(
            f"{module} is not installed: compiling for {platform} needs the '{extra}' extra "
            f"(`make install` puts it in .venv/{COMPILERS_DIR}; or pip install -e '.[{extra}]' "
            "into an environment of its own)")
    try:
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:  # backends already started (a caller in this process): keep them
        pass
    if platform == "tpu":
        # libtpu reads these at start-up. It locks /tmp/libtpu_lockfile so that one process
        # at a time drives the TPU: compiles for one need no lock. Without a host name and
        # an accelerator type it warns that it cannot find the TPU it is not going to use.
        family = TPU_FAMILIES[target.chip.name]
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{family.accelerator_type}-"
                              f"{target.chips * family.cores_per_chip}")


# ----------------------------------------------------------------------------
# One compiled step and what it reports.


class DoesNotFit(UserError):
    """A step whose memory exceeds the chip's; `needed`: bytes the compiler asked for."""

    def __init__(self, message: str, batch: int, needed: float | None = None):
        super().__init__(message)
        self.batch = batch
        self.needed = needed


def _gigabytes(text: str) -> float | None:
    match = re.match(r"([0-9.]+)([KMGT])?", text)
    if not match:
        return None
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(match.group(2) or "", 1)
    return float(match.group(1)) * scale


def _out_of_memory(error: Exception, target: Target, step: str, batch: int) -> DoesNotFit:
    """The compiler's RESOURCE_EXHAUSTED as one line: how much it needed, of how much."""
    text = str(error)
    needed = re.search(r"required for [^(]*\(([0-9.]+[KMGT]?)\)", text) or re.search(
        r"[Uu]sed ([0-9.]+[KMGT]?) of", text)
    available = re.search(r"available HBM \(([0-9.]+[KMGT]?)\)", text) or re.search(
        r"of ([0-9.]+[KMGT]?) hbm", text)
    detail = ""
    need_bytes = _gigabytes(needed.group(1)) if needed else None
    if needed and available:
        # XLA writes binary units: "23.15G" is GiB.
        detail = (f": the compiler needs {needed.group(1)}iB of the {available.group(1)}iB "
                  "of HBM it can use")
    return DoesNotFit(f"the {step} step at batch {batch} per chip does not fit a "
                      f"{target.chip.title} chip{detail}; try --remat=block or a smaller "
                      "--batch (--max_batch finds the largest)", batch, need_bytes)


@dataclasses.dataclass
class StepReport:
    """Per chip: what the compiler reports of one step for one target."""

    step: str
    target: str
    chip: str
    chips: int
    batch: int
    dtype: str
    remat: str
    compile_seconds: float
    peak_bytes: int
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    code_bytes: int
    hbm_bytes: int
    usable_bytes: int
    flops: float | None           # XLA's cost analysis (TPU); None where it gives none
    bytes_accessed: float | None
    matmul_flops: float           # dots and convolutions, from the compiled module
    estimate_seconds: float | None  # XLA's own step time estimate (v5p, v4, v6e)
    compute_seconds: float        # roofline terms at the chip's published peaks
    memory_seconds: float | None
    fusions: int
    custom_calls: dict
    collectives: list
    control_flow: dict

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    @property
    def roofline_seconds(self) -> float:
        return max(self.compute_seconds, self.memory_seconds or 0.0)

    @property
    def images_per_second(self) -> float | None:
        """Per chip, by XLA's estimate where it gives one."""
        return self.batch / self.estimate_seconds if self.estimate_seconds else None

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), fits=self.fits,
                    roofline_seconds=self.roofline_seconds,
                    images_per_second=self.images_per_second)


def summarize(compiled, lowered, step: str, target: Target, batch: int, dtype: str, remat: str,
              seconds: float) -> StepReport:
    """A StepReport of a compiled step (`lowered`: the module before XLA's passes)."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    module = hlo_stats.parse_module(compiled.as_text())
    matmul_flops = sum(c.flops for c in hlo_stats.costs(module))
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes
            + memory.generated_code_size_in_bytes)
    flops, accessed = cost.get("flops"), cost.get("bytes accessed")
    estimate = cost.get("optimal_seconds")
    compute = (flops or matmul_flops) / (target.chip.bf16_tflops * 1e12)
    stablehlo = lowering.control_flow(lowered)
    counts = hlo_stats.opcode_counts(module, ("fusion", "while", "conditional"))
    collectives = {}
    for c in hlo_stats.collectives(module):
        key = (c.kind, c.group_size, c.dtypes)
        entry = collectives.setdefault(key, {"kind": c.kind, "group_size": c.group_size,
                                             "dtypes": list(c.dtypes), "count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += c.bytes
    return StepReport(
        step=step, target=target.spec, chip=target.chip.title, chips=target.chips, batch=batch,
        dtype=dtype, remat=remat, compile_seconds=seconds, peak_bytes=peak,
        temp_bytes=memory.temp_size_in_bytes, argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes, hbm_bytes=target.hbm_bytes(),
        usable_bytes=target.usable_bytes(), flops=flops, bytes_accessed=accessed,
        matmul_flops=matmul_flops,
        estimate_seconds=estimate if estimate and estimate > 0 else None,
        compute_seconds=compute,
        memory_seconds=accessed / (target.chip.hbm_gbps * 1e9) if accessed else None,
        fusions=counts["fusion"], custom_calls=hlo_stats.custom_calls(module),
        collectives=list(collectives.values()),
        control_flow={"conditionals": counts["conditional"], "loops": counts["while"],
                      "host_transfers": hlo_stats.host_transfers(module),
                      "stablehlo_conditionals": stablehlo.conditionals,
                      "stablehlo_loops": stablehlo.loops,
                      "stablehlo_host_callbacks": stablehlo.host_callbacks})


def prepared_config(config, dtype: str = "", remat: str = ""):
    """A copy of `config` with --dtype / --remat applied."""
    config = config.copy_and_resolve_references()
    if dtype:
        config.model.dtype = dtype
    if remat:
        config.model.remat = remat
    return config


def compile_steps(config, target: Target, batch: int, steps=("train", "eval"), mesh=None,
                  keep_text: bool = False, progress=None):
    """{step: StepReport} of the config's steps compiled for `target` at `batch` per chip.

    Raises DoesNotFit when the compiler runs out of the chip's memory or, on a GPU, the
    step's peak exceeds what JAX's allocator takes. With `keep_text`, also returns the
    compiled modules' text: ({step: report}, {step: text}).
    """
    mesh = mesh or Mesh(target.devices(), ("data",))
    dtype = str(models.compute_dtype(config.model, target.platform))
    traced = lowering.trace_steps(config, batch, target.platform, mesh)
    options = GPU_COMPILER_OPTIONS if target.platform == "cuda" else {}
    reports, texts = {}, {}
    for step in steps:
        start = time.perf_counter()
        lowered = traced[step].lower()
        try:
            compiled = lowered.compile(compiler_options=options)
        except jax.errors.JaxRuntimeError as error:
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            raise _out_of_memory(error, target, step, batch) from None
        report = summarize(compiled, lowered, step, target, batch, dtype, config.model.remat,
                           time.perf_counter() - start)
        if not report.fits:
            raise DoesNotFit(
                f"the {step} step at batch {batch} per chip does not fit a "
                f"{target.chip.title}: peak {report.peak_bytes / GIB:.1f} GiB of "
                f"{report.usable_bytes / GIB:.1f} GiB usable; try --remat=block or a "
                "smaller --batch (--max_batch finds the largest)", batch, report.peak_bytes)
        reports[step] = report
        if progress is not None:
            progress.update(1)
        if keep_text:
            texts[step] = compiled.as_text()
    return (reports, texts) if keep_text else reports


# ----------------------------------------------------------------------------
# The largest batch that fits.


def search_max_batch(fits, usable: float, start: int, state_bytes: float, multiple: int = 8,
                     limit: int = 1 << 16):
    """The largest multiple of `multiple` (or, below it, any batch) with fits(b); (b, tries).

    `fits(b)` returns (whether b fits, the bytes it used or asked for, or None). Memory
    is about linear in the batch: the next guess is where the line through the last two
    measured batches (at first: the state alone, at batch 0, and `start`) reaches
    `usable`, kept strictly inside the bracket of the largest batch known to fit and the
    smallest known not to, so that every call narrows it. 0: not even batch 1 fits.
    """

    def snap(batch):
        return batch // multiple * multiple if batch >= multiple else max(int(batch), 1)

    measured = {0: state_bytes}
    good, bad, batch, tries = 0, limit + 1, snap(start), []
    while True:
        ok, used = fits(batch)
        tries.append((batch, ok, used))
        good, bad = (batch, bad) if ok else (good, batch)
        if used is not None:
            measured[batch] = used
        low = good + (multiple if good >= multiple else 1)
        high = snap(bad - 1)
        if low > high:
            return good, tries
        (b0, m0), (b1, m1) = sorted(measured.items(), key=lambda p: p[0] == batch)[-2:]
        slope = (m1 - m0) / (b1 - b0) if b1 != b0 else 0.0
        guess = b1 + (usable - m1) / slope if slope > 0 else 2 * max(good, 1)
        batch = min(max(snap(guess), low), high)


def max_batch(config, target: Target, start: int, mesh):
    """Largest per-chip batch of the train step that fits `target`, and the compiles tried."""
    _, _, state, _ = lowering.abstract_train_inputs(config, 1, target.platform)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    bar = tqdm(desc=f"largest batch, remat {config.model.remat}", unit="compile",
               file=sys.stderr)

    def fits(batch):
        try:
            report = compile_steps(config, target, batch, ("train",), mesh)["train"]
            ok, used = True, report.peak_bytes
        except DoesNotFit as error:
            # The TPU compiler names the temporaries it needed; the state comes on top.
            ok = False
            used = None if error.needed is None else error.needed + (
                state_bytes if target.platform == "tpu" else 0)
        bar.update(1)
        bar.set_postfix(batch=batch, fits=ok)
        return ok, used

    best, tries = search_max_batch(fits, target.usable_bytes(), start, state_bytes)
    bar.close()
    return best, tries


# ----------------------------------------------------------------------------
# Output.


def _gib(n):
    return f"{n / GIB:.2f} GiB"


def _seconds(s):
    return "-" if s is None else f"{s * 1e3:.1f} ms"


def format_report(r: StepReport) -> str:
    lines = [f"{r.step} step, {r.target} ({r.chips} x {r.chip}), batch {r.batch} per chip, "
             f"{r.dtype}, remat {r.remat}: compiled in {r.compile_seconds:.0f} s"]
    lines.append(f"  memory per chip: peak {_gib(r.peak_bytes)} of {_gib(r.hbm_bytes)} HBM "
                  f"({_gib(r.usable_bytes)} usable): temp {_gib(r.temp_bytes)}, arguments "
                  f"{_gib(r.argument_bytes)}, outputs {_gib(r.output_bytes)} (aliased "
                  f"{_gib(r.alias_bytes)}), code {_gib(r.code_bytes)}")
    if r.flops is not None:
        lines.append(f"  per chip-step: {r.flops / 1e12:.3f} TFLOP, {r.bytes_accessed / 1e9:.1f} "
                     f"GB accessed ({r.bytes_accessed / r.batch / 1e9:.2f} GB per image)")
    else:
        lines.append(f"  per chip-step: {r.matmul_flops / 1e12:.3f} TFLOP in products "
                     "(no cost analysis on this platform)")
    bound = "memory" if (r.memory_seconds or 0) > r.compute_seconds else "compute"
    lines.append(f"  roofline at the chip's peaks: compute {_seconds(r.compute_seconds)}, "
                 f"memory {_seconds(r.memory_seconds)} ({bound}-bound); XLA's estimate "
                 f"{_seconds(r.estimate_seconds)}"
                 + (f" = {r.images_per_second:.0f} images/s per chip"
                    if r.images_per_second else ""))
    calls = ", ".join(f"{k} {v}" for k, v in r.custom_calls.items()) or "none"
    lines.append(f"  {r.fusions} fusions; custom calls: {calls}")
    for c in r.collectives:
        lines.append(f"  {c['count']} {c['kind']} over {c['group_size']} chips "
                     f"({'/'.join(c['dtypes'])}): {c['bytes'] / 2**20:.1f} MiB")
    flow = r.control_flow
    lines.append(f"  conditionals {flow['conditionals']}, loops {flow['loops']}, host "
                 f"transfers {flow['host_transfers']}")
    return "\n".join(lines)


def profile(text: str, top: int = 20) -> dict:
    """The static profile of a compiled module: top instructions and groups by bytes, FLOPs."""
    costs = hlo_stats.costs(hlo_stats.parse_module(text))

    def row(c):
        return {"bytes": c.bytes, "flops": c.flops, "instruction": c.name, "kind": c.detail,
                "pass": c.origin.direction, "location": c.origin.location,
                "primitive": c.origin.primitive}

    def grouped(key):
        groups = {}
        for c in costs:
            g = groups.setdefault(key(c), {"bytes": 0, "flops": 0, "count": 0})
            g["bytes"] += c.bytes
            g["flops"] += c.flops
            g["count"] += 1
        return sorted(({"group": k, **v} for k, v in groups.items()),
                      key=lambda g: -g["bytes"])

    return {
        "total_bytes": sum(c.bytes for c in costs), "total_flops": sum(c.flops for c in costs),
        "by_bytes": [row(c) for c in sorted(costs, key=lambda c: -c.bytes)[:top]],
        "by_flops": [row(c) for c in sorted(costs, key=lambda c: -c.flops)[:top]],
        "by_stage": grouped(lambda c: f"{c.origin.stage} {c.origin.direction}"),
        "by_op": grouped(lambda c: f"{c.origin.op}/{c.origin.primitive} {c.origin.direction}")[
            :top],
    }


def format_profile(p: dict) -> str:
    total = p["total_bytes"]
    lines = [f"static profile of the train step: {total / 1e9:.1f} GB moved, "
             f"{p['total_flops'] / 1e12:.3f} TFLOP in products (per chip)"]

    def table(title, rows, label):
        lines.append(title)
        for r in rows:
            lines.append(f"  {r['bytes'] / 1e9:8.2f} GB {100 * r['bytes'] / total:5.1f}%  "
                         f"{r['flops'] / 1e9:9.1f} GFLOP  {label(r)}")

    where = lambda r: (f"{r['pass']:<8} {r['location']}/{r['primitive']} "
                       f"[{r['kind']}] {r['instruction']}")
    table("top instructions by bytes:", p["by_bytes"], where)
    table("top instructions by FLOPs:", p["by_flops"], where)
    table("by stage:", p["by_stage"], lambda r: f"{r['group']} ({r['count']} instructions)")
    table("by op (all blocks):", p["by_op"], lambda r: f"{r['group']} ({r['count']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# The command.


def define_flags(flag_values=flags.FLAGS):
    """The command's flags (defined when it runs, see hyperiqa_jax/cli.py)."""
    f = dict(flag_values=flag_values)
    flags.DEFINE_string("target", None, "What to compile for: tpu:v5e-4, tpu:v5e-8, tpu:v5p-8, "
                        "tpu:v4-8, tpu:v6e-4, ... (Cloud TPU names) or gpu:h100, gpu:h100x8, "
                        "gpu:h200x8 (required).", **f)
    flags.DEFINE_string("config", None, "A configs/*.py file (required).", **f)
    flags.DEFINE_integer("batch", 8, "Images per chip per step.", lower_bound=1, **f)
    flags.DEFINE_string("remat", "", "Override model.remat (none, block). With --max_batch and "
                        "no --remat: both.", **f)
    flags.DEFINE_string("dtype", "", "Override model.dtype (auto, float32, bfloat16); 'auto' "
                        "follows the target (bfloat16).", **f)
    flags.DEFINE_list("steps", ["train", "eval"], "Steps to compile: train, eval.", **f)
    flags.DEFINE_bool("max_batch", False, "Instead: find the largest per-chip batch of the "
                      "train step that fits, by compiling (from --batch up).", **f)
    flags.DEFINE_bool("profile", False, "Also print the train step's static profile: top "
                      "instructions by bytes and FLOPs, mapped to the model.", **f)
    flags.DEFINE_bool("json", False, "Print one JSON object instead of text.", **f)


def main(argv, flag_values=flags.FLAGS) -> int:
    args = flag_values
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not args.target or not args.config:
        raise app.UsageError("--target and --config are required, e.g. --target=tpu:v5p-8 "
                             "--config=configs/base.py")
    unknown = sorted(set(args.steps) - {"train", "eval"})
    if unknown:
        raise app.UsageError(f"--steps: unknown step(s) {unknown}; choose from train, eval")
    target = parse_target(args.target)
    base = config_checks.load_config_file(args.config)
    use_compilers(target)
    mesh = Mesh(target.devices(), ("data",))
    output = {"target": target.spec, "config": args.config, "chips": target.chips,
              "chip": dataclasses.asdict(target.chip)}
    if args.max_batch:
        results = {}
        for remat in ([args.remat] if args.remat else ["none", "block"]):
            best, tries = max_batch(prepared_config(base, args.dtype, remat), target,
                                    args.batch, mesh)
            results[remat] = {"max_batch": best, "tries": [
                {"batch": b, "fits": ok, "bytes": used} for b, ok, used in tries]}
        output["max_batch"] = results
        if args.json:
            print(json.dumps(output, indent=1))
        summary = ", ".join(f"remat {k}: {v['max_batch']} ({len(v['tries'])} compiles)"
                            for k, v in results.items())
        print(f"{target.spec}: largest batch per chip of the train step: {summary}",
              file=sys.stderr if args.json else sys.stdout)
        return 0

    config = prepared_config(base, args.dtype, args.remat)
    steps = [s for s in ("train", "eval") if s in args.steps]
    with tqdm(total=len(steps), desc=f"compiling for {target.spec}", unit="step",
              file=sys.stderr) as bar:
        reports, texts = compile_steps(config, target, args.batch, steps, mesh,
                                       keep_text=True, progress=bar)
    output["steps"] = {k: r.as_dict() for k, r in reports.items()}
    if args.profile and "train" in texts:
        output["profile"] = profile(texts["train"])
    if args.json:
        print(json.dumps(output, indent=1))
    else:
        for r in reports.values():
            print(format_report(r))
        if "profile" in output:
            print(format_profile(output["profile"]))
    train = reports.get("train") or next(iter(reports.values()))
    estimate = (f", XLA's estimate {train.estimate_seconds * 1e3:.1f} ms/step"
                if train.estimate_seconds else "")
    print(f"{target.spec}: batch {args.batch} per chip fits ({train.step} step peak "
          f"{train.peak_bytes / GIB:.1f} of {train.hbm_bytes / GIB:.0f} GiB{estimate})",
          file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags=define_flags)
