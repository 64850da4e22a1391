"""Images/second of the full E6 model, JAX against the PyTorch reference (timm backbone).

    python -m benchmarks.throughput --framework jax --model tiny --mode eval --batch 8
    python -m benchmarks.throughput --vs --model base --mode train --batch 8 --repeats 5
    python -m benchmarks.throughput --vs --model tiny --mode eval --batch 8 --json

`--vs` runs both frameworks in one process, alternating one timed call of each
so both see the same machine load, and prints the JAX/torch ratio per pair and
its median. Warm-up (JAX compilation, first torch call) is timed separately and
excluded. The train step is the same in both: forward with dropout and drop
path, L1 loss, backward, global-norm clipping at 1.0, AdamW with the backbone
learning rate and x10 for the rest (hyperiqa_jax.optim.make_optimizer).
"""

import argparse
import importlib
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

MODELS = ("tiny", "small", "base")
# Dense bf16 peak FLOP/s by device kind (vendor figures), for MFU.
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
                   "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
                   "TPU v6 lite": 918e12}


def peak_flops(device_kind: str) -> float | None:
    for key, value in BF16_PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return value
    return None


def model_config(size: str, dtype: str):
    config = importlib.import_module(f"configs.{size}").get_config()
    config.model.dtype = dtype
    return config


class JaxRunner:
    """One jitted eval or train step of hyperiqa_jax's model on a fixed batch."""

    name = "jax"

    def __init__(self, config, mode, images, scores):
        from hyperiqa_jax.models import build_model
        from hyperiqa_jax.optim import make_optimizer

        model = build_model(config.model)
        self.images = jnp.asarray(images)
        self.scores = jnp.asarray(scores)
        variables = jax.jit(lambda: model.init(jax.random.key(0), self.images[:1]))()
        self.params = variables["params"]
        self.mode = mode
        if mode == "eval":
            def call(params, x):
                return model.apply({"params": params}, x)["score"]
            self.compiled = jax.jit(call).lower(self.params, self.images).compile()
            return
        tx = make_optimizer(config.train, steps_per_epoch=100)
        self.opt_state = tx.init(self.params)

        def step(params, opt_state, x, y, rng):
            def loss_fn(p):
                pred = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})["score"]
                return jnp.mean(jnp.abs(pred - y))
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return jax.tree.map(jnp.add, params, updates), opt_state, loss

        self.rng = jax.random.key(1)
        self.compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
            self.params, self.opt_state, self.images, self.scores, self.rng).compile()

    def memory(self) -> dict:
        analysis = self.compiled.memory_analysis()
        if analysis is None:
            return {}
        return {"temp_mb": analysis.temp_size_in_bytes / 2**20,
                "argument_mb": analysis.argument_size_in_bytes / 2**20}

    def flops(self) -> float | None:
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"]) if cost and "flops" in cost else None

    def __call__(self):
        if self.mode == "eval":
            jax.block_until_ready(self.compiled(self.params, self.images))
        else:
            self.params, self.opt_state, loss = self.compiled(
                self.params, self.opt_state, self.images, self.scores, self.rng)
            jax.block_until_ready(loss)


class TorchRunner:
    """The same step for weights_conversion.torch_reference.HyperIQAReference."""

    name = "torch"
    compile = False  # --torch-compile

    def __init__(self, config, mode, images, scores):
        import torch

        from weights_conversion.torch_reference import HyperIQAReference

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = HyperIQAReference(config.model).to(self.device)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(self.device)
        self.scores = torch.from_numpy(scores).to(self.device)
        self.mode = mode
        self.autocast = config.model.dtype == "bfloat16"
        if self.device == "cuda":  # The fast settings a PyTorch user would pick on a GPU.
            self.model = self.model.to(memory_format=torch.channels_last)
            self.images = self.images.contiguous(memory_format=torch.channels_last)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if TorchRunner.compile:
            self.model = torch.compile(self.model)
        if mode == "eval":
            self.model.eval()
            return
        self.model.train()
        backbone = [p for n, p in self.model.named_parameters() if n.startswith("backbone.")]
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("backbone.")]
        lr, wd = config.train.lr, config.train.weight_decay
        self.optimizer = torch.optim.AdamW(
            [{"params": backbone, "lr": lr}, {"params": rest, "lr": lr * config.train.lr_ratio}],
            weight_decay=wd)

    def memory(self) -> dict:
        if self.device == "cuda":
            return {"peak_mb": self.torch.cuda.max_memory_allocated() / 2**20}
        return {}

    def __call__(self):
        torch = self.torch
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            if self.mode == "eval":
                with torch.no_grad():
                    self.model(self.images)["score"].float().sum().item()
                return
            self.optimizer.zero_grad(set_to_none=True)
            loss = (self.model(self.images)["score"].float() - self.scores).abs().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        loss.item()


def build(framework, config, mode, batch):
    rng = np.random.RandomState(0)
    images = rng.randn(batch, 224, 224, 3).astype(np.float32)
    scores = rng.uniform(0, 100, batch).astype(np.float32)
    runner_cls = JaxRunner if framework == "jax" else TorchRunner
    start = time.perf_counter()
    runner = runner_cls(config, mode, images, scores)
    runner()  # The first call: compilation / allocator warm-up.
    return runner, time.perf_counter() - start


def timed(runner) -> float:
    start = time.perf_counter()
    runner()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Median images/s of the full E6 model (JAX vs the PyTorch reference). "
                    "On CPU, preload tcmalloc for both (docs/benchmarks.md).")
    parser.add_argument("--framework", choices=("jax", "torch"), default="jax",
                        help="which implementation to time (ignored with --vs)")
    parser.add_argument("--vs", action="store_true",
                        help="time jax and torch alternately in this process; print the "
                             "JAX/torch ratio per pair and their median")
    parser.add_argument("--model", choices=MODELS, default="tiny",
                        help="Swin-T, Swin-S or Swin-B backbone in the E6 model")
    parser.add_argument("--mode", choices=("eval", "train"), default="eval",
                        help="eval: forward only; train: forward, backward and AdamW update")
    parser.add_argument("--batch", type=int, default=8, help="images (224x224) per call")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (torch: autocast to it)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per framework")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument("--torch-compile", action="store_true",
                        help="wrap the torch model in torch.compile")
    parser.add_argument("--peak-flops", type=float, default=0.0,
                        help="device peak FLOP/s for MFU (default: looked up by device kind)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    TorchRunner.compile = args.torch_compile

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    config = model_config(args.model, args.dtype)
    frameworks = ("jax", "torch") if args.vs else (args.framework,)
    runners, warmup = {}, {}
    for name in frameworks:
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        runners[name], warmup[name] = build(name, config, args.mode, args.batch)
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        runners[name].rss_growth_mb = (rss_after - rss_before) / 1024

    times = {name: [] for name in frameworks}
    for _ in range(args.repeats):
        for name in frameworks:
            times[name].append(timed(runners[name]))

    result = {"model": args.model, "mode": args.mode, "batch": args.batch, "dtype": args.dtype,
              "device": str(jax.devices()[0].device_kind), "frameworks": {}}
    for name in frameworks:
        median = float(np.median(times[name]))
        entry = {"images_per_s": args.batch / median, "median_s": median,
                 "warmup_s": warmup[name], "times_s": times[name],
                 "rss_growth_mb": runners[name].rss_growth_mb, **runners[name].memory()}
        if name == "jax":
            flops = runners[name].flops()
            peak = args.peak_flops or peak_flops(result["device"])
            entry["flops_per_step"] = flops
            entry["mfu"] = flops / median / peak if flops and peak else None
        result["frameworks"][name] = entry
    if args.vs:
        ratios = [t / j for j, t in zip(times["jax"], times["torch"])]
        result["ratios"] = ratios
        result["median_ratio"] = float(np.median(ratios))

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
    sys.exit(main())
