"""evaluate: per-data-set table, JSON, figures on a tiny generated data set."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from hyperiqa_jax import evaluate
from tests import train_utils

REPO = Path(__file__).resolve().parents[1]
train_utils.enable_compilation_cache()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run")
    train_utils.save_init_checkpoint(wd, train_utils.tiny_config(name="manifest"))
    rows = [{"step": s, "epoch": s / 10, "split": "train", "loss": 1.0 / s} for s in (1, 2, 3)]
    rows.append({"step": 3, "epoch": 0.3, "split": "test", "srcc": 0.5, "plcc": 0.4})
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = train_utils.write_manifest_dataset(str(tmp_path_factory.mktemp("data")))
    return wd, root


def test_evaluate_tables_and_figures(setup):
    wd, root = setup
    results = evaluate.run(str(wd), [f"manifest:test={root}", f"manifest={root}"],
                           protocol="grid")
    assert [(r["split"], r["num_images"]) for r in results] == [("test", 8), ("all", 24)]
    from hyperiqa_jax import QualityModel, data

    model = QualityModel.from_checkpoint(str(wd), protocol="grid")
    for r in results:
        assert set(evaluate.COLUMNS) <= set(r)
        assert r["failed_images"] == 0
        # The table's SRCC is scipy's on (this split's scores, its labels from the manifest).
        records = data.load_records("manifest", root, r["split"])
        mos = [rec.score for rec in records]
        pred = model.score([rec.path for rec in records])
        assert r["srcc"] == pytest.approx(stats.spearmanr(pred, mos)[0], abs=1e-12)
    out = wd / "eval"
    table = (out / "results.md").read_text()
    assert "| manifest | test | 8 |" in table
    assert json.loads((out / "results.json").read_text())[1]["num_images"] == 24
    for name in ("scatter_manifest_test.png", "attention_manifest_test.png",
                 "scatter_manifest_all.png", "training_curves.png"):
        assert (out / name).stat().st_size > 1000, name


@pytest.mark.parametrize("protocol", ["random", "center", "grid"])
def test_evaluate_reproduces_training_time_predictions(protocol, tmp_path):
    """`evaluate` on best/ gives, image by image, what training-time evaluation recorded."""
    from hyperiqa_jax import QualityModel, checkpointing, train

    root = train_utils.write_manifest_dataset(str(tmp_path / "data"), n_train=8, n_test=6)
    c = train_utils.tiny_config(root=root, name="manifest")
    c.data.eval_protocol = protocol
    c.train.update(max_steps=1, eval_batch_size=4)  # batches split images' crops
    train.train_and_evaluate(c, str(tmp_path / "run"))
    meta = checkpointing.read_meta(*checkpointing.find_checkpoint(tmp_path / "run" / "best"))
    recorded = np.array(meta["test_predictions"], np.float64)
    assert recorded.shape == (6,) and np.all(np.isfinite(recorded))

    model = QualityModel.from_checkpoint(str(tmp_path / "run"), protocol=None)  # the run's
    assert model.protocol == protocol and model.batch_size == 4
    result, pred, mos, _ = evaluate.evaluate_dataset(model, "manifest", "test", root)
    np.testing.assert_array_equal(pred, recorded)
    assert result["srcc"] == meta["metrics"]["srcc"]
    assert result["plcc"] == meta["metrics"]["plcc"]


def test_cli_and_bad_data_argument(setup, tmp_path):
    wd, root = setup
    proc = subprocess.run([sys.executable, "-m", "hyperiqa_jax.evaluate", "--checkpoint", str(wd),
                           "--data", f"manifest:test={root}", "--protocol", "center",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| manifest | test | 8 |" in proc.stdout
    assert json.loads((tmp_path / "results.json").read_text())[0]["crops_per_image"] == 1
    with pytest.raises(ValueError, match="NAME"):
        evaluate.parse_data_arg("manifest")


def test_training_curves_without_test_evaluations(tmp_path):
    # The demo evaluates only after training: a curve of the loss alone, and no
    # matplotlib warning about an empty legend.
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) + "\n"
                               for s in (1, 2, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate.plot_training_curves(metrics, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def _curve_axes(rows):
    fig = evaluate.training_curves_figure(rows)
    try:
        return [(ax.get_ylabel(), [tuple(line.get_xdata()) for line in ax.get_lines()])
                for ax in fig.axes]
    finally:
        evaluate._pyplot().close(fig)


def test_training_curves_draw_one_panel_per_kind_of_row():
    loss = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (1, 2, 3)]
    test = [{"step": 3, "split": "test", "srcc": 0.5, "plcc": 0.4}]
    assert _curve_axes(loss) == [("training loss", [(1, 2, 3)])]
    assert _curve_axes(test) == [("test correlation", [(3,), (3,)])]
    assert _curve_axes(loss + test) == [("training loss", [(1, 2, 3)]),
                                        ("test correlation", [(3,), (3,)])]
    # Rows without a loss or a correlation (e.g. a test row of an empty split) draw nothing.
    assert evaluate.training_curves_figure([{"step": 1, "split": "test", "srcc": None}]) is None
