"""`python -m benchmarks.input_pipeline` on tiny settings: every variant, consistent numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import input_pipeline

REPO = Path(__file__).resolve().parents[2]


def _settings(tmp_path, variants):
    return dict(num_images=4, image_size=[96, 64], resize=[48, 40], crop=32, crops=2,
                batch_size=2, min_seconds=0.0, min_batches=3, warmup=1, workers=2,
                mix_images=2, variants=variants, data_dir=str(tmp_path))


def test_every_variant_reports_consistent_numbers(tmp_path):
    pytest.importorskip("torchvision")
    variants = ["threads", "processes", "float32", "array_record", "loop", "reference"]
    report = input_pipeline.run(_settings(tmp_path, variants))
    results = report["results"]
    assert list(results) == variants
    for name, r in results.items():
        assert r["batches"] >= 3 and r["crops"] == r["batches"] * 2, name
        assert r["crops_per_s"] == pytest.approx(r["crops"] / r["seconds"]), name
        assert r["images_per_s"] == pytest.approx(r["crops_per_s"] / 2), name
        assert r["crops_per_s_per_worker"] == pytest.approx(r["crops_per_s"] / 2), name
        assert r["vs_threads"] == pytest.approx(
            r["crops_per_s"] / results["threads"]["crops_per_s"]), name
        # MB/s: crops/s x 32 x 32 x 3 x (1 byte uint8, 4 bytes float32)
        width = 4 if name in ("float32", "reference") else 1
        assert r["mb_per_s_to_device"] == pytest.approx(
            r["crops_per_s"] * 32 * 32 * 3 * width / 1e6), name
    assert report["settings"]["variants"] == variants


def test_command_line_writes_json_and_explains_itself(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.input_pipeline", "--num_images=3",
         "--image_size=80,64", "--resize=48,40", "--crop=32", "--crops=2", "--batch_size=2",
         "--min_seconds=0", "--min_batches=2", "--warmup=0", "--workers=1",
         "--variants=threads", f"--data_dir={tmp_path}", f"--json={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["results"]["threads"]["batches"] >= 2
    assert "threads" in proc.stdout and "crops/s" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks.input_pipeline", "--variants=nope",
                          f"--data_dir={tmp_path}", "--num_images=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown --variants" in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "benchmarks.input_pipeline", "--help"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "--min_seconds" in usage.stdout and "array_record" in usage.stdout
