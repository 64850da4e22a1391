r"""Checks that the JAX models compute what their PyTorch counterparts compute (float32, CPU).

Swin mode (--model): the Swin backbone against timm (`features_only=True`),
stage by stage:

    python -m weights_conversion.validate_parity --model swin_tiny_patch4_window7_224
    python -m weights_conversion.validate_parity --model swin_base_patch4_window7_224 \
        --checkpoint swin_base.pth --img_size 256 --json

Full-model mode (--config): a config's whole HyperIQA model against
weights_conversion.torch_reference (every intermediate, the attention and the
score) and, with --train_step, three training steps (at each, the loss, the
gradients and the optimiser's update on the same inputs):

    python -m weights_conversion.validate_parity --config configs/tiny.py
    python -m weights_conversion.validate_parity --config configs/resnet50_hyperiqa.py \
        --checkpoint koniq_pretrained.pkl
    python -m weights_conversion.validate_parity --config configs/base.py --train_step

Without --checkpoint the weights are seeded random weights, perturbed away from
their init. Prints each difference against its limit (--json: as JSON). The
limits are relative (weights_conversion/parity_limits.py): an output's largest
absolute difference may be at most a fraction of its magnitude, the larger of
the reference's largest |value| and 1, because float32 rounding grows with the
values and differs between CPUs. A Swin stage's fraction is --tolerance.
Exit status: 0 when everything is within its limit; 1 when anything is not (a
Swin stage above --tolerance x its magnitude; a full-model output; with
--train_step, a training step); 2 for a usage error (a missing file, a
checkpoint that does not fit).
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hyperiqa_jax import cli, config_checks
from hyperiqa_jax.models.swin import SWIN_CONFIGS
from weights_conversion import parity_limits
from weights_conversion import swin as swin_conversion
from weights_conversion.hyperiqa import FORMATS

# Errors this command reports as user errors (exit status 2), besides errors.UserError.
EXPECTED = (swin_conversion.ConversionError,)


def swin_parity(name: str, *, checkpoint: str | None = None, state_dict=None, batch: int = 2,
                img_size: int = 224, seed: int = 0, kernels: str = "auto") -> dict:
    """Per-stage differences between timm and the converted JAX Swin on random images.

    Weights: `state_dict`, else the file `checkpoint`, else seeded random timm
    weights moved away from their init (`torch_reference.perturb`). `kernels`:
    the JAX model's implementation choice (hyperiqa_jax/models/cpu_kernels.py).
    """
    import timm
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.manual_seed(seed)
    timm_model = timm.create_model(name, pretrained=False, features_only=True, img_size=img_size)
    if state_dict is None and checkpoint:
        state_dict = swin_conversion.load_state_dict_file(checkpoint)
    if state_dict is None:
        from weights_conversion.torch_reference import perturb
        perturb(timm_model, seed)
        state_dict = timm_model.state_dict()
    else:  # Run timm on the same weights the JAX model gets.
        timm_model.load_state_dict(_timm_features_state_dict(state_dict))
    params = swin_conversion.convert_state_dict(state_dict, name, img_size=img_size)
    timm_model.eval()

    images = np.random.RandomState(seed).randn(batch, img_size, img_size, 3).astype(np.float32)
    with torch.no_grad():
        expected = timm_model(torch.from_numpy(images).permute(0, 3, 1, 2))
    model = swin_conversion.swin_from_name(name, img_size=img_size, kernels=kernels)
    got = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(images))
    return {f"stage{i}": parity_limits.difference(g, e.numpy())
            for i, (g, e) in enumerate(zip(got, expected))}


def _timm_features_state_dict(state_dict) -> dict:
    """Any accepted layout in the names of timm's features_only wrapper, buffers dropped."""
    names = swin_conversion.timm_names(
        swin_conversion.strip_prefixes(swin_conversion.unwrap_state_dict(state_dict)))
    return {re.sub(r"^layers\.(\d+)\.", r"layers_\1.", k): swin_conversion.torch_tensor(v)
            for k, v in names.items() if not swin_conversion.IGNORED.search(k)}


def swin_stages_ok(results: dict, tolerance: float = parity_limits.SWIN_STAGE_RELATIVE) -> bool:
    """True when every stage of `swin_parity`'s results is within `tolerance` x its magnitude."""
    return all(diff["max_abs"] <= parity_limits.swin_stage_limit(diff["ref_max_abs"], tolerance)
               for diff in results.values())


def report(results: dict, tolerance: float) -> bool:
    """Prints the per-stage differences against their limits; True when all are within."""
    print(f"{'output':<12} {'max abs':>12} {'max rel':>12} {'|ref| max':>12} {'limit':>9}")
    for key, diff in results.items():
        limit = parity_limits.swin_stage_limit(diff["ref_max_abs"], tolerance)
        flag = "" if diff["max_abs"] <= limit else "  <-- above tolerance"
        print(f"{key:<12} {diff['max_abs']:12.3e} {diff['max_rel']:12.3e} "
              f"{diff['ref_max_abs']:12.3e} {limit:9.1e}{flag}")
    ok = swin_stages_ok(results, tolerance)
    print(f"{'PASS' if ok else 'FAIL'} (tolerance {tolerance:g} x max(|ref| max, 1))")
    return ok


def full_model_report(results: dict, quiet: bool = False) -> bool:
    """Prints the per-output differences (unless quiet); True when all are in tolerance."""
    ok = True
    say = (lambda *a: None) if quiet else print
    say(f"{'output':<22} {'max abs':>12} {'|ref| max':>12}  limit")
    for key, diff in results.items():
        if key.startswith("_"):
            continue
        limit = parity_limits.forward_limit(key, diff["ref_max_abs"])
        good = diff["max_abs"] <= limit
        ok &= good
        say(f"{key:<22} {diff['max_abs']:12.3e} {diff['ref_max_abs']:12.3e}  {limit:.1e}"
            + ("" if good else "  <-- above tolerance"))
    scores = results.get("_scores", {})
    if scores:
        say(f"scores jax {scores['jax']} torch {scores['torch']}")
    say("PASS" if ok else "FAIL")
    return ok


def train_step_report(step: dict, quiet: bool = False) -> bool:
    """Prints the train-step differences against their limits; True when all are within."""
    limits = parity_limits.train_step_limits(step)  # what tests/weights_conversion asserts
    ok = True
    say = (lambda *a: None) if quiet else print
    say(f"{'train step':<26} {'value':>12}  limit")
    for key, limit in limits.items():
        if key not in step:
            continue
        good = step[key] <= limit
        ok &= good
        say(f"{key:<26} {step[key]:12.3e}  {limit:.1e}" + ("" if good else "  <-- above limit"))
    say(f"train step {'PASS' if ok else 'FAIL'}")
    return ok


def swin_main(args) -> int:
    """The Swin-only mode: exit status 0 when every stage is within --tolerance, else 1."""
    if args.img_size % 32:
        raise app.UsageError(f"--img_size must be a multiple of 32, got {args.img_size}")
    results = swin_parity(args.model, checkpoint=args.checkpoint, batch=args.batch,
                          img_size=args.img_size, seed=args.seed)
    if args.json:
        print(json.dumps({"model": args.model, "img_size": args.img_size, "results": results},
                         indent=2))
        ok = swin_stages_ok(results, args.tolerance)
    else:
        ok = report(results, args.tolerance)
    return 0 if ok else 1


def full_model_main(args) -> int:
    """The --config mode: exit status 0 when the forward pass, and with --train_step the
    training steps, are within their limits; 1 when either is not."""
    # Before importing torch: a wrong path fails at once.
    config = config_checks.load_config_file(args.config)
    from weights_conversion import hyperiqa_parity

    results = hyperiqa_parity.forward_parity(
        config.model, batch=args.batch, seed=args.seed, checkpoint=args.checkpoint,
        fmt=args.format)
    forward_ok = full_model_report(results, quiet=args.json)
    output = {"config": args.config, "forward": results, "forward_ok": forward_ok}
    step_ok = True
    if args.train_step:
        step = hyperiqa_parity.train_step_parity(config, batch=args.batch, seed=args.seed)
        step_ok = train_step_report(step, quiet=args.json)
        output.update(train_step=step, train_step_ok=step_ok)
    if args.json:
        print(json.dumps(output, indent=2, default=str))
    return 0 if forward_ok and step_ok else 1


# The flags of one mode only: a mistake to give in the other.
SWIN_ONLY = ("model", "img_size", "tolerance")
FULL_MODEL_ONLY = ("format", "train_step")


def define_flags(flag_values=flags.FLAGS):
    """The command's flags (defined when it runs, see hyperiqa_jax/cli.py)."""
    f = dict(flag_values=flag_values)
    flags.DEFINE_enum("model", None, list(SWIN_CONFIGS), "Swin mode: the timm Swin to compare, "
                      "e.g. swin_base_patch4_window7_224.", **f)
    flags.DEFINE_string("config", None, "Full-model mode instead: a configs/*.py file whose "
                        "whole HyperIQA model is compared with the PyTorch reference.", **f)
    flags.DEFINE_string("checkpoint", None, "Weights to load in both frameworks. Swin mode: "
                        "a .pth / .pt / .safetensors Swin state dict; --config mode: a full "
                        "checkpoint (see --format). Default: seeded random weights, perturbed "
                        "away from their init.", **f)
    flags.DEFINE_enum("format", "auto", ["auto", *FORMATS], "--config mode: the --checkpoint's "
                      "format (auto: detected from its keys).", **f)
    flags.DEFINE_integer("batch", 2, "Random images compared.", lower_bound=1, **f)
    flags.DEFINE_integer("img_size", 224, "Swin mode: image size, a multiple of 32.",
                         lower_bound=32, **f)
    flags.DEFINE_integer("seed", 0, "Seed of the random images and weights.", **f)
    flags.DEFINE_float("tolerance", parity_limits.SWIN_STAGE_RELATIVE, "Swin mode: largest "
                       "max absolute difference allowed per stage, relative to the stage's "
                       "magnitude: the limit is TOLERANCE x max(largest |timm value| of the "
                       "stage, 1).", lower_bound=0.0, **f)
    flags.DEFINE_bool("train_step", False, "--config mode: also compare three training steps "
                      "(dropout off); exit status 1 when one is outside its limits.", **f)
    flags.DEFINE_bool("json", False, "Print the differences as JSON instead of tables.", **f)


def main(argv, flag_values=flags.FLAGS) -> int:
    """Exit status 0 within tolerance, 1 outside it, 2 a usage error."""
    args = flag_values
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    mode, other = ("--config", SWIN_ONLY) if args.config else ("Swin", FULL_MODEL_ONLY)
    wrong = [f"--{name}" for name in other if args[name].present]
    if wrong:
        raise app.UsageError(f"{', '.join(wrong)} cannot be used in {mode} mode (--model: "
                             "Swin backbone; --config: full model)")
    if args.config:
        return full_model_main(args)
    if not args.model:
        raise app.UsageError("give --model NAME (Swin backbone) or --config FILE (full model)")
    return swin_main(args)


if __name__ == "__main__":
    cli.run(main, define_flags=define_flags, expected=EXPECTED)
