"""Parameter trees on disk: what the conversion commands write and training/scoring read.

A params directory is an Orbax checkpoint of a nested dict of float32 arrays,
plus `meta.json` saying what it holds (model name, source file, format).
"""

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from hyperiqa_jax.errors import ConfigError

META_FILE = "meta.json"
PARAMS_DIR = "params"


def save_params(directory: str | os.PathLike, params, meta: dict | None = None) -> Path:
    """Writes `params` (and `meta`) atomically: a partial write never replaces a good one."""
    directory = Path(directory).absolute()
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    params = jax.tree.map(np.asarray, params)  # host copies: Orbax writes plain arrays
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
    (tmp / META_FILE).write_text(json.dumps(meta or {}, indent=2, sort_keys=True))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def load_params(directory: str | os.PathLike):
    """Reads a params directory written by `save_params`; returns (params, meta)."""
    directory = Path(directory)
    if not (directory / PARAMS_DIR).is_dir():
        raise FileNotFoundError(
            f"no converted parameters in {directory} (expected {directory / PARAMS_DIR}). "
            "Convert PyTorch weights first, e.g.\n  python -m weights_conversion.convert_timm "
            "--model swin_base_patch4_window7_224 --checkpoint swin_base.pth "
            f"--out {directory}")
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory.absolute() / PARAMS_DIR)
    meta_path = directory / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return params, meta


DOWNLOAD_HINT = (
    "Converted backbone weights are an Orbax params directory. Download the timm "
    "checkpoint (e.g. swin_base_patch4_window7_224 from huggingface.co/timm) and convert it:\n"
    "  python -m weights_conversion.convert_timm --model NAME --checkpoint FILE --out DIR\n"
    "then pass --config.pretrained_backbone=DIR (or set it to '' to train from scratch).")


def load_backbone(path, backbone_params):
    """Converted backbone params from `path`, checked against the model's shapes."""
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"pretrained_backbone {path} does not exist.\n{DOWNLOAD_HINT}")
    loaded, _ = load_params(path)
    if set(loaded) == {"backbone"}:
        loaded = loaded["backbone"]
    want = {jax.tree_util.keystr(k): v.shape
            for k, v in jax.tree_util.tree_flatten_with_path(backbone_params)[0]}
    got = {jax.tree_util.keystr(k): np.shape(v)
           for k, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    if want != got:
        missing = sorted(set(want) - set(got))[:5]
        extra = sorted(set(got) - set(want))[:5]
        shape = [k for k in set(want) & set(got) if want[k] != got[k]][:5]
        raise ConfigError(f"pretrained_backbone {path} does not fit the configured backbone: "
                          f"missing {missing}, unexpected {extra}, wrong shape {shape}. "
                          "Convert the checkpoint that matches config.model.backbone.")
    return jax.tree.map(lambda ref, x: np.asarray(x, ref.dtype), backbone_params, loaded)
