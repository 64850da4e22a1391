"""Images/second of the full E6 model, JAX against the PyTorch reference (timm backbone).

    python -m benchmarks.throughput --framework jax --model tiny --mode eval --batch 8
    python -m benchmarks.throughput --vs --model base --mode train --batch 8 --repeats 5
    python -m benchmarks.throughput --model demo --mode train --repeats 10 --steps_per_call 20

--vs times JAX and torch alternately in one process and prints their ratio per pair and
its median (--json: every number); warm-up is excluded. JAX runs training's jitted
`train_step` (or `eval_step`); torch the same step on weights_conversion.torch_reference
(AMP, AdamW, clipping). A timed call runs --steps_per_call steps and one device wait.
"""

import contextlib
import datetime
import json
import os
import platform
import shlex
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from hyperiqa_jax import config_defaults
from hyperiqa_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# nano: a width-8 Swin on 56x56 crops (tests); micro: a narrow one-block-per-stage Swin-T;
# demo: configs/demo.py (JAX only: the reference has no local-energy stem).
MODELS = ("nano", "micro", "tiny", "small", "base", "demo")
MICRO_BACKBONE = {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)}
# Backbone overrides the PyTorch reference (timm's Swin) cannot build.
JAX_ONLY_OVERRIDES = ("stem_channels", "patch_norm")

# Dense peak FLOP/s by device kind (vendor figures), for MFU; the first key found in the
# device kind counts (H100 PCIe before H100 SXM). float32 matmuls run as TF32 on these GPUs
# and as bf16 passes on TPUs.
BF16_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "L4": 121e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
                   "TPU v5p": 459e12, "TPU v6 lite": 918e12}
FP32_PEAK_FLOPS = {"H100 PCIe": 378e12, "H100": 494e12, "H200": 494e12, "A100": 156e12,
                   "L4": 60e12,
                   **{k: v for k, v in BF16_PEAK_FLOPS.items() if k.startswith("TPU")}}


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """The card's dense peak for `dtype` ('bfloat16' or 'float32'), None when unknown."""
    table = BF16_PEAK_FLOPS if dtype == "bfloat16" else FP32_PEAK_FLOPS
    for key, value in table.items():
        if key.lower() in device_kind.lower():
            return value
    return None


def jax_only_overrides(model_config) -> list[str]:
    """The model's backbone overrides the PyTorch reference cannot build (sorted; [] if none)."""
    return sorted(set(JAX_ONLY_OVERRIDES) & set(dict(model_config.backbone_overrides or {})))


def model_config(size: str, dtype: str):
    """The E6 config of `size` (demo: the demo's) with the compute dtype set explicitly."""
    name = {"micro": "tiny", "nano": "tiny"}.get(size, size)
    config = (config_defaults.demo_config() if name == "demo"
              else config_defaults.reference_config(name))
    m = config.model
    m.dtype = dtype
    if size == "micro":
        m.backbone_overrides.update(MICRO_BACKBONE)
    if size == "nano":  # stage maps 56/28/14/7, as the heads need; target net 98-14-7-7-7-1
        m.backbone_overrides.update(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                                    patch_size=1, window_size=7)
        m.img_size = config.data.crop_size = 56
        m.hyper_feature_widths, m.hyper_in_channels = (16, 16), 16
        m.target_in_size, m.target_fc_sizes = 98, (14, 7, 7, 7)
    return config


class JaxRunner:
    """hyperiqa_jax.train's jitted train (or eval) step on a fixed batch: `step()` dispatches
    one, `sync()` waits; `lowered` and `compiled` give XLA's cost and memory analyses."""

    def __init__(self, config, mode, images, scores):
        from hyperiqa_jax import lowering, state, train

        train.check_config(config)
        model, tx, abstract_state, _ = lowering.abstract_train_inputs(config)
        mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.devices()[:1])
        rng = jax.random.PRNGKey(config.seed)
        init_fn = lambda r: state.init_train_state(model, tx, config.data.crop_size, r)
        train_fn, eval_fn, shardings = train.compile_steps(model, tx, config, (0.0, 1.0), mesh,
                                                           abstract_state)
        self.state = jax.jit(init_fn, out_shardings=shardings["state"])(rng)
        self.mode = mode
        n = len(images)
        if mode == "eval":
            fn = eval_fn
            self.batch = jax.device_put({"image": images, "image_index": np.arange(n),
                                         "valid": np.ones(n, bool)}, shardings["batch"])
            self.variables = state.inference_variables(self.state)
            self.state = None  # the optimiser state is not needed: free it
            args = (self.variables, self.batch)
        else:
            fn = train_fn
            self.batch = jax.device_put({"image": images, "score": scores}, shardings["batch"])
            args = (self.state, self.batch)
        self.lowered = fn.lower(*args)
        self.compiled = self.lowered.compile()
        self.last = None

    def step(self):
        if self.mode == "eval":
            self.last = self.compiled(self.variables, self.batch)
        else:  # The state is donated: keep the new one.
            self.state, self.last = self.compiled(self.state, self.batch)

    def sync(self):
        jax.block_until_ready(self.last)

    def memory(self) -> dict:
        out = {}
        analysis = self.compiled.memory_analysis()
        if analysis is not None:
            out.update(temp_mb=analysis.temp_size_in_bytes / 2**20,
                       argument_mb=analysis.argument_size_in_bytes / 2**20,
                       output_mb=analysis.output_size_in_bytes / 2**20)
        stats = jax.devices()[0].memory_stats()  # None on the CPU.
        if stats and "peak_bytes_in_use" in stats:
            out["peak_mb"] = stats["peak_bytes_in_use"] / 2**20
        return out

    def flops(self, which="compiled") -> float | None:
        """XLA's FLOP count of the compiled step (or of the lowered, unoptimised HLO)."""
        cost = (self.compiled if which == "compiled" else self.lowered).cost_analysis()
        cost = (cost[0] if isinstance(cost, list) else cost) or {}
        return None if cost.get("flops") is None else float(cost["flops"])


class TorchRunner:
    """The same step for weights_conversion.torch_reference.HyperIQAReference, channels-last
    on a GPU (NCHW on the CPU); `compile` wraps the model in torch.compile."""

    def __init__(self, config, mode, images, scores, *, compile=False):
        import torch

        from weights_conversion.torch_reference import HyperIQAReference

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = HyperIQAReference(config.model).to(self.device)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(self.device)
        self.scores = torch.from_numpy(scores).to(self.device)
        self.mode = mode
        self.autocast = config.model.dtype == "bfloat16"
        self.layout = "channels_last" if self.device == "cuda" else "nchw"
        if self.device == "cuda":  # The fast settings a PyTorch user would pick on a GPU.
            self.model = self.model.to(memory_format=torch.channels_last)
            self.images = self.images.contiguous(memory_format=torch.channels_last)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.last = None
        if mode == "eval":
            self.model.eval()
        else:  # The optimiser before torch.compile, which prefixes the parameter names.
            self.model.train()
            backbone = [p for n, p in self.model.named_parameters() if n.startswith("backbone.")]
            rest = [p for n, p in self.model.named_parameters() if not n.startswith("backbone.")]
            lr, wd = config.train.lr, config.train.weight_decay
            self.optimizer = torch.optim.AdamW(
                [{"params": backbone, "lr": lr},
                 {"params": rest, "lr": lr * config.train.lr_ratio}], weight_decay=wd)
        if compile:
            self.model = torch.compile(self.model)

    def memory(self) -> dict:
        if self.device == "cuda":
            return {"peak_mb": self.torch.cuda.max_memory_allocated() / 2**20}
        return {}

    def step(self):
        torch = self.torch
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            if self.mode == "eval":
                with torch.no_grad():
                    self.last = self.model(self.images)["score"]
                return
            self.optimizer.zero_grad(set_to_none=True)
            loss = (self.model(self.images)["score"].float() - self.scores).abs().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.last = loss

    def sync(self):
        self.last.float().sum().item()  # waits for the device (a CUDA sync)


def build(framework, config, mode, batch, **torch_options):
    """A runner on a fixed random batch, after its first step (compilation, warm-up)."""
    from hyperiqa_jax.data import normalize

    rng = np.random.RandomState(0)
    size = config.data.crop_size
    crops = rng.randint(0, 256, (batch, size, size, 3)).astype(np.uint8)
    scores = rng.uniform(0, 100, batch).astype(np.float32)
    start = time.perf_counter()
    if framework == "jax":  # uint8, normalised in the step as in training
        runner = JaxRunner(config, mode, crops, scores)
    else:  # the reference takes normalised float32 images (its data loader's job)
        runner = TorchRunner(config, mode, normalize(crops), scores, **torch_options)
    runner.step()
    runner.sync()
    return runner, time.perf_counter() - start


def timed(runner, steps_per_call: int = 1) -> float:
    """Seconds per step over one call of `steps_per_call` steps and one wait."""
    start = time.perf_counter()
    for _ in range(steps_per_call):
        runner.step()
    runner.sync()
    return (time.perf_counter() - start) / steps_per_call


def command_line(module, flag_values) -> str:
    """`python -m MODULE` with the flags given on its command line (as a shell would take it)."""
    given = {id(flag): flag for name in flag_values if (flag := flag_values[name]).present}
    return shlex.join(["python", "-m", module, *(flag.serialize() for flag in given.values())])


def environment() -> dict:
    """The machine, package versions, commit and date a result was measured with."""
    from importlib import metadata

    from hyperiqa_jax.export import source_commit

    versions = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "numpy", "pillow", "grain", "torch", "timm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    info = Path("/proc/cpuinfo").read_text() if os.path.isfile("/proc/cpuinfo") else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines()
             if line.startswith("model name")]  # Linux: the CPU's model
    return {"device": str(jax.devices()[0].device_kind), "devices": jax.device_count(),
            "cpu": (names or [platform.processor() or platform.machine()])[0],
            "cpu_count": os.cpu_count(), "system": platform.platform(), "versions": versions,
            "commit": source_commit(),  # "+dirty" with local changes
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def define_flags(flag_values=None):
    """The command's flags (absl), on `flag_values` (default: the global FLAGS)."""
    fv = dict(flag_values=flag_values) if flag_values is not None else {}
    flags.DEFINE_enum("framework", "jax", ["jax", "torch"], "What to time (without --vs).", **fv)
    flags.DEFINE_bool("vs", False, "Time jax and torch alternately; print their ratio.", **fv)
    flags.DEFINE_enum("model", "tiny", list(MODELS), "E6 model with a Swin-T/S/B backbone "
                      "(micro, nano: small ones for smoke tests; demo: JAX only).", **fv)
    flags.DEFINE_enum("mode", "eval", ["eval", "train"], "Forward only, or a training step.",
                      **fv)
    flags.DEFINE_integer("batch", 8, "Images per step (224x224; nano: 56x56).", **fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.", **fv)
    flags.DEFINE_integer("repeats", 5, "Timed calls per framework.", **fv)
    flags.DEFINE_integer("steps_per_call", 1, "Steps per timed call (one wait at its end).",
                         **fv)
    flags.DEFINE_bool("torch_compile", False, "Wrap the torch model in torch.compile.", **fv)
    flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s for MFU (default: by device kind).", **fv)
    flags.DEFINE_bool("json", False, "Print one JSON object instead.", **fv)


def measure(model, mode, batch, dtype="float32", frameworks=("jax",), *, repeats=5,
            steps_per_call=1, torch_compile=False, peak=None) -> dict:
    """Builds one runner per framework, times them alternately; the result --json prints."""
    config = model_config(model, dtype)
    unsupported = jax_only_overrides(config.model)
    if unsupported and "torch" in frameworks:
        raise ConfigError(f"the PyTorch reference has no counterpart of the backbone overrides "
                          f"{unsupported}: time --model {model} with --framework jax")
    runners, warmup = {}, {}
    for name in frameworks:
        options = {"compile": torch_compile} if name == "torch" else {}
        runners[name], warmup[name] = build(name, config, mode, batch, **options)
    times = {name: [] for name in frameworks}
    for _ in range(repeats):
        for name in frameworks:
            times[name].append(timed(runners[name], steps_per_call))

    device = str(jax.devices()[0].device_kind)
    result = {"model": model, "mode": mode, "batch": batch, "dtype": dtype,
              "steps_per_call": steps_per_call, "device": device, "frameworks": {}}
    for name, runner in runners.items():
        median = float(np.median(times[name]))
        entry = {"images_per_s": batch / median, "median_s": median, "warmup_s": warmup[name],
                 "times_s": times[name], **runner.memory()}
        if name == "jax":
            flops, peak = runner.flops(), peak or peak_flops(device, dtype)
            entry.update(flops_per_step=flops, peak_flops=peak,
                         flops_lowered=runner.flops("lowered"),
                         mfu=flops / median / peak if flops and peak else None)
        else:
            entry.update(layout=runner.layout, compiled=torch_compile)
        result["frameworks"][name] = entry
    if len(frameworks) == 2:
        result["ratios"] = [t / j for j, t in zip(times["jax"], times["torch"])]
        result["median_ratio"] = float(np.median(result["ratios"]))
    return result


def main(argv, flag_values=None) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flag_values if flag_values is not None else flags.FLAGS
    result = measure(args.model, args.mode, args.batch, args.dtype,
                     ("jax", "torch") if args.vs else (args.framework,), repeats=args.repeats,
                     steps_per_call=args.steps_per_call, peak=args.peak_flops or None,
                     torch_compile=args.torch_compile)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.model} {args.mode} batch {args.batch} {args.dtype} on {result['device']}")
    for name, entry in result["frameworks"].items():
        mfu = f", MFU {entry['mfu']:.1%}" if entry.get("mfu") else ""
        print(f"  {name:<6} {entry['images_per_s']:8.2f} images/s  (median {entry['median_s']:.3f}"
              f" s/step, warm-up {entry['warmup_s']:.1f} s{mfu})")
    if args.vs:
        print("  jax/torch per pair: " + " ".join(f"{r:.2f}" for r in result["ratios"]))
        print(f"  median jax/torch ratio: {result['median_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    from hyperiqa_jax import cli

    cli.run(main, define_flags=define_flags)
