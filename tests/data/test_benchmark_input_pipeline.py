"""Smoke test of `python -m benchmarks.input_pipeline` with tiny settings."""

import json

import pytest
from PIL import Image

from benchmarks import input_pipeline


def test_benchmark_smoke(tmp_path, capsys):
    pytest.importorskip("torchvision")
    out = tmp_path / "result.json"
    result = input_pipeline.main([
        "--num-images", "4", "--image-size", "96", "64", "--resize", "48", "40", "--crop", "32",
        "--crops", "2", "--batch-size", "2", "--batches", "3", "--warmup", "1", "--workers", "0",
        "--data-dir", str(tmp_path / "jpegs"), "--json", str(out)])
    text = capsys.readouterr().out
    # The JPEGs asked for.
    jpegs = sorted((tmp_path / "jpegs").iterdir())
    assert len(jpegs) == 4 and all(Image.open(p).size == (96, 64) for p in jpegs)
    assert text.startswith("4 JPEGs 96x64 ready in ")
    # Each loader timed 3 batches of 2 crops: rates are those counts over its own seconds.
    assert set(result) == {"machine", "settings", "ours", "reference", "ratio"}
    for loader in ("ours", "reference"):
        r = result[loader]
        assert set(r) == {"crops_per_s", "images_per_s", "seconds"} and r["seconds"] > 0
        assert r["crops_per_s"] == pytest.approx(3 * 2 / r["seconds"])
        assert r["images_per_s"] == pytest.approx(r["crops_per_s"] / 2)  # 2 crops per image
    assert result["ratio"] == pytest.approx(result["ours"]["crops_per_s"]
                                            / result["reference"]["crops_per_s"])
    s = result["settings"]
    assert (s["num_images"], list(s["image_size"]), list(s["resize"]), s["crop"], s["crops"],
            s["batch_size"], s["batches"], s["warmup"]) == (4, [96, 64], [48, 40], 32, 2, 2, 3, 1)
    # The printed table and the JSON file say the same.
    assert f"ours (grain, decode once)   {result['ours']['crops_per_s']:>10.1f}" in text
    assert f"reference (torch, per crop) {result['reference']['crops_per_s']:>10.1f}" in text
    assert f"ratio ours / reference (crops/s): {result['ratio']:.1f}x" in text
    saved = json.loads(out.read_text())
    assert saved["ratio"] == pytest.approx(result["ratio"])
    assert saved["ours"] == pytest.approx(result["ours"])
    assert saved["reference"] == pytest.approx(result["reference"])


def test_benchmark_help(capsys):
    with pytest.raises(SystemExit) as e:
        input_pipeline.main(["--help"])
    assert e.value.code == 0
    assert "--num-images" in capsys.readouterr().out
