"""timm / Microsoft Swin state dicts -> params of `hyperiqa_jax.models.swin.SwinTransformer`.

Accepted layouts (detected from the keys):
- timm >= 0.9: `layers.{i}.downsample` at the start of stages 1-3;
- timm's `features_only` wrapper: `layers_{i}.*`;
- old timm / official Microsoft: `downsample` at the end of stages 0-2,
  persistent `relative_position_index` / `attn_mask` buffers, a classifier
  `head` and final `norm`, often nested under `'model'`;
- any of these behind `module.` / `backbone.` prefixes.

Anything that is neither a backbone parameter nor one of the known extras
(buffers, classifier, final norm) is an error, and so is any parameter the
model needs that the file does not provide.
"""

import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hyperiqa_jax.models.swin import SwinTransformer, swin_from_name

PREFIXES = ("module.", "backbone.", "encoder.", "model.")
# Keys that exist in full classification checkpoints but not in a features_only backbone.
IGNORED = re.compile(r"(relative_position_index|attn_mask)$|^head\b|^norm\.")


class ConversionError(ValueError):
    """A checkpoint does not fit the model; the message lists what does not."""

    @classmethod
    def check(cls, what: str, unknown, missing, mismatched) -> None:
        """Raises one error listing every unknown key, missing parameter and shape mismatch."""
        if not (unknown or missing or mismatched):
            return
        lines = [f"checkpoint does not match {what}:"]
        for title, items in (("unknown keys", unknown), ("missing parameters", missing),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(sorted(items)[:50])
                             + (" ..." if len(items) > 50 else ""))
        raise cls("\n".join(lines))


def to_numpy(value) -> np.ndarray:
    """A torch tensor or array-like -> float32/int numpy array (torch is optional)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch.
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def torch_tensor(value):
    """A numpy array or torch tensor -> torch tensor (for loading into reference models)."""
    import torch
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


def unwrap_state_dict(state_dict: Mapping) -> dict:
    """Finds the tensors in `{'model': ...}` / `{'state_dict': ...}` wrappers."""
    for key in ("model", "state_dict", "model_state", "params"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            return unwrap_state_dict(state_dict[key])
    return dict(state_dict)


def strip_prefixes(state_dict: Mapping, prefixes=PREFIXES) -> dict:
    """Removes a prefix shared by every key (repeatedly: `module.backbone.x` -> `x`)."""
    keys = list(state_dict)
    changed = True
    while changed and keys:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in keys):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                keys = list(state_dict)
                changed = True
    return dict(state_dict)


def timm_names(state_dict: Mapping) -> dict:
    """Rewrites any accepted layout into timm >= 0.9 names (`layers.{i}.blocks.{j}...`)."""
    state_dict = {re.sub(r"^layers_(\d+)\.", r"layers.\1.", k): v for k, v in state_dict.items()}
    # Old layout: stage 0 owns a downsample (new layout: stage 0 never has one).
    if any(k.startswith("layers.0.downsample.") for k in state_dict):
        state_dict = {
            re.sub(r"^layers\.(\d+)\.downsample\.",
                   lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k): v
            for k, v in state_dict.items()}
    return state_dict


def flax_path(timm_key: str) -> tuple[tuple[str, ...], str]:
    """timm key -> (flax param path, how to transform the tensor)."""
    parts = timm_key.split(".")
    leaf = parts[-1]
    path = []
    i = 0
    while i < len(parts) - 1:
        if parts[i] in ("layers", "blocks") and i + 1 < len(parts) - 1 and parts[i + 1].isdigit():
            path.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        else:
            path.append(parts[i])
            i += 1
    module = path[-1] if path else ""
    if leaf == "relative_position_bias_table":
        return tuple(path + [leaf]), "copy"
    if module.startswith("norm"):  # LayerNorm: norm, norm1, norm2.
        return tuple(path + [{"weight": "scale", "bias": "bias"}.get(leaf, leaf)]), "copy"
    if module == "proj" and path[-2] == "patch_embed" and leaf == "weight":
        return tuple(path + ["kernel"]), "conv"
    if leaf == "weight":
        return tuple(path + ["kernel"]), "linear"
    return tuple(path + [leaf]), "copy"


def convert_state_dict(state_dict: Mapping, name: str | SwinTransformer, **overrides) -> dict:
    """Converts a Swin state dict to the `params` tree of `swin_from_name(name, **overrides)`.

    Values may be numpy arrays or torch tensors. Raises ConversionError listing
    unknown keys, missing parameters and shape mismatches.
    """
    model = name if isinstance(name, SwinTransformer) else swin_from_name(name, **overrides)
    expected = traverse_util.flatten_dict(jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, model.img_size, model.img_size, 3))))
        ["params"])

    state_dict = timm_names(strip_prefixes(unwrap_state_dict(state_dict)))
    converted, unknown, mismatched, mismatched_paths = {}, [], [], set()
    for key, value in state_dict.items():
        if IGNORED.search(key):
            continue
        path, how = flax_path(key)
        if path not in expected:
            unknown.append(key)
            continue
        array = to_numpy(value)
        if how == "linear":
            array = array.T
        elif how == "conv":
            array = array.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O).
        if array.shape != expected[path].shape:
            mismatched.append(f"{key}: file {array.shape} vs model {expected[path].shape}"
                              " (flax layout)")
            mismatched_paths.add(path)
            continue
        converted[path] = array.astype(np.float32)
    missing = ["/".join(p) for p in expected if p not in converted and p not in mismatched_paths]
    ConversionError.check(getattr(model, "name", None) or str(name), unknown, missing,
                          mismatched)
    return traverse_util.unflatten_dict(converted)


def load_state_dict_file(path: str | Path) -> dict:
    """Reads `.safetensors`, or `.pth`/`.pt`/`.bin` with weights_only (never arbitrary pickles)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        return load_file(str(path))
    import pickle

    import torch
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"refusing to load {path}: it holds Python objects other than tensors, and "
            f"unpickling them could run code. Re-save it as a plain state dict "
            f"(torch.save(model.state_dict(), ...)) or as .safetensors.\n  ({error})") from None
    except RuntimeError as error:
        raise ConversionError(f"cannot read {path} as a PyTorch checkpoint: {error}") from None
