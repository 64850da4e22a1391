"""The scoring benchmark on a tiny setting: its JSON is complete and self-consistent.

Speed itself is measured by the benchmark command, never asserted here.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import scoring
from tests import train_utils

REPO = Path(__file__).resolve().parents[2]
NUM_IMAGES = 6
SCORERS = ("predict_cli", "quality_model", "jax_per_image", "torch_per_image")
RUNS = SCORERS + scoring.WORK_RUNS
# JAX against the PyTorch reference, both float32 on the same crops: 1.1e-6 to 3.0e-6 measured
# on this setting over four runs (scores 64-69, whose float32 spacing is 7.6e-6); 1e-4 is the
# score tolerance of the project's parity tests (tests/weights_conversion/
# test_hyperiqa_parity.py), 30x the largest measured. Batched (64 crops, padded) against one
# image's crops per call: 1.2e-6 to 6.9e-6 measured, the same bound.
SCORE_TOLERANCE = 1e-4
CSV_ROUNDING = 5e-5  # the predict CLI writes 4 decimals


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One benchmark run: 6 images of 96x72, the nano model (step-0 checkpoint), one pass each."""
    tmp = tmp_path_factory.mktemp("scoring_bench")
    checkpoint = tmp / "run"
    train_utils.save_init_checkpoint(checkpoint, scoring.model_config("nano"),
                                     label_stats=(60.0, 15.0))
    cache = train_utils.enable_compilation_cache()
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = tmp / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scoring", "--checkpoint", str(checkpoint),
         "--num_images", str(NUM_IMAGES), "--image_size", "96x72", "--min_seconds", "0",
         "--torch_threads", "1", "--workdir", str(tmp / "work"), "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, tmp / "work"


def test_json_structure(run):
    result, stdout, _ = run
    assert result["command"].startswith("python -m benchmarks.scoring --checkpoint")
    assert result["machine"]["cpu_count"] == os.cpu_count()
    assert result["machine"]["platform"] and result["machine"]["jax_backend"]
    assert {"jax", "jaxlib", "flax", "torch", "timm"} <= set(result["versions"])
    assert result["images"]["count"] == NUM_IMAGES and result["images"]["generated"]
    assert result["images"]["sizes_of_first_20"] == [[96, 72]]
    assert result["checkpoint"]["made_here"] is False
    s = result["settings"]
    assert (s["num_images"], s["crop_size"], s["num_crops"], s["protocol"]) == (
        NUM_IMAGES, 56, 4, "grid")
    assert s["label_mean_std"] == [60.0, 15.0]
    assert set(result["runs"]) == set(RUNS)
    assert result["runs"]["torch_per_image"]["threads"] == 1
    for label in scoring.LABELS.values():  # the printed table names every method
        assert label in stdout


def test_counts_and_rates_are_consistent(run):
    result, _, _ = run
    # The model alone runs on the crops of the first WORK_IMAGES images, or on batch_size rows
    # of them (64 rows of 4 crops: 16 images' worth per call).
    images_per_pass = dict.fromkeys(SCORERS + ("decode_only",), NUM_IMAGES)
    images_per_pass["model_only_one_image"] = min(scoring.WORK_IMAGES, NUM_IMAGES)
    images_per_pass["model_only_batched"] = 64 / 4
    for name in RUNS:
        r = result["runs"][name]
        assert r["passes"] == 1  # --min_seconds 0: one pass over the folder
        assert r["images"] == images_per_pass[name] * r["passes"]
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"], rel=1e-12)
        if "pass_seconds" in r:
            assert r["seconds"] == pytest.approx(sum(r["pass_seconds"]), rel=1e-12)
    cli = result["runs"]["predict_cli"]
    assert 0 < cli["time_to_first_score_s"] <= cli["seconds"]
    assert 1 <= cli["images_in_first_batch"] <= NUM_IMAGES
    # 24 crops fit one batch of 64: every row leaves at once, so no rate after the first batch.
    assert cli["images_in_first_batch"] == NUM_IMAGES
    assert cli["after_first_batch_images_per_s"] is None
    assert "-m hyperiqa_jax.predict --checkpoint" in cli["command"]
    rate = {name: result["runs"][name]["images_per_s"] for name in RUNS}
    ratios = result["ratios"]
    assert ratios["predict_cli_vs_jax_per_image"] == pytest.approx(
        rate["predict_cli"] / rate["jax_per_image"])
    assert ratios["predict_cli_vs_torch_per_image"] == pytest.approx(
        rate["predict_cli"] / rate["torch_per_image"])
    assert ratios["quality_model_vs_jax_per_image"] == pytest.approx(
        rate["quality_model"] / rate["jax_per_image"])
    assert ratios["jax_per_image_vs_torch_per_image"] == pytest.approx(
        rate["jax_per_image"] / rate["torch_per_image"])
    assert ratios["ceiling_vs_jax_per_image"] == pytest.approx(
        max(rate["model_only_one_image"], rate["model_only_batched"]) / rate["jax_per_image"])
    assert ratios["model_batched_vs_one_image"] == pytest.approx(
        rate["model_only_batched"] / rate["model_only_one_image"])
    assert result["goal"]["met"] == (ratios["predict_cli_vs_jax_per_image"] >= 3.0)


def test_scores_agree(run):
    result, _, work = run
    sc = result["scores"]
    per = {k: np.asarray(v) for k, v in sc["per_image"].items()}
    assert set(per) == set(SCORERS) and all(len(v) == NUM_IMAGES for v in per.values())
    assert len(sc["paths"]) == NUM_IMAGES
    # The reported differences are those of the per-image scores.
    assert sc["max_abs_diff_jax_vs_torch"] == pytest.approx(
        np.abs(per["jax_per_image"] - per["torch_per_image"]).max(), abs=1e-12)
    assert sc["max_abs_diff_quality_model_vs_jax_per_image"] == pytest.approx(
        np.abs(per["quality_model"] - per["jax_per_image"]).max(), abs=1e-12)
    assert sc["max_abs_diff_jax_vs_torch"] <= SCORE_TOLERANCE
    assert sc["max_abs_diff_quality_model_vs_jax_per_image"] <= SCORE_TOLERANCE
    assert sc["max_abs_diff_predict_cli_vs_quality_model"] <= CSV_ROUNDING + SCORE_TOLERANCE / 10
    # The images get different scores, far apart compared with the tolerance: a weight put in
    # the wrong place on the way to torch could not hide under it.
    assert per["jax_per_image"].max() - per["jax_per_image"].min() > 1000 * SCORE_TOLERANCE
    # The CLI's scores are those of its CSV, in the folder's order.
    with open(work / "predict.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == sc["paths"]
    assert [float(r["score"]) for r in rows] == per["predict_cli"].tolist()


def test_model_configs():
    from hyperiqa_jax import train

    for name in scoring.MODELS:
        config = scoring.model_config(name)
        train.check_config(config)
        assert config.data.eval_protocol == "grid"
        assert config.data.crop_size == (56 if name == "nano" else 224)
    assert scoring.model_config("tiny").data.test_crops == 20


def test_generated_images_are_deterministic(tmp_path):
    a = scoring.make_image(64, 48, seed=3)
    assert a.shape == (48, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, scoring.make_image(64, 48, seed=3))
    assert not np.array_equal(a, scoring.make_image(64, 48, seed=4))
    assert a.std() > 10  # not flat
    paths = scoring.write_images(tmp_path, 2, 64, 48, quality=90)
    assert [Path(p).name for p in paths] == ["img_00000.jpg", "img_00001.jpg"]
