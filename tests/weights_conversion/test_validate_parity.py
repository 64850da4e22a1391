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
