"""The parity CLI: passes on a correct conversion, fails (exit 1) on a wrong one."""

import json

from weights_conversion import validate_parity


def test_cli_passes_and_prints_json(capsys):
    code = validate_parity.main(["--model", "swin_tiny_patch4_window7_224", "--batch", "1",
                                 "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert all(d["max_abs"] < 1e-4 for d in out["results"].values())


def test_cli_fails_above_tolerance(capsys):
    # A tolerance no float32 computation meets: the command must report failure.
    code = validate_parity.main(["--model", "swin_tiny_patch4_window7_224", "--batch", "1",
                                 "--tolerance", "1e-12"])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out


def test_cli_rejects_bad_size(capsys):
    import pytest
    with pytest.raises(SystemExit):
        validate_parity.main(["--model", "swin_tiny_patch4_window7_224", "--img-size", "100"])


def test_train_step_outside_tolerance_fails(capsys):
    # `--config X --train-step` exits 1 when the step is outside these limits.
    good = {"loss": 1e-7, "loss_value": 30.0, "grad_rel": 2e-5, "relu_near_zero": 0,
            "outside_rel_1e-5_fraction": 0.0, "param_diff_in_lr": 0.3, "update_in_lr": 0.01}
    assert validate_parity.train_step_report(good)
    assert not validate_parity.train_step_report(dict(good, grad_rel=1e-3))
    # A ReLU input near 0 (ResNet-50) allows a few % of gradient difference.
    assert validate_parity.train_step_report(dict(good, grad_rel=1e-3, relu_near_zero=4))
    assert not validate_parity.train_step_report(dict(good, update_in_lr=0.9))
    assert "above limit" in capsys.readouterr().out
