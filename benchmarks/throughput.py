"""Images/second of the full E6 model, JAX against the PyTorch reference (timm backbone).

    python -m benchmarks.throughput --framework jax --model tiny --mode eval --batch 8
    python -m benchmarks.throughput --vs --model base --mode train --batch 8 --repeats 5
    python -m benchmarks.throughput --vs --model tiny --mode eval --batch 8 --json
    python -m benchmarks.throughput --model demo --mode train --repeats 10 --steps_per_call 20

`--vs` runs both frameworks in one process, alternating one timed call of each so
both see the same machine load, and prints the JAX/torch ratio per pair and its
median. Warm-up (JAX compilation, first torch call) is timed apart and excluded.

The JAX step is the one training runs: `state.init_train_state` and the jitted
`train_step` of `train.compile_steps` (state donated, batch sharded over a
one-device mesh, uint8 crops normalised in the step); for eval, `train.eval_step`.
The torch step is the same computation on weights_conversion.torch_reference's
HyperIQAReference: forward with dropout and drop path, L1 loss, backward,
global-norm clipping at 1.0, AdamW with the backbone's learning rate and x10 for
the rest (optim.make_optimizer). A timed call runs `--steps_per_call` steps, then
waits for the device once (on a GPU the dispatch of step k+1 overlaps step k, as
in training); the reported time is per step.
"""

import datetime
import json
import os
import platform
import shlex
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from hyperiqa_jax import config_defaults
from hyperiqa_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# "nano": 56x56 crops of a width-8 Swin with one block per stage and small heads (tests).
# "micro": Swin-T E6 with a narrow one-block-per-stage backbone (~0.35 GFLOPs per image).
# "demo": configs/demo.py, the model `make demo` trains (JAX only: the PyTorch reference has
# no local-energy stem); its train step at batch 8 is most of the demo's wall time.
MODELS = ("nano", "micro", "tiny", "small", "base", "demo")
MICRO_BACKBONE = {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)}
# Backbone overrides that timm's Swin, and so the PyTorch reference, has no counterpart of:
# the demo's local-energy stem and its missing patch LayerNorm.
JAX_ONLY_OVERRIDES = ("stem_channels", "patch_norm")

# Dense peak FLOP/s by device kind (vendor figures), for MFU. float32 matmuls run as TF32 on
# these GPUs by default (jax_default_matmul_precision), and as bf16 passes on TPUs.
# The first key found in the device kind counts (H100 PCIe before H100 SXM).
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
    """hyperiqa_jax.train's jitted train step (or evaluation step) on a fixed batch.

    `step()` dispatches one step, `sync()` waits for it; `compiled` is the executable
    that runs, `lowered` its input to XLA (both for cost and memory analysis).
    """

    name = "jax"

    def __init__(self, config, mode, images, scores):
        from hyperiqa_jax import models, optim, state, train

        train.check_config(config)
        model = models.build_model(config.model)
        tx = optim.make_optimizer(config.train, steps_per_epoch=100)
        mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.devices()[:1])
        rng = jax.random.PRNGKey(config.seed)
        init_fn = lambda r: state.init_train_state(model, tx, config.data.crop_size, r)
        abstract_state = jax.eval_shape(init_fn, rng)
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
    """The same step for weights_conversion.torch_reference.HyperIQAReference.

    layout: "nchw" (contiguous), "channels_last", or "auto" (channels-last on a GPU).
    compile: wrap the model in torch.compile.
    """

    name = "torch"

    def __init__(self, config, mode, images, scores, *, compile=False, layout="auto"):
        import torch

        from weights_conversion.torch_reference import HyperIQAReference

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = HyperIQAReference(config.model).to(self.device)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(self.device)
        self.scores = torch.from_numpy(scores).to(self.device)
        self.mode = mode
        self.autocast = config.model.dtype == "bfloat16"
        self.layout = layout if layout != "auto" else (
            "channels_last" if self.device == "cuda" else "nchw")
        if self.layout == "channels_last":
            self.model = self.model.to(memory_format=torch.channels_last)
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        if self.device == "cuda":  # The fast settings a PyTorch user would pick on a GPU.
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
    given = []
    for name in flag_values:
        flag = flag_values[name]
        if flag.present and flag not in given:
            given.append(flag)
    return shlex.join(["python", "-m", module, *(flag.serialize() for flag in given)])


def git(*args) -> str | None:
    """`git ARGS` in this checkout: its output, or None when it fails."""
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment() -> dict:
    """The machine, package versions, commit and date a result was measured with."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "numpy", "pillow", "grain", "torch", "timm"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    info = Path("/proc/cpuinfo").read_text() if os.path.isfile("/proc/cpuinfo") else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines()
             if line.startswith("model name")]  # Linux: the CPU's model
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"device": str(jax.devices()[0].device_kind), "devices": jax.device_count(),
            "cpu": (names or [platform.processor() or platform.machine()])[0],
            "cpu_count": os.cpu_count(), "system": platform.platform(),
            "versions": versions, "commit": git("rev-parse", "HEAD"),
            "tree_dirty": None if dirty is None else bool(dirty),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def define_flags(flag_values=None):
    """The command's flags (absl), on `flag_values` (default: the global FLAGS)."""
    fv = dict(flag_values=flag_values) if flag_values is not None else {}
    flags.DEFINE_enum("framework", "jax", ["jax", "torch"],
                      "Which implementation to time (ignored with --vs).", **fv)
    flags.DEFINE_bool("vs", False, "Time jax and torch alternately in this process; print the "
                      "JAX/torch ratio per pair and their median.", **fv)
    flags.DEFINE_enum("model", "tiny", list(MODELS), "Swin-T, Swin-S or Swin-B backbone in the "
                      "E6 model (micro: a narrow one-block-per-stage Swin-T, for smoke tests; "
                      "nano: a tiny model on 56x56 crops, for tests; demo: configs/demo.py, "
                      "JAX only).", **fv)
    flags.DEFINE_enum("mode", "eval", ["eval", "train"], "eval: forward only; train: forward, "
                      "backward and AdamW update.", **fv)
    flags.DEFINE_integer("batch", 8, "Images per call (224x224; nano: 56x56).", **fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                      "Compute dtype (torch: autocast to it).", **fv)
    flags.DEFINE_integer("repeats", 5, "Timed calls per framework.", **fv)
    flags.DEFINE_integer("steps_per_call", 1, "Steps per timed call, one device wait at its "
                         "end.", **fv)
    flags.DEFINE_integer("threads", 0, "torch CPU threads (0: torch's default).", **fv)
    flags.DEFINE_bool("torch_compile", False, "Wrap the torch model in torch.compile.", **fv)
    flags.DEFINE_enum("torch_layout", "auto", ["auto", "nchw", "channels_last"],
                      "torch memory format (auto: channels-last on GPU).", **fv)
    flags.DEFINE_float("peak_flops", 0.0, "Device peak FLOP/s for MFU (default: looked up by "
                       "device kind and dtype; float32 against the TF32 peak).", **fv)
    flags.DEFINE_bool("json", False, "Print one JSON object instead.", **fv)


def measure(model, mode, batch, dtype="float32", frameworks=("jax",), *, repeats=5,
            steps_per_call=1, torch_options=None, peak=None) -> dict:
    """Builds one runner per framework, times them alternately; the result --json prints."""
    config = model_config(model, dtype)
    unsupported = jax_only_overrides(config.model)
    if unsupported and "torch" in frameworks:
        raise ConfigError(f"the PyTorch reference has no counterpart of the backbone overrides "
                          f"{unsupported}: time --model {model} with --framework jax")
    runners, warmup = {}, {}
    for name in frameworks:
        runners[name], warmup[name] = build(name, config, mode, batch,
                                            **((torch_options or {}) if name == "torch" else {}))
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
            entry.update(layout=runner.layout, compiled=bool((torch_options or {}).get("compile")))
        result["frameworks"][name] = entry
    if len(frameworks) == 2:
        result["ratios"] = [t / j for j, t in zip(times["jax"], times["torch"])]
        result["median_ratio"] = float(np.median(result["ratios"]))
    return result


def main(argv, flag_values=None) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flag_values if flag_values is not None else flags.FLAGS
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    result = measure(args.model, args.mode, args.batch, args.dtype,
                     ("jax", "torch") if args.vs else (args.framework,), repeats=args.repeats,
                     steps_per_call=args.steps_per_call, peak=args.peak_flops or None,
                     torch_options={"compile": args.torch_compile, "layout": args.torch_layout})
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
