r"""The PyTorch original's study: ablation C0 -> A2 -> A1 -> E6, sizes, and zero-shot data sets.

    python -m hyperiqa_jax.study --study=configs/studies/reference.py --root=runs/reference \
        --data koniq10k=/data/koniq10k --data spaq=/data/spaq --data kadid10k=/data/kadid10k \
        --data agiqa3k=/data/agiqa3k --data livec=/data/livec plan   # then run, or the cluster

    # HyperIQA's protocol: 10 random 80/20 splits of KonIQ-10k per row (60 runs), medians
    python -m hyperiqa_jax.study --study=configs/studies/reference.py:splits \
        --root=runs/reference-splits --data koniq10k=/data/koniq10k ... plan

Rows (each the config file's recipe, hyperiqa_jax/config_defaults.py):

    C0        the original HyperIQA, ResNet-50 (configs/resnet50_hyperiqa.py)
    A2        Swin-B, the last stage alone, no attention (configs/ablation_single_scale.py)
    A1        Swin-B, four stages fused, no attention (configs/ablation_multiscale.py)
    E6-Base   Swin-B, four stages fused, channel attention (configs/base.py)
    E6-Small  the same with Swin-S (configs/small.py)
    E6-Tiny   the same with Swin-T (configs/tiny.py)

The Swin rows start from converted ImageNet weights in weights/ (convert them
first, e.g. `python -m weights_conversion.convert_timm --model
swin_base_patch4_window7_224 --pretrained --out weights/swin_base_patch4_window7_224`;
likewise swin_small_... and swin_tiny_...). By default each row trains once
(seed 0) on KonIQ-10k's official split; with `:splits` ten times on random
80/20 splits, reported as the median. E6-Base is scored zero-shot on SPAQ,
KADID-10k, AGIQA-3K and LIVE Challenge where their roots are given. The
original reports SRCC 0.907 / 0.9338 / 0.9353 / 0.9378 for C0 / A2 / A1 / E6-Base
(gains 87% / 5% / 8% of the total) and 0.9249 / 0.9338 for Tiny / Small.
"""


def get_study(protocol="official"):
    if protocol not in ("official", "splits"):
        raise ValueError(f"reference study: {protocol!r} is not 'official' or 'splits'")

    def weights(size):
        return [f"pretrained_backbone=weights/swin_{size}_patch4_window7_224"]

    return {
        "name": "reference" if protocol == "official" else "reference-splits",
        "description": "the PyTorch original's ablation, sizes and zero-shot data sets",
        "rows": [
            {"name": "C0", "config": "configs/resnet50_hyperiqa.py",
             "about": "original HyperIQA (ResNet-50)"},
            {"name": "A2", "config": "configs/ablation_single_scale.py",
             "about": "Swin-B, last stage alone", "overrides": weights("base")},
            {"name": "A1", "config": "configs/ablation_multiscale.py",
             "about": "Swin-B, four stages fused", "overrides": weights("base")},
            {"name": "E6-Tiny", "config": "configs/tiny.py",
             "about": "Swin-T, fused, channel attention", "overrides": weights("tiny")},
            {"name": "E6-Small", "config": "configs/small.py",
             "about": "Swin-S, fused, channel attention", "overrides": weights("small")},
            {"name": "E6-Base", "config": "configs/base.py",
             "about": "Swin-B, fused, channel attention", "overrides": weights("base")},
        ],
        **({"splits": 10} if protocol == "splits" else {"seeds": [0]}),
        "ablation": ["C0", "A2", "A1", "E6-Base"],
        "sizes": ["E6-Tiny", "E6-Small", "E6-Base"],
        "zero_shot": {"spaq": "spaq", "kadid10k": "kadid10k", "agiqa3k": "agiqa3k",
                      "livec": "livec"},
        "cross_data": ["E6-Base"],
    }
