r"""E6, the PyTorch original's best model: Swin-B, four-stage fusion, channel attention.

    python -m hyperiqa_jax.train --config configs/base.py --workdir runs/base \
        --config.data.root=/data/koniq10k \
        --config.pretrained_backbone=weights/swin_base_patch4_window7_224

The PyTorch original's result on the KonIQ-10k test split: SRCC 0.9378, PLCC 0.9485
(88-89M parameters, 15.3 GMACs at 224).

Precision (hyperiqa_jax/config_defaults.py): model.dtype="auto" trains and scores in bfloat16
on a GPU or TPU (float32 parameters and optimiser) and in float32 on the CPU;
--config.model.dtype=float32 forces float32 everywhere.
"""

from hyperiqa_jax.config_defaults import reference_config


def get_config():
    return reference_config("base")
