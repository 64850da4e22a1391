r"""Converts a full PyTorch HyperIQA / SMART-IQA checkpoint into this project's variables.

    python -m weights_conversion.convert_checkpoint --config configs/smart_iqa_scale.py \
        --checkpoint best_model.pth --out weights/smart_iqa_base
    python -m weights_conversion.convert_checkpoint --config configs/resnet50_hyperiqa.py \
        --checkpoint koniq_pretrained.pkl --out weights/hyperiqa_koniq --format hyperiqa

Formats (detected from the keys unless --format names one): reference (this
project's torch_reference state dict), smart_iqa, hyperiqa (original
koniq_pretrained.pkl), pyiqa. Files are read with torch.load(weights_only=True)
or safetensors. The output directory (hyperiqa_jax.params_io) holds the model's
variables: {'params': ...} and, for ResNet-50, {'batch_stats': ...}.
Config fields can be overridden as --config.model.backbone=swin_tiny_patch4_window7_224.
"""


from absl import app, flags
from ml_collections import config_flags

from hyperiqa_jax import cli
from hyperiqa_jax.params_io import save_params
from weights_conversion import hyperiqa as conversion
from weights_conversion.swin import ConversionError, load_state_dict_file

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags (defined when it runs, see hyperiqa_jax/cli.py)."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py) of the model the "
                                    "checkpoint holds; --config.model.KEY=VALUE overrides.",
                                    lock_config=True)
    flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint (.pth, .pt, .pkl, .safetensors).")
    flags.DEFINE_string("out", None, "Output directory.")
    flags.DEFINE_enum("format", "auto", ("auto", *conversion.FORMATS),
                      "Checkpoint format (auto: detected from its keys).")


def convert(config, checkpoint: str, out: str, fmt: str = "auto") -> dict:
    """Reads `checkpoint`, converts it for `config.model`, writes `out`; returns meta."""
    state_dict = conversion.unwrap(load_state_dict_file(checkpoint))
    detected = conversion.detect_format(state_dict) if fmt == "auto" else fmt
    variables = conversion.convert_state_dict(state_dict, config.model, detected)
    meta = {"contents": "variables", "format": detected, "source": str(checkpoint),
            "model": config.model.to_dict()}
    save_params(out, variables, meta)
    return meta


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.config is None or not FLAGS.checkpoint or not FLAGS.out:
        raise app.UsageError("usage: --config configs/X.py --checkpoint FILE --out DIR "
                             "[--format F]")
    meta = convert(FLAGS.config, FLAGS.checkpoint, FLAGS.out, FLAGS.format)
    print(f"converted {FLAGS.checkpoint} ({meta['format']} format) -> {FLAGS.out}")
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags=define_flags, expected=(ConversionError,))
