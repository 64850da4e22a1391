r"""The demo's ablation: the demo model as A2, A1 and E6, three seeds each, on the demo data.

    python -m hyperiqa_jax.study --study=configs/studies/demo.py --root=runs/study-demo plan
    python -m hyperiqa_jax.study --study=configs/studies/demo.py --root=runs/study-demo run
    python -m hyperiqa_jax.study --study=configs/studies/demo.py --root=runs/study-demo report

Nine runs of configs/demo.py (hyperiqa_jax.config_defaults.demo_config): its
small Swin from random initialisation with the last stage alone (A2), with the
four stages fused (A1), and with the fusion gated by channel attention (E6, the
demo as `make demo` trains it), for seeds 0, 1 and 2. Each is evaluated on the
demo's unseen test photographs; the report gives the ablation (mean +- std over
seeds), the models' size and speed, and E6's per-stage attention by distortion
type (the demo data labels each image's distortion). Shorter runs:
`run --override=train.epochs=8` (recorded in the report). The demo data is
generated on first use; no --data is needed.
"""


def get_study():
    demo = "configs/demo.py"
    return {
        "name": "demo",
        "description": "the demo model's A2 / A1 / E6 on the demo data, seeds 0-2",
        "rows": [
            {"name": "A2", "config": demo, "about": "last stage alone, no attention",
             "overrides": ["model.multi_scale=False", "model.attention=none"]},
            {"name": "A1", "config": demo, "about": "four stages fused, no attention",
             "overrides": ["model.attention=none"]},
            {"name": "E6", "config": demo, "about": "four stages fused, channel attention"},
        ],
        "seeds": [0, 1, 2],
        "ablation": ["A2", "A1", "E6"],
        "sizes": ["A2", "A1", "E6"],
    }
