r"""Baseline C0: the original HyperIQA (Su et al., CVPR 2020) with a ResNet-50 backbone.

LDA from layer1..layer4, hyper input = layer4 alone (2048 -> 1024 -> 512 -> 112),
no attention, no dropout / stochastic depth (the original has none). BatchNorm
uses batch statistics in training and running averages at evaluation. Trained
with the PyTorch original's recipe (hyperiqa_jax/config_defaults.py), so the
ablation rows are comparable.

    python -m hyperiqa_jax.train --config configs/resnet50_hyperiqa.py \
        --workdir runs/c0 --config.data.root=/data/koniq10k

Converting the public KonIQ checkpoint of the original code instead:

    python -m weights_conversion.convert_checkpoint --config configs/resnet50_hyperiqa.py \
        --checkpoint koniq_pretrained.pkl --out weights/hyperiqa_koniq

The PyTorch original's (and the paper's) result on KonIQ-10k test: SRCC 0.907, PLCC ~0.918.

Precision (hyperiqa_jax/config_defaults.py): model.dtype="auto" trains and scores in bfloat16
on a GPU or TPU (float32 parameters and optimiser) and in float32 on the CPU;
--config.model.dtype=float32 forces float32 everywhere.
"""

from hyperiqa_jax.config_defaults import reference_config


def get_config():
    config = reference_config("base")
    model = config.model
    model.backbone = "resnet50"
    model.drop_path_rate = 0.0
    model.dropout = 0.0
    model.multi_scale = False
    model.attention = "none"
    return config
