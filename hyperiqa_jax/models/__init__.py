"""Model family: HyperIQA with a Swin (E6 / A1 / A2, SMART-IQA) or ResNet-50 (C0) backbone."""

import jax
import jax.numpy as jnp

from hyperiqa_jax.models.hyperiqa import HyperIQA
from hyperiqa_jax.models.resnet import ResNet50
from hyperiqa_jax.models.swin import SwinTransformer, swin_from_name

RESNET_BACKBONES = ("resnet50",)
# Widths of the 1x1 convs in front of hyper_in_feat: the original HyperIQA reduces
# layer4's 2048 channels 2048 -> 1024 -> 512; the Swin variants use 512 -> 256.
HYPER_FEATURE_WIDTHS = {"resnet": (1024, 512), "swin": (512, 256)}


DTYPES = ("auto", "float32", "bfloat16")
ACCELERATOR_DTYPE = "bfloat16"  # model.dtype="auto" on a GPU or TPU; float32 on the CPU.


def compute_dtype(model_config, platform: str | None = None) -> jnp.dtype:
    """`model_config.dtype`, with "auto" resolved for `platform` ("cpu", "cuda", "tpu", ...).

    `platform` is where the model will run: JAX's default backend unless given. A step
    compiled here for another machine (hyperiqa_jax.aot, lowering) names that machine's.
    """
    name = model_config.dtype
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {DTYPES}, got {name!r}")
    if name == "auto":
        platform = platform or jax.default_backend()
        name = "float32" if platform == "cpu" else ACCELERATOR_DTYPE
    return jnp.dtype(name)


def build_backbone(model_config, platform: str | None = None):
    """The backbone module named by `model_config.backbone` (a timm Swin name or 'resnet50').

    `platform`: where it will run (see `compute_dtype`); JAX's default backend unless given.
    """
    dtype = compute_dtype(model_config, platform)
    if model_config.backbone in RESNET_BACKBONES:
        return ResNet50(dtype=dtype, remat=model_config.remat)
    overrides = dict(model_config.backbone_overrides or {})
    overrides.setdefault("img_size", model_config.img_size)
    overrides.setdefault("drop_path_rate", model_config.drop_path_rate)
    overrides.setdefault("kernels", model_config.kernels)
    overrides.setdefault("remat", model_config.remat)
    overrides["dtype"] = dtype
    return swin_from_name(model_config.backbone, **overrides)


def build_model(model_config, platform: str | None = None) -> HyperIQA:
    """HyperIQA for a config's model section (config_defaults.model_config; every field is read).

    `platform`: where it will run, which "auto" precision follows (see `compute_dtype`).
    """
    kind = "resnet" if model_config.backbone in RESNET_BACKBONES else "swin"
    widths = model_config.hyper_feature_widths or HYPER_FEATURE_WIDTHS[kind]
    return HyperIQA(
        backbone=build_backbone(model_config, platform),
        multi_scale=bool(model_config.multi_scale),
        attention=str(model_config.attention),
        hyper_feature_widths=tuple(widths),
        hyper_in_channels=int(model_config.hyper_in_channels),
        target_in_size=int(model_config.target_in_size),
        target_fc_sizes=tuple(model_config.target_fc_sizes),
        feature_size=int(model_config.feature_size),
        dropout=float(model_config.dropout),
        attention_dropout=float(model_config.attention_dropout),
        attention_gate_bias=float(model_config.attention_gate_bias),
        small_target_init=bool(model_config.small_target_init),
        dtype=compute_dtype(model_config, platform),
    )


__all__ = ["HyperIQA", "ResNet50", "SwinTransformer", "build_backbone", "build_model",
           "compute_dtype", "swin_from_name"]
