"""Full HyperIQA / SMART-IQA checkpoints -> variables of `hyperiqa_jax.models.build_model(config)`.

Four formats, each renamed into this project's reference names
(`weights_conversion/torch_reference.py`) by one function, then converted once:

    reference   this project's HyperIQAReference state dict: backbone.*, lda.*, attention.*,
                hyper.*
    smart_iqa   public SMART-IQA HyperNet: swin.backbone.layers_{i}.*, swin.lda{k}_pool.0,
                swin.lda{k}_fc, multiscale_attention.attention_net.{0,3}, conv1.{0,2,4},
                fc{k}w_conv, fc{k}b_fc, fc5w_fc
    hyperiqa    original HyperIQA (koniq_pretrained.pkl): res.<torchvision resnet50 names>,
                res.lda{k}_pool.0, res.lda{k}_fc, conv1.{0,2,4}, fc{k}w_conv, fc{k}b_fc, fc5w_fc
    pyiqa       pyiqa's HyperNet: base_model.<timm resnet50 names>, lda_modules.{i}.*,
                fc_w_modules.{i}.*, fc_b_modules.{i}.2.*, conv1.{0,2,4}

Unknown keys, missing parameters and shape mismatches raise ConversionError
listing them. Tensor layouts: Linear (out, in) -> (in, out); Conv (O, I, kh, kw)
-> (kh, kw, I, O). The Linear layers after an NCHW flatten (LDA) need no
reordering because the JAX model flattens in NCHW order too.
"""

import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hyperiqa_jax.models import RESNET_BACKBONES, build_model
from weights_conversion import swin as swin_conversion
from weights_conversion.swin import ConversionError, to_numpy

FORMATS = ("reference", "smart_iqa", "hyperiqa", "pyiqa")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "params", "params_ema", "net",
                "model_hyper")
SHARED_PREFIXES = ("module.", "net.", "model.")
# Buffers a state dict may hold that carry nothing the JAX model needs.
IGNORED = re.compile(r"(num_batches_tracked|relative_position_index|attn_mask)$")

# Hyper-network heads, named alike in SMART-IQA and the original HyperIQA.
_HYPER_HEAD_RULES = [
    (r"^conv1\.0\.", "hyper.feature_conv_0."),
    (r"^conv1\.2\.", "hyper.feature_conv_1."),
    (r"^conv1\.4\.", "hyper.feature_conv_2."),
    (r"^fc(\d)w_conv\.", r"hyper.fc\1_weight_conv."),
    (r"^fc(\d)b_fc\.", r"hyper.fc\1_bias_fc."),
    (r"^fc(\d)w_fc\.", r"hyper.fc\1_weight_fc."),
]


def _lda_rules(prefix: str) -> list:
    """`{prefix}lda{k}_pool.0` -> lda.conv_{k-1}; `{prefix}lda{k}_fc` -> lda.fc_{k-1}."""
    def index(match):
        return str(int(match.group(1)) - 1)
    return [
        (rf"^{re.escape(prefix)}lda(\d)_pool\.0\.", lambda m: f"lda.conv_{index(m)}."),
        (rf"^{re.escape(prefix)}lda(\d)_fc\.", lambda m: f"lda.fc_{index(m)}."),
    ]


def _apply_rules(state_dict: Mapping, rules: list, fmt: str) -> dict:
    """Renames every key by the first matching rule; a key no rule matches is an error."""
    renamed, unknown = {}, []
    for key, value in state_dict.items():
        if IGNORED.search(key):
            continue
        for pattern, replacement in rules:
            new_key, count = re.subn(pattern, replacement, key, count=1)
            if count:
                renamed[new_key] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{fmt} checkpoint: {len(unknown)} unknown key(s): " + ", ".join(sorted(unknown)[:50]))
    return renamed


def rename_reference(state_dict: Mapping) -> dict:
    """(a) This project's reference: names are already the reference names."""
    rules = [(r"^(backbone|lda|attention|hyper)\.", r"\1.")]
    return _apply_rules(state_dict, rules, "reference")


def rename_smart_iqa(state_dict: Mapping) -> dict:
    """(b) SMART-IQA's HyperNet (Swin backbone, optional scale attention)."""
    rules = [
        (r"^swin\.backbone\.", "backbone."),
        *_lda_rules("swin."),
        (r"^multiscale_attention\.attention_net\.0\.", "attention.hidden."),
        (r"^multiscale_attention\.attention_net\.3\.", "attention.logits."),
        *_HYPER_HEAD_RULES,
    ]
    return _apply_rules(state_dict, rules, "smart_iqa")


def rename_original_hyperiqa(state_dict: Mapping) -> dict:
    """(c) SSL92/hyperIQA's HyperNet: ResNet-50 and LDA under `res.`."""
    rules = [
        *_lda_rules("res."),
        (r"^res\.", "backbone."),
        *_HYPER_HEAD_RULES,
    ]
    return _apply_rules(state_dict, rules, "hyperiqa")


def rename_pyiqa(state_dict: Mapping) -> dict:
    """(d) pyiqa's HyperNet: timm resnet50 features under `base_model.`, ModuleLists."""
    rules = [
        (r"^base_model\.", "backbone."),
        (r"^lda_modules\.([0-2])\.0\.", r"lda.conv_\1."),
        (r"^lda_modules\.([0-2])\.3\.", r"lda.fc_\1."),
        (r"^lda_modules\.3\.2\.", "lda.fc_3."),
        (r"^fc_w_modules\.([0-3])\.", lambda m: f"hyper.fc{int(m.group(1)) + 1}_weight_conv."),
        (r"^fc_w_modules\.4\.2\.", "hyper.fc5_weight_fc."),
        (r"^fc_b_modules\.([0-4])\.2\.", lambda m: f"hyper.fc{int(m.group(1)) + 1}_bias_fc."),
        (r"^conv1\.0\.", "hyper.feature_conv_0."),
        (r"^conv1\.2\.", "hyper.feature_conv_1."),
        (r"^conv1\.4\.", "hyper.feature_conv_2."),
    ]
    return _apply_rules(state_dict, rules, "pyiqa")


RENAMERS: dict[str, Callable[[Mapping], dict]] = {
    "reference": rename_reference,
    "smart_iqa": rename_smart_iqa,
    "hyperiqa": rename_original_hyperiqa,
    "pyiqa": rename_pyiqa,
}


def unwrap(state_dict: Mapping) -> dict:
    """The tensors inside `{'state_dict': ...}`-style wrappers, without a shared `module.`."""
    while True:
        inner = next((state_dict[k] for k in WRAPPER_KEYS
                      if k in state_dict and isinstance(state_dict[k], Mapping)), None)
        if inner is None:
            break
        state_dict = inner
    state_dict = dict(state_dict)
    for prefix in SHARED_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def detect_format(state_dict: Mapping) -> str:
    keys = list(state_dict)
    if any(k.startswith("swin.") for k in keys):
        return "smart_iqa"
    if any(k.startswith("res.") for k in keys):
        return "hyperiqa"
    if any(k.startswith(("base_model.", "lda_modules.", "fc_w_modules.")) for k in keys):
        return "pyiqa"
    if any(k.startswith("hyper.") for k in keys) and any(k.startswith("backbone.") for k in keys):
        return "reference"
    raise ConversionError(
        "cannot tell the checkpoint format from its keys (first: "
        + ", ".join(keys[:5]) + f"); name it with --format ({', '.join(FORMATS)})")


# --- reference names -> flax variables -------------------------------------------------

def _array(value, kind: str) -> np.ndarray:
    array = to_numpy(value)
    if kind == "linear":
        return array.T
    if kind == "conv":
        return array.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
    return array


def _head_path(key: str, value) -> tuple[str, tuple[str, ...], str]:
    """Reference head key -> (collection, flax path, layout)."""
    *modules, leaf = key.split(".")
    if leaf == "weight":
        return "params", (*modules, "kernel"), "conv" if np.ndim(value) == 4 else "linear"
    return "params", (*modules, leaf), "copy"


def _resnet_path(key: str, value) -> tuple[str, tuple[str, ...], str]:
    """torchvision/timm resnet key (no prefix) -> (collection, flax path, layout)."""
    key = re.sub(r"^layer(\d)\.(\d+)\.", r"layer\1_\2.", key)
    key = key.replace("downsample.0.", "downsample_conv.").replace("downsample.1.",
                                                                   "downsample_bn.")
    *modules, leaf = key.split(".")
    module = modules[-1] if modules else ""
    if module.startswith(("bn", "downsample_bn")):
        collection, leaf = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                            "running_mean": ("batch_stats", "mean"),
                            "running_var": ("batch_stats", "var")}.get(leaf, ("params", leaf))
        return collection, ("backbone", *modules, leaf), "copy"
    if leaf == "weight":
        return "params", ("backbone", *modules, "kernel"), "conv"
    return "params", ("backbone", *modules, leaf), "copy"


def _swin_overrides(model_config) -> dict:
    overrides = dict(model_config.get("backbone_overrides", None) or {})
    overrides.pop("dtype", None)
    overrides.setdefault("img_size", model_config.get("img_size", 224))
    return overrides


def expected_shapes(model_config) -> dict:
    """{(collection, *path): shape} of the model's variables (no computation)."""
    model = build_model(model_config)
    size = int(model_config.get("img_size", 224))
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32)))
    return {k: v.shape for k, v in traverse_util.flatten_dict(dict(variables)).items()}


def reference_to_variables(state_dict: Mapping, model_config) -> dict:
    """Reference-named state dict -> {'params': ..., ['batch_stats': ...]} for build_model."""
    expected = expected_shapes(model_config)
    flat, unknown, mismatched, mismatched_paths = {}, [], [], set()
    backbone = {k[len("backbone."):]: v for k, v in state_dict.items()
                if k.startswith("backbone.")}
    is_resnet = model_config.backbone in RESNET_BACKBONES

    if not is_resnet:
        try:
            params = swin_conversion.convert_state_dict(
                backbone, model_config.backbone, **_swin_overrides(model_config))
        except ConversionError as error:
            raise ConversionError(f"backbone: {error}") from None
        for path, array in traverse_util.flatten_dict(params).items():
            flat[("params", "backbone", *path)] = array

    for key, value in state_dict.items():
        if IGNORED.search(key):
            continue
        if key.startswith("backbone."):
            if not is_resnet:
                continue
            sub = key[len("backbone."):]
            if sub.startswith("fc."):  # a classifier from a full ResNet state dict.
                continue
            collection, path, kind = _resnet_path(sub, value)
        else:
            collection, path, kind = _head_path(key, value)
        full = (collection, *path)
        if full not in expected:
            unknown.append(key)
            continue
        array = _array(value, kind)
        if array.shape != expected[full]:
            mismatched.append(f"{key}: file {array.shape} vs model {expected[full]}")
            mismatched_paths.add(full)
            continue
        flat[full] = array.astype(np.float32)

    # A mismatched parameter is reported once, not also as missing.
    missing = ["/".join(p) for p in expected if p not in flat and p not in mismatched_paths]
    ConversionError.check(
        f"the model of this config (backbone {model_config.backbone}, multi_scale "
        f"{model_config.multi_scale}, attention {model_config.attention})",
        unknown, missing, mismatched)
    return traverse_util.unflatten_dict(flat)


def convert_state_dict(state_dict: Mapping, model_config, fmt: str = "auto") -> dict:
    """Any supported full checkpoint -> variables of `build_model(model_config)`."""
    state_dict = unwrap(state_dict)
    if fmt == "auto":
        fmt = detect_format(state_dict)
    if fmt not in RENAMERS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
    return reference_to_variables(RENAMERS[fmt](state_dict), model_config)
