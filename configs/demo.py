r"""Demo: a small E6 model trained from random initialisation on the generated demo data.

    python -m hyperiqa_jax.demo                      # generate data, train, evaluate
    python -m hyperiqa_jax.train --config=configs/demo.py --workdir=runs/demo

The demo data set (hyperiqa_jax/data/demo.py) holds 256x256 crops of
photographs that ship with scikit-image and matplotlib under six distortions at
four levels; the label is the condition's mean SSIM x 100, and train and test
references never share a photograph. The recipe and why each choice was made:
`hyperiqa_jax.config_defaults.demo_config`.
"""

from hyperiqa_jax.config_defaults import demo_config


def get_config():
    return demo_config()
