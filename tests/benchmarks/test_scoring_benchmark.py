"""The scoring benchmark on a tiny checkpoint: its JSON is complete and self-consistent.

Speed itself is measured by the benchmark command, never asserted here.
"""

import contextlib
import io
import json

import numpy as np
import pytest

from benchmarks import scoring
from hyperiqa_jax import cli
from tests import train_utils
from weights_conversion import parity_limits

NUM_IMAGES = 6
BATCH = 8
SCORERS = ("predict_cli", "quality_model", "jax_per_image")
RUNS = SCORERS + ("decode_only", "model_only_one_image", "model_only_batched")
# Batched (8 crops of several images per call, padded) against one image's 2 crops per call,
# both float32, are judged by the parity tests' score limit (parity_limits.score_limit):
# 5.7e-6 measured on this setting, scores 64-78.
CSV_ROUNDING = 5e-5  # the predict command writes 4 decimals


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run: 6 generated 96x72 JPEGs, a step-0 checkpoint of the tiny test model (56-px
    crops, 2 per image), one pass per row."""
    tmp = tmp_path_factory.mktemp("scoring_bench")
    cache = train_utils.enable_compilation_cache()
    train_utils.save_init_checkpoint(tmp / "run", train_utils.tiny_config(),
                                     label_stats=(60.0, 15.0))
    out = tmp / "result.json"
    stdout = io.StringIO()
    # The predict command's process compiles the same programs: it shares the cache.
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
        status = cli.call(scoring.main, [
            f"--checkpoint={tmp / 'run'}", f"--num_images={NUM_IMAGES}", "--image_size=96x72",
            f"--batch_size={BATCH}", "--min_seconds=0", f"--json={out}"],
            define_flags=scoring.define_flags)
    assert status == 0
    return json.loads(out.read_text()), stdout.getvalue()


def test_json_structure(run):
    result, stdout = run
    assert result["command"].startswith("python -m benchmarks.scoring --checkpoint=")
    env = result["environment"]
    assert env["cpu_count"] > 0 and env["device"] and env["date"]
    assert {"jax", "jaxlib", "flax", "numpy"} <= set(env["versions"])
    s = result["settings"]
    assert (s["num_images"], s["crop_size"], s["num_crops"], s["protocol"], s["batch_size"]) == (
        NUM_IMAGES, 56, 2, "grid", BATCH)
    assert s["label_mean_std"] == [60.0, 15.0]
    assert set(result["runs"]) == set(RUNS)
    assert scoring.format_table(result) in stdout


def test_counts_and_rates_are_consistent(run):
    result, _ = run
    # The model alone runs on the crops of the first WORK_IMAGES images, or on BATCH rows of
    # them (8 rows of 2 crops: 4 images' worth per call).
    images_per_pass = dict.fromkeys(RUNS, NUM_IMAGES)
    images_per_pass["model_only_one_image"] = min(scoring.WORK_IMAGES, NUM_IMAGES)
    images_per_pass["model_only_batched"] = BATCH / 2
    for name in RUNS:
        r = result["runs"][name]
        assert r["passes"] == 1, name  # --min_seconds 0: one pass
        assert r["images"] == images_per_pass[name], name
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"], rel=1e-12), name
    cli_run = result["runs"]["predict_cli"]
    assert 0 < cli_run["time_to_first_score_s"] <= cli_run["seconds"]
    # 6 images' 12 crops take two batches of 8: two groups of rows, seconds apart or not.
    assert 1 <= cli_run["images_in_first_batch"] <= NUM_IMAGES
    assert "-m hyperiqa_jax.predict --checkpoint" in cli_run["command"]
    rate = {name: result["runs"][name]["images_per_s"] for name in RUNS}
    ratios = result["ratios"]
    for name in ("predict_cli", "quality_model"):
        assert ratios[f"{name}_vs_jax_per_image"] == pytest.approx(
            rate[name] / rate["jax_per_image"])
    assert ratios["ceiling_vs_jax_per_image"] == pytest.approx(
        max(rate["model_only_one_image"], rate["model_only_batched"]) / rate["jax_per_image"])
    assert ratios["model_batched_vs_one_image"] == pytest.approx(
        rate["model_only_batched"] / rate["model_only_one_image"])
    # The table's rows are the JSON's.
    lines = {line[:38].strip(): line[38:] for line in scoring.format_table(result).splitlines()}
    for name, label in scoring.LABELS.items():
        r = result["runs"][name]
        assert lines[label].split()[:3] == [f"{r['images']:.0f}", f"{r['seconds']:.2f}",
                                            f"{r['images_per_s']:.2f}"], name


def test_scores_agree(run):
    result, _ = run
    sc = result["scores"]
    per = {k: np.asarray(v) for k, v in sc["per_image"].items()}
    assert set(per) == set(SCORERS) and all(len(v) == NUM_IMAGES for v in per.values())
    assert len(sc["paths"]) == NUM_IMAGES
    for name in ("predict_cli", "quality_model"):  # the reported differences are these
        assert sc[f"max_abs_diff_{name}_vs_jax_per_image"] == pytest.approx(
            np.abs(per[name] - per["jax_per_image"]).max(), abs=1e-12)
    limit = parity_limits.score_limit(np.abs(per["jax_per_image"]).max())
    assert sc["max_abs_diff_quality_model_vs_jax_per_image"] <= limit
    assert sc["max_abs_diff_predict_cli_vs_jax_per_image"] <= CSV_ROUNDING + limit
    # The images get different scores, far apart compared with the tolerance: a scorer that
    # mixed up images or crops could not hide under it.
    assert per["jax_per_image"].max() - per["jax_per_image"].min() > 100 * limit


def test_scorer_row_times_any_scorer():
    """A scorer is any callable from paths to scores: warmed up on one image, then timed."""
    calls = []

    def scorer(paths):
        calls.append(list(paths))
        return [float(len(p)) for p in paths]

    row, scores = scoring.scorer_row(scorer, ["a", "bb", "ccc"], min_seconds=0)
    assert calls == [["a"], ["a", "bb", "ccc"]]
    assert scores.tolist() == [1.0, 2.0, 3.0]
    assert (row["images"], row["passes"]) == (3, 1) and row["warmup_s"] >= 0
    assert row["images_per_s"] == pytest.approx(3 / row["seconds"])


def test_mistakes_are_one_line_errors(tmp_path, capsys):
    for argv, fragment in (([], "--checkpoint is required"),
                           ([f"--checkpoint={tmp_path}", "--images=/nonexistent"], "not a folder"),
                           ([f"--checkpoint={tmp_path}", "--num_images=0"], "at least 1")):
        assert cli.call(scoring.main, argv, define_flags=scoring.define_flags) == 2
        assert fragment in capsys.readouterr().err
