r"""E6 with a Swin-T backbone (drop path 0.2, dropout 0.3).

    python -m hyperiqa_jax.train --config configs/tiny.py --workdir runs/tiny \
        --config.data.root=/data/koniq10k \
        --config.pretrained_backbone=weights/swin_tiny_patch4_window7_224

The PyTorch original's result on KonIQ-10k test: SRCC 0.9249, PLCC 0.9360
(29.5M parameters, 4.5 GMACs).

Precision (hyperiqa_jax/config_defaults.py): model.dtype="auto" trains and scores in bfloat16
on a GPU or TPU (float32 parameters and optimiser) and in float32 on the CPU;
--config.model.dtype=float32 forces float32 everywhere.
"""

from hyperiqa_jax.config_defaults import reference_config


def get_config():
    return reference_config("tiny")
