r"""The released SMART-IQA model: Swin-B, four-stage fusion weighted by scale attention.

Scale attention = softmax over the four stages from stage 3's global average
(Linear 1024->256, ReLU, Dropout 0.5, Linear 256->4), as in the public
SMART-IQA code, whose checkpoints convert with

    python -m weights_conversion.convert_checkpoint --config configs/smart_iqa_scale.py \
        --checkpoint best_model.pth --out weights/smart_iqa_base

Training it here:

    python -m hyperiqa_jax.train --config configs/smart_iqa_scale.py \
        --workdir runs/smart_iqa --config.data.root=/data/koniq10k \
        --config.pretrained_backbone=weights/swin_base_patch4_window7_224

The PyTorch original reports no separate number for this variant; its E6 target
(SRCC 0.9378, PLCC 0.9485) is the reference. For a Tiny/Small release
checkpoint set --config.model.backbone=swin_tiny_patch4_window7_224 (and its
drop_path_rate / dropout from hyperiqa_jax/config_defaults.py).

Precision (hyperiqa_jax/config_defaults.py): model.dtype="auto" trains and scores in bfloat16
on a GPU or TPU (float32 parameters and optimiser) and in float32 on the CPU;
--config.model.dtype=float32 forces float32 everywhere.
"""

from hyperiqa_jax.config_defaults import reference_config


def get_config():
    config = reference_config("base")
    config.model.attention = "scale"
    return config
