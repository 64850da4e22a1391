r"""Ablation A1: Swin-B, four-stage fusion, no attention (plain concatenation).

    python -m hyperiqa_jax.train --config configs/ablation_multiscale.py \
        --workdir runs/a1 --config.data.root=/data/koniq10k \
        --config.pretrained_backbone=weights/swin_base_patch4_window7_224

The PyTorch original's result on KonIQ-10k test: SRCC 0.9353, PLCC 0.9458.

Precision (hyperiqa_jax/config_defaults.py): model.dtype="auto" trains and scores in bfloat16
on a GPU or TPU (float32 parameters and optimiser) and in float32 on the CPU;
--config.model.dtype=float32 forces float32 everywhere.
"""

from hyperiqa_jax.config_defaults import reference_config


def get_config():
    config = reference_config("base")
    config.model.attention = "none"
    return config
