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
from weights_conversion import hyperiqa_parity, parity_limits, validate_parity
from weights_conversion.torch_reference import CALIBRATED_SCORES, calibrate_scores

REPO = Path(__file__).resolve().parents[2]

CONFIGS = ("base", "small", "tiny", "ablation_single_scale", "ablation_multiscale",
           "resnet50_hyperiqa", "smart_iqa_scale")


def ci_config(name, kernels="auto"):
    config = train_utils.load_config(name)
    if config.model.backbone != "resnet50":
        config.model.backbone_overrides.depths = (1, 1, 1, 1)
    config.model.kernels = kernels  # models/cpu_kernels.py: both paths must match PyTorch.
    return config


def assert_forward_parity(results):
    assert {"score", "stage_maps[0]", "target_in_vec", "fused"} <= set(results), list(results)
    for key, diff in results.items():
        if not key.startswith("_"):
            limit = parity_limits.forward_limit(key, diff["ref_max_abs"])
            assert diff["max_abs"] <= limit, (key, diff, limit)
    # The two images are those the scores were calibrated on: one scores 35, the other 65,
    # far apart, so a wrong reshape could not hide. (Measured: within 1.5e-5 of 35 and 65.)
    low, high = CALIBRATED_SCORES
    assert sorted(results["_scores"]["torch"]) == pytest.approx([low, high], abs=1e-3)


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
    """--checkpoint mode: a foreign file loads into both models through the same renames.

    The file holds other weights (seed 3) than forward_parity's own (seed 0), calibrated on
    the images forward_parity compares (seed 0).
    """
    config = ci_config("smart_iqa_scale")
    config.model.backbone = "swin_tiny_patch4_window7_224"
    reference, _, _ = hyperiqa_parity.reference_model(config.model, seed=3)
    images = hyperiqa_parity.make_images(2, config.model.img_size, seed=0)
    calibrate_scores(reference, torch.from_numpy(images).permute(0, 3, 1, 2))
    results = hyperiqa_parity.forward_parity(config.model, batch=2, seed=0,
                                             checkpoint=smart_iqa_state_dict(reference))
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
    """3 training steps against PyTorch: at each, the loss and gradients at the same
    parameters and the optimiser's update on the same gradients (AdamW's later steps
    divide by the gradients' running magnitude and use the schedule's later rates)."""
    result = hyperiqa_parity.train_step_parity(ci_config(name, kernels), batch=2, steps=3)
    print(name, result)
    assert result["steps"] == 3
    limits = parity_limits.train_step_limits(result)
    assert set(limits) >= {"loss", "update_diff_in_lr"}
    # The Swin heads' seeds are chosen so that the first step compares gradients tightly.
    assert ("grad_rel" in limits) == (name != "resnet50_hyperiqa"), result["relu_near_zero"]
    for key, limit in limits.items():
        assert result[key] <= limit, (key, result[key], limit)
