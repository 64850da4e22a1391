"""The parity CLI: passes on a correct conversion, fails (exit 1) on a wrong one."""

import contextlib
import copy
import io
import json

import pytest

from hyperiqa_jax import cli
from weights_conversion import hyperiqa_parity, parity_limits, validate_parity


def parity(argv):
    """`python -m weights_conversion.validate_parity ARGV`, in this process: its exit status."""
    return cli.call(validate_parity.main, argv, define_flags=validate_parity.define_flags,
                    expected=validate_parity.EXPECTED)


def test_cli_passes_and_prints_json(capsys):
    code = parity(["--model", "swin_tiny_patch4_window7_224", "--batch", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(out["results"]) == {"stage0", "stage1", "stage2", "stage3"}
    for diff in out["results"].values():
        assert diff["max_abs"] <= parity_limits.swin_stage_limit(diff["ref_max_abs"]), diff


def test_cli_fails_above_tolerance(capsys):
    # A tolerance no float32 computation meets: the command must report failure.
    code = parity(["--model", "swin_tiny_patch4_window7_224", "--batch", "1",
                   "--tolerance", "1e-12"])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out


def test_limits_scale_with_the_magnitude(capsys):
    """Float32 rounding grows with the values: a score of 92 may differ 92 times as much as
    a score of 1, and a Swin stage likewise."""
    def score(max_abs, ref_max_abs):
        return {"score": {"max_abs": max_abs, "max_rel": max_abs / ref_max_abs,
                          "ref_max_abs": ref_max_abs}}

    limit = parity_limits.score_limit(92.1)
    assert limit == pytest.approx(92.1 * parity_limits.score_limit(0.5))
    assert validate_parity.full_model_report(score(1.07e-4, 92.1))  # 14 float32 ulps at 92
    assert validate_parity.full_model_report(score(0.99 * limit, 92.1))
    assert not validate_parity.full_model_report(score(1.01 * limit, 92.1))
    assert not validate_parity.full_model_report(score(1.01 * limit / 92.1, 0.5))
    assert "above tolerance" in capsys.readouterr().out
    # Swin mode: --tolerance is relative to each stage's magnitude.
    relative = parity_limits.SWIN_STAGE_RELATIVE
    stage = {"max_abs": 0.99 * relative * 44.1, "max_rel": 0.0, "ref_max_abs": 44.1}
    assert validate_parity.report({"stage2": stage}, relative)
    assert not validate_parity.report({"stage2": stage}, relative / 2)
    assert "above tolerance" in capsys.readouterr().out


@pytest.mark.parametrize("argv,fragment", [
    (["--model", "swin_tiny_patch4_window7_224", "--img_size", "100"], "multiple of 32"),
    (["--model", "swin_tiny_patch4_window7_224", "--img-size", "224"], "img-size"),
    (["--model", "swin_tiny_patch4_window7_224", "--train_step"], "--train_step cannot be used"),
    (["--config", "configs/tiny.py", "--model", "swin_tiny_patch4_window7_224"],
     "--model cannot be used in --config mode"),
    (["--config", "configs/tiny.py", "--img_size", "256"], "--img_size cannot be used"),
    ([], "give --model NAME (Swin backbone) or --config FILE"),
    (["--model", "swin_tiny"], "--model"),
])
def test_cli_usage_errors(argv, fragment, capsys):
    assert parity(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and fragment in line, line


def test_train_step_outside_tolerance_fails(capsys):
    # `--config X --train_step` exits 1 when a figure is outside its limit.
    figures = {"loss_value": 30.0, "grad_rel": 0.0, "grad_rel_kinked": 0.0,
               "update_diff_in_lr": 0.0, "batch_stats_rel": 0.0}
    limits = parity_limits.train_step_limits(figures)
    assert set(limits) == set(figures) - {"loss_value"} | {"loss"}
    good = {**figures, **{key: limit / 2 for key, limit in limits.items()}}
    assert validate_parity.train_step_report(good)
    for key, limit in limits.items():
        assert not validate_parity.train_step_report(dict(good, **{key: 2 * limit})), key
    assert "above limit" in capsys.readouterr().out
    # A step with a ReLU input near 0 (always so for ResNet-50) allows more.
    assert limits["grad_rel_kinked"] > 2 * limits["grad_rel"]


CI_TINY = """
from tests.weights_conversion.test_hyperiqa_parity import ci_config


def get_config():
    return ci_config("tiny")  # configs/tiny.py's head on one Swin block per stage
"""


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "ci_tiny.py"
    path.write_text(CI_TINY)
    return str(path)


@pytest.fixture(scope="module")
def recorded_run(tiny_config_file):
    """A real `--config --train_step --json` run: its exit status, its JSON output and what
    the two comparisons returned."""
    returned = {}
    forward, train_step = hyperiqa_parity.forward_parity, hyperiqa_parity.train_step_parity

    def record(name, compare):
        def wrapper(*args, **kwargs):
            returned[name] = compare(*args, **kwargs)
            return copy.deepcopy(returned[name])
        return wrapper

    out = io.StringIO()  # a module-scoped fixture cannot use capsys
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(hyperiqa_parity, "forward_parity", record("forward", forward))
        mp.setattr(hyperiqa_parity, "train_step_parity", record("train_step", train_step))
        code = parity(["--config", tiny_config_file, "--train_step", "--json"])
    return code, json.loads(out.getvalue()), returned


def test_train_step_run_passes(recorded_run):
    code, output, returned = recorded_run
    assert set(returned) == {"forward", "train_step"}
    assert output["forward_ok"] and output["train_step_ok"], output
    assert output["train_step"]["loss_value"] == pytest.approx(
        returned["train_step"]["loss_value"])
    assert code == 0


def replay(monkeypatch, returned, **train_step_changes):
    """The comparisons return what the real run returned, with `train_step_changes`."""
    monkeypatch.setattr(hyperiqa_parity, "forward_parity",
                        lambda *a, **k: copy.deepcopy(returned["forward"]))
    monkeypatch.setattr(hyperiqa_parity, "train_step_parity",
                        lambda *a, **k: {**returned["train_step"], **train_step_changes})


def test_train_step_outside_its_limits_exits_1(recorded_run, tiny_config_file, monkeypatch,
                                               capsys):
    _, _, returned = recorded_run
    replay(monkeypatch, returned)
    assert parity(["--config", tiny_config_file, "--train_step"]) == 0  # the replay passes
    compared = list(parity_limits.train_step_limits(returned["train_step"]))
    assert {"loss", "grad_rel", "update_diff_in_lr"} <= set(compared), compared
    for key in compared:
        # The same forward pass, one train-step figure far above any limit: the run fails.
        capsys.readouterr()
        replay(monkeypatch, returned, **{key: 1e3})
        assert parity(["--config", tiny_config_file, "--train_step"]) == 1, key
        out = capsys.readouterr().out
        assert "train step FAIL" in out and "above limit" in out, out
        assert [line.split()[0] for line in out.splitlines() if "above limit" in line] == [key]
    # Without --train_step the step is not compared: the forward pass alone decides.
    assert parity(["--config", tiny_config_file]) == 0


def test_forward_outside_its_limit_exits_1_with_a_good_train_step(
        recorded_run, tiny_config_file, monkeypatch, capsys):
    _, _, returned = recorded_run
    returned = copy.deepcopy(returned)
    score = returned["forward"]["score"]
    score["max_abs"] = 2 * parity_limits.score_limit(score["ref_max_abs"])
    replay(monkeypatch, returned)
    assert parity(["--config", tiny_config_file, "--train_step", "--json"]) == 1
    output = json.loads(capsys.readouterr().out)
    assert not output["forward_ok"] and output["train_step_ok"]
