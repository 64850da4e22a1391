"""predict CLI: files, folders and globs; CSV path,score,error; exit status 1 on bad files."""

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hyperiqa_jax import predict
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
