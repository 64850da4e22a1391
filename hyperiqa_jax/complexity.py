"""Parameters and FLOPs of a config's model, next to the PyTorch original's reported figures.

    python -m hyperiqa_jax.complexity --config configs/base.py
    python -m hyperiqa_jax.complexity --config configs/tiny.py --config configs/small.py

FLOPs come from XLA's cost analysis of the compiled eval forward pass for one
224x224 image (XLA counts a multiply-add as 2 FLOPs; MACs = FLOPs / 2, which is
the unit of the PyTorch original's "GFLOPs").
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hyperiqa_jax import cli, config_checks
from hyperiqa_jax.models import build_model

# The PyTorch original's reported figures: (params in millions, GMACs), None where not reported.
REFERENCE_FIGURES = {
    "swin_base_patch4_window7_224/channel": (88.5, 15.3),
    "swin_small_patch4_window7_224/channel": (50.8, 8.7),
    "swin_tiny_patch4_window7_224/channel": (29.5, 4.5),
}


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def complexity(model_config, batch: int = 1) -> dict:
    """{'params', 'backbone_params', 'flops', 'macs'} of one eval forward pass per image."""
    model = build_model(model_config)
    size = int(model_config.get("img_size", 224))
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    forward = jax.jit(lambda v, x: model.apply(v, x)["score"])
    cost = forward.lower(variables, images).compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older jax returns one dict per device.
        cost = cost[0]
    flops = float(cost.get("flops", float("nan"))) / batch
    return {"params": count_params(variables["params"]),
            "backbone_params": count_params(variables["params"]["backbone"]),
            "flops": flops, "macs": flops / 2}


def reference_figures(model_config):
    key = f"{model_config.backbone}/{model_config.attention}"
    if model_config.get("multi_scale", True) is False:
        key += "/single"
    return REFERENCE_FIGURES.get(key)


def format_row(name: str, model_config, result: dict) -> str:
    reference = reference_figures(model_config)
    reference_text = (f"{reference[0]:.1f}M / {reference[1]:.1f}G" if reference else "-")
    return (f"| {name} | {model_config.backbone} | {model_config.attention} | "
            f"{'yes' if model_config.multi_scale else 'no'} | {result['params'] / 1e6:.2f}M | "
            f"{result['flops'] / 1e9:.2f} | {result['macs'] / 1e9:.2f} | {reference_text} |")


def define_flags(flag_values=flags.FLAGS):
    """The command's flags (defined when it runs, see hyperiqa_jax/cli.py)."""
    flags.DEFINE_multi_string("config", None, "A configs/*.py file; repeat for one table row "
                              "per config.", flag_values=flag_values)


def main(argv, flag_values=flags.FLAGS) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flag_values.config:
        raise app.UsageError("give at least one --config, e.g. --config configs/base.py")
    print("| config | backbone | attention | multi-scale | params | GFLOPs (XLA) | GMACs "
          "| original params / GMACs |")
    print("|---|---|---|---|---|---|---|---|")
    for path in flag_values.config:
        config = config_checks.load_config_file(path)
        print(format_row(path, config.model, complexity(config.model)), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags=define_flags)
