"""Config files: loading one by path, and checking a config before anything is set up.

Every key and its default live in config_defaults.py; `check_config` only
reads the config (unknown keys, impossible values), so what a run saves is
what the user gave.
"""

import dataclasses
import difflib
import importlib.util
import os

import jax

from hyperiqa_jax import config_defaults, data
from hyperiqa_jax import models as models_lib
from hyperiqa_jax.errors import ConfigError


def load_config_file(path):
    """`get_config()` of a config file, e.g. configs/base.py (a --config that is a plain path,
    without ml_collections' --config.KEY=VALUE overrides)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such config file (the project's configs are "
                          "configs/*.py)")
    return load_python_file(path, "command_config").get_config()


def load_python_file(path, name):
    """The module a Python file defines, run from its path (configs and studies are files,
    not an importable package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_config(config):
    """Rejects unknown keys and values that cannot work; returns `config` unchanged.

    Raises `ConfigError` naming the key, so a mistake stops the run before the
    first step instead of failing inside it (or, for a typo, being ignored).
    Every key and its default live in config_defaults.py.
    """
    template = config_defaults.reference_config()
    for section in ("", "train", "data", "model"):
        node = config if not section else config.get(section)
        keys = set((template if not section else template[section]).keys())
        if node is None:
            raise ConfigError(f"config has no '{section}' section (start from "
                              "hyperiqa_jax.config_defaults.reference_config())")
        for key in node.keys():
            if key not in keys:
                prefix = f"{section}." if section else ""
                close = difflib.get_close_matches(key, sorted(keys), n=1)
                hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
                raise ConfigError(f"unknown config key '{prefix}{key}'{hint} "
                                  f"(every key is listed in hyperiqa_jax/config_defaults.py)")
    _check_values(config)
    n = jax.device_count()
    for name, value in (("batch_size", config.train.batch_size),
                        ("eval_batch_size", eval_batch_size(config.train))):
        if value % n:
            raise ConfigError(f"train.{name}={value} must be divisible by the {n} devices")
    return config


def eval_batch_size(train_config):
    """train.eval_batch_size, 0 meaning train.batch_size."""
    return train_config.eval_batch_size or train_config.batch_size


# Values that must be at least 1 / at least 0 (`section.key`).
AT_LEAST_ONE = ("train.batch_size", "train.epochs", "train.log_every_steps",
                "train.checkpoint_every_steps", "train.keep_checkpoints",
                "train.stop_check_every_steps", "data.crop_size",
                "data.train_crops", "data.test_crops", "data.mix_images", "data.prefetch",
                "data.crop_step", "model.img_size")
AT_LEAST_ZERO = ("train.max_steps", "train.eval_every_steps", "train.eval_every_epochs",
                 "train.eval_batch_size", "train.patience", "train.warmup_steps",
                 "train.weight_decay", "train.grad_clip", "train.lr_ratio",
                 "train.ranking_loss_weight", "data.num_workers")
AT_LEAST_MINUS_ONE = ("data.worker_processes",)
CHOICES = {"train.loss": ("l1", "smooth_l1"),
           "train.schedule": ("cosine_epoch", "warmup_cosine", "constant"),
           "data.eval_protocol": data.PROTOCOLS}
WHY = {"data.crop_step": " (1: crop corners anywhere; 8: on JPEG's 8x8 block grid)",
       "train.eval_batch_size": " (0: the same as train.batch_size)",
       "train.max_steps": " (0: train.epochs decides)"}


def _check_values(config):
    """Counts, ranges and names in the config (see check_config)."""
    from hyperiqa_jax.models.cpu_kernels import KERNELS
    from hyperiqa_jax.models.hyperiqa import ATTENTIONS
    from hyperiqa_jax.models.swin import REMAT, SWIN_CONFIGS, SwinTransformer

    def get(key):
        section, _, name = key.partition(".")
        return config[section].get(name)

    def number(key):
        value = get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return value

    for key in AT_LEAST_ONE:
        if get(key) is not None and number(key) < 1:
            raise ConfigError(f"{key}={get(key)} must be at least 1{WHY.get(key, '')}")
    for key in AT_LEAST_ZERO:
        if get(key) is not None and number(key) < 0:
            raise ConfigError(f"{key}={get(key)} must be at least 0{WHY.get(key, '')}")
    for key in AT_LEAST_MINUS_ONE:
        if number(key) < -1:
            raise ConfigError(f"{key}={get(key)} must be -1 (automatic) or at least 0")
    if not number("train.lr") > 0:
        raise ConfigError(f"train.lr={config.train.lr} must be positive")
    if not 0 <= number("data.max_bad_fraction") <= 1:
        raise ConfigError(f"data.max_bad_fraction={config.data.max_bad_fraction} must be "
                          "between 0 and 1 (the fraction of images allowed to fail to decode)")
    choices = dict(CHOICES, **{"model.attention": ATTENTIONS, "model.dtype": models_lib.DTYPES,
                               "model.kernels": KERNELS, "model.remat": REMAT})
    choices["model.backbone"] = tuple(SWIN_CONFIGS) + models_lib.RESNET_BACKBONES
    choices["data.name"] = data.DATASETS
    for key, allowed in choices.items():
        value = get(key)
        if value not in allowed:
            close = (difflib.get_close_matches(str(value), allowed, n=1)
                     or [a for a in allowed if str(value) and str(value) in a])
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}{hint}")
    if config.model.attention == "scale" and not config.model.multi_scale:
        raise ConfigError("model.attention='scale' weighs the four stages: it needs "
                          "model.multi_scale=True")
    overrides = set(dict(config.model.get("backbone_overrides") or {}))
    fields = {f.name for f in dataclasses.fields(SwinTransformer)} - {"parent", "name"}
    if config.model.backbone in SWIN_CONFIGS and overrides - fields:
        raise ConfigError(f"model.backbone_overrides has unknown Swin field(s) "
                          f"{sorted(overrides - fields)}; known: {', '.join(sorted(fields))}")
    swin = dict(config.model.get("backbone_overrides") or {})
    stride, patch = swin.get("stem_stride", 1), swin.get("patch_size", SwinTransformer.patch_size)
    if not (isinstance(stride, int) and stride >= 1 and patch % stride == 0):
        raise ConfigError(f"model.backbone_overrides.stem_stride={stride!r} must be a whole "
                          f"number that divides the patch size ({patch})")
    try:  # the resize against the crop (the data module's own check)
        data.target_size(config.data.crop_size, config.data.crop_size, config.data.resize,
                         config.data.crop_size)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e) if isinstance(e, ConfigError) else
                          f"data.resize={config.data.resize!r}: {e}") from None
