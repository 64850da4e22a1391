"""Ablation A1: Swin-B, four-stage fusion, no attention (plain concatenation).

    python -m hyperiqa_jax.train --config configs/ablation_multiscale.py \
        --workdir runs/a1 --config.data.root=/data/koniq10k \
        --config.pretrained_backbone=weights/swin_base_patch4_window7_224

Seed's result on KonIQ-10k test: SRCC 0.9353, PLCC 0.9458.
"""

from configs.common import seed_config


def get_config():
    config = seed_config("base")
    config.model.attention = "none"
    return config
