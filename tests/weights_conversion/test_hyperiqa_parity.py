"""Forward and training-step parity of every config against the PyTorch reference.

CI shrinks the Swin configs to one block per stage (the heads, channel counts,
attention and fusion stay those of the config; the backbone itself is checked
in test_swin.py) and runs Swin-T at full depth once. Weights are perturbed and
the target net calibrated so that scores spread over 35..65 and differ between
the images (see torch_reference.calibrate_scores).
"""

from pathlib import Path

import pytest
import torch

from hyperiqa_jax import cli
from tests import train_utils
from tests.weights_conversion.test_hyperiqa_conversion import smart_iqa_state_dict
from weights_conversion import hyperiqa_parity, validate_parity
from weights_conversion.torch_reference import calibrate_scores

REPO = Path(__file__).resolve().parents[2]

CONFIGS = ("base", "small", "tiny", "ablation_single_scale", "ablation_multiscale",
           "resnet50_hyperiqa", "smart_iqa_scale")
SCORE_TOLERANCE = 1e-4
ATTENTION_TOLERANCE = 1e-5
RELATIVE_TOLERANCE = 1e-5


def ci_config(name, kernels="auto"):
    config = train_utils.load_config(name)
    if config.model.backbone != "resnet50":
        config.model.backbone_overrides.depths = (1, 1, 1, 1)
    config.model.kernels = kernels  # models/cpu_kernels.py: both paths must match PyTorch.
    return config


def assert_forward_parity(results):
    assert results["score"]["max_abs"] <= SCORE_TOLERANCE, results["score"]
    if "attention" in results:
        assert results["attention"]["max_abs"] <= ATTENTION_TOLERANCE, results["attention"]
    for key, diff in results.items():
        if key.startswith("_") or key in ("score", "attention"):
            continue
        assert diff["max_abs"] <= RELATIVE_TOLERANCE * max(diff["ref_max_abs"], 1.0), (key, diff)
    # The scores differ between images: a wrong reshape could not hide.
    torch_scores = results["_scores"]["torch"]
    assert max(torch_scores) - min(torch_scores) > 20


def with_both_kernel_paths(names):
    """(name, kernels) pairs: each Swin config on both paths; ResNet-50 has one path."""
    return [(name, kernels) for name in names for kernels in ("cpu", "generic")
            if name != "resnet50_hyperiqa" or kernels == "cpu"]


@pytest.mark.parametrize("name,kernels", with_both_kernel_paths(CONFIGS))
def test_forward_parity(name, kernels):
    config = ci_config(name, kernels)
    results = hyperiqa_parity.forward_parity(config.model, batch=2)
    assert_forward_parity(results)
    assert ("attention" in results) == (config.model.attention != "none")


def test_forward_parity_from_a_smart_iqa_checkpoint():
    """--checkpoint mode: a foreign file loads into both models through the same renames."""
    config = ci_config("smart_iqa_scale")
    config.model.backbone = "swin_tiny_patch4_window7_224"
    reference, images, _ = hyperiqa_parity.reference_model(config.model, seed=3)
    calibrate_scores(reference, torch.from_numpy(images).permute(0, 3, 1, 2))
    results = hyperiqa_parity.forward_parity(config.model, checkpoint=smart_iqa_state_dict(
        reference))
    assert_forward_parity(results)


@pytest.mark.slow
def test_forward_parity_swin_tiny_full_depth_cli(tmp_path, capsys):
    """configs/tiny.py as it is, through validate_parity's --config mode."""
    config = str(REPO / "configs" / "tiny.py")
    assert cli.call(validate_parity.main, ["--config", config, "--batch", "2"],
                    define_flags=validate_parity.define_flags) == 0
    assert "PASS" in capsys.readouterr().out


# One config per distinct head: E6 channel attention (Swin-T channels), released scale
# attention and A2 single-scale (Swin-B channels), C0 ResNet-50. The other configs differ
# from these only in the backbone's size: `python -m weights_conversion.validate_parity
# --config configs/X.py --train_step` checks any of them.
TRAIN_STEP_CONFIGS = ("tiny", "smart_iqa_scale", "ablation_single_scale", "resnet50_hyperiqa")


@pytest.mark.parametrize("name,kernels", with_both_kernel_paths(TRAIN_STEP_CONFIGS))
def test_train_step_parity(name, kernels):
    """3 steps of `train.train_step` against PyTorch (AdamW's later steps divide by the
    gradients' running magnitude, so magnitude errors show in the parameters)."""
    result = hyperiqa_parity.train_step_parity(ci_config(name, kernels), batch=2, steps=3)
    print(name, result)
    assert result["steps"] == 3
    limits = hyperiqa_parity.train_step_limits(result)
    assert set(limits) >= {"loss", "grad_rel", "outside_rel_1e-5_fraction", "param_diff_in_lr"}
    for key, limit in limits.items():
        assert result[key] <= limit, (key, result[key], limit)
