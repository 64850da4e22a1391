"""The GPU benchmark on the CPU: the nano model, one row, JSON and Markdown that agree.

Speed itself is measured by the benchmark command, never asserted here.
"""

import json

import numpy as np
import pytest

from benchmarks import gpu_check
from hyperiqa_jax import cli, train
from tests import train_utils

ROW = ["--models=nano", "--modes=eval", "--dtypes=float32", "--batches=1", "--repeats=2",
       "--steps_per_call=1"]


def markdown_rows(path):
    """The table rows of gpu_check.md as lists of cells."""
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in path.read_text().splitlines() if line.startswith("| nano")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One row timed against the PyTorch reference; (the JSON, the output folder, the number
    of traces of the training code's evaluation step)."""
    train_utils.enable_compilation_cache()
    out = tmp_path_factory.mktemp("gpu_check")
    traced = []
    original = train.eval_step
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "eval_step", lambda *a, **k: traced.append(1) or original(*a, **k))
        assert cli.call(gpu_check.main, [f"--out={out}", "--peak_flops=1e12", *ROW],
                        define_flags=gpu_check.define_flags) == 0
    return json.loads((out / "gpu_check.json").read_text()), out, len(traced)


def test_row_numbers_are_consistent(run):
    result, _, traced = run
    assert traced  # the timed step is the training code's evaluation step
    (row,) = result["rows"]
    assert (row["model"], row["mode"], row["dtype"], row["batch"]) == ("nano", "eval", "float32", 1)
    jax_entry, torch_entry = row["frameworks"]["jax"], row["frameworks"]["torch"]
    for entry in (jax_entry, torch_entry):
        assert len(entry["times_s"]) == 2
        assert entry["median_s"] == pytest.approx(np.median(entry["times_s"]))
        assert entry["images_per_s"] == pytest.approx(1 / entry["median_s"])
    ratios = [t / j for j, t in zip(jax_entry["times_s"], torch_entry["times_s"])]
    assert row["median_ratio"] == pytest.approx(np.median(ratios))
    # MFU against the given peak, from XLA's count of the compiled step (tens of MFLOPs for
    # the nano model's forward), which the unoptimised program's count comes close to.
    assert 1e7 < jax_entry["flops_per_step"] < 1e9
    assert jax_entry["flops_per_step"] == pytest.approx(jax_entry["flops_lowered"], rel=0.2)
    assert jax_entry["mfu"] == pytest.approx(jax_entry["flops_per_step"] /
                                             jax_entry["median_s"] / 1e12)
    assert jax_entry["temp_mb"] > 0 and jax_entry["argument_mb"] > 0
    assert result["command"].startswith("python -m benchmarks.gpu_check --out=")
    assert result["environment"]["device"] and result["baseline"] is None


def test_markdown_is_the_json(run):
    result, out, _ = run
    (row,) = result["rows"]
    j = row["frameworks"]["jax"]
    cells = markdown_rows(out / "gpu_check.md")
    step_mb = j["argument_mb"] + j["output_mb"] + j["temp_mb"]
    assert cells == [["nano", "eval", "float32", "1", f"{j['images_per_s']:.1f}",
                      f"{row['frameworks']['torch']['images_per_s']:.1f}",
                      f"{row['median_ratio']:.2f}", f"{j['mfu']:.1%}",
                      f"{j['flops_per_step'] / 1e9:.4g}", f"{step_mb:.0f}", "-", "-", "-", "-"]]


def test_baseline_from_an_earlier_json(run, tmp_path):
    earlier, out, _ = run
    assert cli.call(gpu_check.main, [f"--out={tmp_path}", f"--baseline={out / 'gpu_check.json'}",
                                     "--notorch", *ROW], define_flags=gpu_check.define_flags) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    (row,) = result["rows"]
    before = earlier["rows"][0]["frameworks"]["jax"]["images_per_s"]
    assert set(row["frameworks"]) == {"jax"}
    assert row["baseline_jax_images_per_s"] == before
    assert row["speedup"] == pytest.approx(row["frameworks"]["jax"]["images_per_s"] / before)
    assert result["baseline"]["commit"] == earlier["environment"]["commit"]
    cells = markdown_rows(tmp_path / "gpu_check.md")[0]
    assert cells[-2:] == [f"{before:.1f}", f"{row['speedup']:.2f}"]
    assert cells[5:7] == ["-", "-"]  # no torch


def test_compare_matches_rows_by_model_mode_dtype_and_batch():
    def row(batch, rate, **extra):
        return {"model": "base", "mode": "train", "dtype": "bfloat16", "batch": batch,
                "frameworks": {"jax": {"images_per_s": rate}}, **extra}

    rows = [row(32, 300.0), row(64, 500.0), row(128, 600.0)]
    baseline = {"rows": [row(64, 250.0), row(32, 100.0),
                         {**row(128, 0.0), "error": "RESOURCE_EXHAUSTED"}]}
    gpu_check.compare(rows, baseline)
    assert [r.get("speedup") for r in rows] == [3.0, 2.0, None]


def test_mistakes_are_one_line_errors(tmp_path, capsys):
    for argv, fragment in (
            ([], "--out is required"),
            ([f"--out={tmp_path}", "--models=huge"], "choose from nano, micro, tiny, small, base"),
            ([f"--out={tmp_path}", "--batches=8,x"], "give integers"),
            ([f"--out={tmp_path}", "--baseline=no-such-ref-or-file"], "neither a file nor")):
        assert cli.call(gpu_check.main, argv, define_flags=gpu_check.define_flags) == 2
        assert fragment in capsys.readouterr().err
