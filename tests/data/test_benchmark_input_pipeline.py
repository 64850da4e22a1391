"""Smoke test of `python -m benchmarks.input_pipeline` with tiny settings."""

import json

import pytest

from benchmarks import input_pipeline


def test_benchmark_smoke(tmp_path, capsys):
    pytest.importorskip("torchvision")
    out = tmp_path / "result.json"
    result = input_pipeline.main([
        "--num-images", "4", "--image-size", "96", "64", "--resize", "48", "40", "--crop", "32",
        "--crops", "2", "--batch-size", "2", "--batches", "3", "--warmup", "1", "--workers", "0",
        "--data-dir", str(tmp_path / "jpegs"), "--json", str(out)])
    text = capsys.readouterr().out
    assert "crops/s" in text and "ratio ours / reference" in text
    assert result["ours"]["crops_per_s"] > 0 and result["reference"]["crops_per_s"] > 0
    assert json.loads(out.read_text())["ratio"] == pytest.approx(result["ratio"])


def test_benchmark_help(capsys):
    with pytest.raises(SystemExit) as e:
        input_pipeline.main(["--help"])
    assert e.value.code == 0
    assert "--num-images" in capsys.readouterr().out
