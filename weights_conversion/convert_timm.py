r"""Converts timm / Microsoft Swin weights into a params directory this project loads.

    python -m weights_conversion.convert_timm --model swin_base_patch4_window7_224 \
        --checkpoint swin_base_patch4_window7_224.pth --out weights/swin_base
    python -m weights_conversion.convert_timm --model swin_base_patch4_window7_224 \
        --pretrained --out weights/swin_base      # downloads through timm (needs internet)

The output is what `configs/*.py` expect in `config.pretrained_backbone`. The
conversion is checked before saving: timm with the same weights and the
converted JAX model must agree on every stage within a fraction of the stage's
magnitude (weights_conversion/parity_limits.py; skip with --no_verify).
Exit status: 0 saved, 1 the parity check failed (nothing saved), 2 a usage error.
"""

import sys

import jax
import numpy as np
from absl import app, flags

from hyperiqa_jax import cli
from hyperiqa_jax.models.swin import SWIN_CONFIGS
from hyperiqa_jax.params_io import save_params
from weights_conversion import parity_limits
from weights_conversion import swin as swin_conversion

# Errors this command reports as user errors (exit status 2), besides errors.UserError.
EXPECTED = (swin_conversion.ConversionError, ConnectionError)


def pretrained_state_dict(name: str) -> dict:
    """timm's pretrained weights for `name` (downloads: the only place the project may)."""
    import socket

    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    where = "\n".join(f"  {u}" for u in (
        cfg.hf_hub_id and f"https://huggingface.co/{cfg.hf_hub_id} (model.safetensors)",
        cfg.url) if u)
    advice = (f"Download one of these elsewhere:\n{where}\n"
              "copy it to this machine and pass it with --checkpoint FILE.")
    try:  # Fail fast offline instead of waiting through the hub client's retries.
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError as error:
        raise ConnectionError(f"no network access to fetch {name} ({error}).\n{advice}") from None
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as error:  # timm raises many kinds here; all mean "could not fetch".
        raise ConnectionError(f"could not download pretrained weights for {name} "
                              f"({type(error).__name__}: {error}).\n{advice}") from None
    return model.state_dict()


def define_flags(flag_values=flags.FLAGS):
    """The command's flags (defined when it runs, see hyperiqa_jax/cli.py)."""
    flags.DEFINE_enum("model", None, sorted(SWIN_CONFIGS), "timm model name (required).",
                      flag_values=flag_values)
    flags.DEFINE_string("checkpoint", None, "Weights to convert: a .pth / .pt / .bin file "
                        "(loaded with weights_only=True) or a .safetensors file. Give this or "
                        "--pretrained.", flag_values=flag_values)
    flags.DEFINE_bool("pretrained", False, "Fetch timm's pretrained weights for --model instead "
                      "of --checkpoint (needs internet).", flag_values=flag_values)
    flags.DEFINE_string("out", None, "Output directory, written atomically (required).",
                        flag_values=flag_values)
    flags.DEFINE_bool("no_verify", False, "Skip the parity check against timm before saving "
                      "(the check needs torch and timm).", flag_values=flag_values)


def main(argv, flag_values=flags.FLAGS) -> int:
    """Exit status 0 saved, 1 parity with timm failed (nothing saved), 2 a usage error."""
    args = flag_values
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    missing = [f"--{name}" for name in ("model", "out") if not args[name].value]
    if missing:
        raise app.UsageError(f"{' and '.join(missing)} required, e.g. --model "
                             "swin_base_patch4_window7_224 --checkpoint FILE --out DIR")
    if bool(args.checkpoint) == bool(args.pretrained):
        raise app.UsageError("give exactly one of --checkpoint FILE and --pretrained")

    if args.pretrained:
        state_dict = pretrained_state_dict(args.model)
        source_name = f"timm:{args.model} (pretrained)"
    else:
        state_dict = swin_conversion.load_state_dict_file(args.checkpoint)
        source_name = args.checkpoint
    params = swin_conversion.convert_state_dict(state_dict, args.model)
    count = sum(int(np.size(v)) for v in jax.tree.leaves(params))
    print(f"converted {count:,} parameters of {args.model} from {source_name}")

    if not args.no_verify:
        from weights_conversion.validate_parity import swin_parity, swin_stages_ok
        results = swin_parity(args.model, state_dict=state_dict, batch=1)
        worst = max(d["max_abs"] / parity_limits.magnitude(d["ref_max_abs"])
                    for d in results.values())
        print(f"parity with timm: largest difference over the 4 stages {worst:.2e} of the "
              f"stage's magnitude (limit {parity_limits.SWIN_STAGE_RELATIVE:g})")
        if not swin_stages_ok(results):
            print("error: converted model disagrees with timm; nothing saved", file=sys.stderr)
            return 1
    out = save_params(args.out, params, {"model": args.model, "source": source_name,
                                         "format": "swin_backbone"})
    print(f"saved to {out}")
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags=define_flags, expected=EXPECTED)
