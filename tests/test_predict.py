"""predict CLI: files, folders and globs; CSV path,score,error; exit status 1 on bad files."""

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hyperiqa_jax import predict, report
from tests import train_utils
from tests.test_report import PageParser

REPO = Path(__file__).resolve().parents[1]
train_utils.enable_compilation_cache()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run")
    train_utils.save_init_checkpoint(wd, train_utils.tiny_config())
    return wd


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Good images of several sizes and formats, and broken ones."""
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 200, 3), np.uint8)).save(d / "big.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(d / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (80, 80), np.uint8)).save(d / "grey.png")
    (d / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), np.uint8)).save(d / "sub" / "nested.webp")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (d / "empty.png").write_bytes(b"")
    good = (d / "big.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (d / "notes.txt").write_text("not an image; folders only pick image extensions")
    return d


def _run(args):
    return subprocess.run([sys.executable, "-m", "hyperiqa_jax.predict", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_expand_paths(folder):
    paths = predict.expand_paths([str(folder), str(folder / "*.png"), str(folder / "nope.jpg")])
    names = [Path(p).name for p in paths]
    assert names[:7] == ["big.jpg", "corrupt.jpg", "empty.png", "grey.png", "tiny.png",
                         "truncated.jpg", "nested.webp"]
    assert names[7:] == ["empty.png", "grey.png", "tiny.png", "nope.jpg"]


def test_folder_with_bad_files(workdir, folder, tmp_path):
    out = tmp_path / "scores.csv"
    html = tmp_path / "report.html"
    proc = _run(["--checkpoint", workdir, "--output", out, "--report", html, folder,
                 folder / "missing.jpg"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    # The report: the scored images best first with the CSV's scores, the failed with errors.
    page = PageParser()
    page.feed(html.read_text(encoding="utf-8"))
    good = sorted((r for r in rows.values() if r["score"]), key=lambda r: -float(r["score"]))
    assert [f["path"] for f in page.figures] == [r["path"] for r in good]
    assert [f["score"] for f in page.figures] == [float(r["score"]) for r in good]
    assert all(f["img"].startswith("data:image/jpeg;base64,") for f in page.figures)
    assert {f["path"]: f["error"] for f in page.failed} == {
        r["path"]: r["error"] for r in rows.values() if not r["score"]}
    assert set(rows) == {"big.jpg", "tiny.png", "grey.png", "nested.webp", "corrupt.jpg",
                         "empty.png", "truncated.jpg", "missing.jpg"}
    for name in ("big.jpg", "tiny.png", "grey.png", "nested.webp"):
        assert rows[name]["error"] == "" and np.isfinite(float(rows[name]["score"]))
    for name in ("corrupt.jpg", "empty.png", "truncated.jpg", "missing.jpg"):
        assert rows[name]["score"] == "" and rows[name]["error"], rows[name]
    assert "empty" in rows["empty.png"]["error"]
    assert "not found" in rows["missing.jpg"]["error"]
    assert "4 failed" in proc.stderr


def test_good_files_to_stdout_exit_0(workdir, folder):
    proc = _run(["--checkpoint", workdir, folder / "big.jpg", folder / "t*y.png"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [Path(r["path"]).name for r in rows] == ["big.jpg", "tiny.png"]
    assert all(r["error"] == "" for r in rows)


def test_help_states_score_direction():
    proc = _run(["--help"])
    assert "higher = better" in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------- large collections


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHON=sys.executable,
                JAX_COMPILATION_CACHE_DIR=train_utils.enable_compilation_cache(),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


def _predict(*args):
    return subprocess.run([sys.executable, "-m", "hyperiqa_jax.predict", *map(str, args)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """60 photos-like PNGs and one broken file: enough batches to stop a run in the middle."""
    d = tmp_path_factory.mktemp("collection")
    train_utils.write_images(d, 60, size=(300, 200))
    (d / "img_030_broken.png").write_bytes(b"not a png")
    return d


SMALL_BATCHES = ["--batch_size", "8", "--num_crops", "4"]  # 2 images per model call


def test_rerun_skips_scored_files_and_gives_the_same_csv(workdir, collection, tmp_path):
    out = tmp_path / "scores.csv"
    first = _predict("--checkpoint", workdir, "--output", out, *SMALL_BATCHES, collection)
    assert first.returncode == 1, first.stderr[-2000:]  # the broken file
    want = out.read_bytes()
    rows = list(csv.DictReader(io.StringIO(want.decode())))
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in collection.iterdir())
    assert "61 images (1 failed)" in first.stderr
    # As if killed: the part file loses its last rows and ends in a torn line.
    part = out.parent / "scores.csv.parts" / "part-00000-of-00001.csv"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:40]) + lines[40][:12])
    out.unlink()
    again = _predict("--checkpoint", workdir, "--output", out, *SMALL_BATCHES, collection)
    assert again.returncode == 1, again.stderr[-2000:]
    assert "resuming: 39 of 61 files already scored" in again.stderr  # 40 rows, 1 failed
    assert out.read_bytes() == want
    # Other settings are refused, not mixed in.
    other = _predict("--checkpoint", workdir, "--output", out, "--batch_size", "8", collection)
    assert other.returncode == 2
    assert "other settings (num_crops" in other.stderr and "delete the folder" in other.stderr


def _cluster(logs, *predict_args):
    return subprocess.Popen(
        ["launch/local_cluster.sh", "-n", "2", "-d", "1", "-t", "500", "-l", str(logs), "--",
         "python", "-m", "hyperiqa_jax.predict", *map(str, predict_args)],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_equal_one_and_survive_kill_9(workdir, collection, tmp_path):
    """Two loopback processes write the same CSV as one, byte for byte; killed with
    SIGKILL in the middle, the same command finishes the job with the same CSV."""
    one = tmp_path / "one.csv"
    single = _predict("--checkpoint", workdir, "--output", one, *SMALL_BATCHES, collection)
    assert single.returncode == 1, single.stderr[-2000:]

    two = tmp_path / "two.csv"
    proc = _cluster(tmp_path / "logs_two", "--checkpoint", workdir, "--output", two,
                    *SMALL_BATCHES, collection)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]  # process 0: one file failed
    assert "61 images (1 failed)" in out and "over 2 processes" in out
    assert two.read_bytes() == one.read_bytes()
    parts = sorted(p.name for p in (tmp_path / "two.csv.parts").iterdir())
    assert parts == ["part-00000-of-00002.csv", "part-00001-of-00002.csv", "run.json"]

    killed = tmp_path / "killed.csv"
    logs = tmp_path / "logs_killed"
    proc = _cluster(logs, "--checkpoint", workdir, "--output", killed, *SMALL_BATCHES,
                    collection)
    part = tmp_path / "killed.csv.parts" / "part-00001-of-00002.csv"
    deadline = time.time() + 500
    while not (part.exists() and part.stat().st_size > 0):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    for pid in (logs / "pids").read_text().split():
        os.kill(int(pid), signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not killed.exists()
    rows = sum(len(predict.read_complete_rows(p)) for p in part.parent.glob("part-*"))
    assert 0 < rows < 61

    proc = _cluster(logs, "--checkpoint", workdir, "--output", killed, *SMALL_BATCHES,
                    collection)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]
    scored_before = int(re.search(r"resuming: (\d+) of 61", out).group(1))
    print(f"killed after {rows} rows; the rerun found {scored_before} of 61 files scored")
    assert 0 < scored_before < 61
    assert killed.read_bytes() == one.read_bytes()


# ---------------------------------------------------------------------------- quality maps


@pytest.fixture(scope="module")
def noise_model(tmp_path_factory):
    """A tiny model trained (70 steps) on images whose label falls with their noise level."""
    from hyperiqa_jax import train

    tmp = tmp_path_factory.mktemp("noise_model")
    root = train_utils.write_manifest_dataset(str(tmp / "data"), n_train=32, n_test=8)
    c = train_utils.tiny_config(root=root, name="manifest")
    c.data.train_crops = 1
    c.train.update(max_steps=70, epochs=1000, lr=3e-3, lr_ratio=1.0, warmup_steps=5,
                   schedule="warmup_cosine", standardize_labels=True, eval_every_epochs=0,
                   final_eval=False, log_every_steps=50)
    train.train_and_evaluate(c, str(tmp / "run"))
    return tmp / "run"


def half_noised(seed, height=64, width=224, sigma=36.0):
    """A smooth random image whose right half carries Gaussian noise of `sigma`."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (6, 12, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    noisy = np.clip(img + rng.normal(0, sigma, img.shape), 0, 255)
    img[:, width // 2:] = noisy[:, width // 2:]
    return img.astype(np.uint8)


def test_quality_map_is_lower_on_the_noised_half(noise_model):
    """Crops wholly in the noised half score lower than crops wholly in the clean half."""
    from hyperiqa_jax import QualityModel

    model = QualityModel.from_checkpoint(noise_model)
    images = [half_noised(seed) for seed in range(6)]
    contrast = []
    for _, qmap, error in model.quality_maps(images, stride=28):
        assert error is None and qmap.scores.shape == (2, 7)  # tops 0, 8; lefts 0..168
        clean = qmap.scores[:, qmap.lefts + qmap.crop_size <= 112].mean()
        noised = qmap.scores[:, qmap.lefts >= 112].mean()
        contrast.append(clean - noised)
    print("clean - noised half, per image:", np.round(contrast, 1))
    assert min(contrast) > 0, contrast


def test_quality_maps_are_deterministic(noise_model):
    from hyperiqa_jax import QualityModel

    images = [half_noised(seed) for seed in range(3)]
    first = [m for _, m, _ in QualityModel.from_checkpoint(noise_model).quality_maps(images, 28)]
    again = [m for _, m, _ in QualityModel.from_checkpoint(noise_model).quality_maps(images, 28)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.tops, b.tops)
        np.testing.assert_array_equal(a.thumbnail, b.thumbnail)


def test_predict_map_writes_maps_and_the_report_shows_them(noise_model, tmp_path):
    from hyperiqa_jax import QualityModel

    (tmp_path / "in" / "sub").mkdir(parents=True)
    names = ["in/a.png", "in/sub/b.png"]
    for seed, name in enumerate(names):
        Image.fromarray(half_noised(seed)).save(tmp_path / name)
    (tmp_path / "in" / "c.png").write_bytes(b"broken")
    html = tmp_path / "report.html"
    proc = _predict("--checkpoint", noise_model, "--map", tmp_path / "maps", "--map_stride",
                    "28", "--report", html, tmp_path / "in")
    assert proc.returncode == 1, proc.stderr[-2000:]
    model = QualityModel.from_checkpoint(noise_model, batch_size=64)  # predict's batch
    maps = [m for _, m, _ in model.quality_maps([str(tmp_path / n) for n in names], 28)]
    for name, qmap in zip(names, maps):
        base = tmp_path / "maps" / name.removeprefix("in/")
        saved = json.loads(Path(f"{base}.map.json").read_text())
        assert saved["path"] == str(tmp_path / name)
        assert saved["scores"] == qmap.scores.tolist() and saved["lefts"] == qmap.lefts.tolist()
        with Image.open(f"{base}.map.png") as png:
            h, w = qmap.thumbnail.shape[:2]
            assert png.size == (w, h + report.LEGEND_HEIGHT)
    assert not (tmp_path / "maps" / "c.png.map.png").exists()
    page = PageParser()
    page.feed(html.read_text(encoding="utf-8"))
    assert len(page.figures) == 2
    assert all(f["map"].startswith("data:image/png;base64,") for f in page.figures)
