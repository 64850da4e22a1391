"""QualityModel: loading, batching, determinism, errors, lazy import."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from hyperiqa_jax import checkpointing
from hyperiqa_jax.data import ImageDecodeError, normalize
from tests import train_utils

REPO = Path(__file__).resolve().parents[1]
train_utils.enable_compilation_cache()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run")
    train_utils.save_init_checkpoint(wd, train_utils.tiny_config(), label_stats=(50.0, 20.0))
    return wd


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths, _ = train_utils.write_images(folder, 5, size=(90, 70))
    return paths


def test_scores_paths_and_arrays_deterministically(workdir, images):
    from hyperiqa_jax import QualityModel

    model = QualityModel.from_checkpoint(workdir)
    assert model.source.endswith("checkpoints/0")
    scores = model.score(images)
    assert scores.shape == (5,) and np.all(np.isfinite(scores))
    np.testing.assert_array_equal(model.score(images), scores)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]  # PNG: lossless
    np.testing.assert_allclose(model.score(arrays), scores, rtol=1e-6)
    np.testing.assert_allclose(model.score(images[2]), scores[2:3], rtol=1e-6)
    # One [N, H, W, 3] array is N images, as a list of them is.
    same_size = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images[:3]])
    np.testing.assert_allclose(model.score(same_size), scores[:3], rtol=1e-6)


def test_batch_size_does_not_change_scores(workdir, images):
    from hyperiqa_jax import QualityModel

    small = QualityModel.from_checkpoint(workdir, batch_size=3).score(images)
    big = QualityModel.from_checkpoint(workdir, batch_size=64).score(images)
    np.testing.assert_allclose(small, big, rtol=1e-5, atol=1e-5)


def test_score_is_mean_over_crops_in_label_units(workdir, images):
    from hyperiqa_jax import QualityModel

    model = QualityModel.from_checkpoint(workdir)
    crops = model.crops(images[0])
    assert crops.shape == (model.num_crops, model.crop_size, model.crop_size, 3)
    assert crops.dtype == np.uint8
    raw = model.model.apply(jax.device_get(model.variables), normalize(crops))["score"]
    np.testing.assert_allclose(model.score(images[:1])[0], float(np.mean(raw)) * 20 + 50,
                               rtol=1e-5)


def test_bad_inputs_raise_or_give_nan(workdir, images, tmp_path):
    from hyperiqa_jax import QualityModel

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    model = QualityModel.from_checkpoint(workdir)
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        model.score([images[0], str(bad)])
    scores = model.score([images[0], str(bad), images[1]], errors="nan")
    assert np.isfinite(scores[0]) and np.isnan(scores[1]) and np.isfinite(scores[2])


def test_attention_and_best_checkpoint(workdir, images, tmp_path):
    from hyperiqa_jax import QualityModel

    model = QualityModel.from_checkpoint(workdir)
    scores, attention = model.score(images, return_attention=True)
    assert attention.shape == (5, 8 + 16 + 32 + 64)  # channel attention over the fused stages
    assert np.all((attention > 0) & (attention < 1))

    # An inference-only 'best' checkpoint with the same params scores the same.
    import grain  # noqa: F401  (the Checkpointer needs it for the latest manager)

    meta = checkpointing.read_meta(Path(workdir) / "checkpoints", 0)
    ckpt = checkpointing.Checkpointer(tmp_path)
    ckpt.save_best(0, jax.device_get(model.variables), dict(meta, state_kind="inference"))
    ckpt.wait()
    ckpt.close()
    best = QualityModel.from_checkpoint(tmp_path)
    assert "best" in best.source
    np.testing.assert_allclose(best.score(images), scores, rtol=1e-6)


def test_load_for_inference_resolves_and_restores(workdir, tmp_path):
    """One call from what the user points at to config, model and variables."""
    from hyperiqa_jax.errors import UserError

    for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "0"):
        ckpt = checkpointing.load_for_inference(path)
        assert ckpt.source == f"{workdir / 'checkpoints'}/0" and ckpt.step == 0
        assert ckpt.workdir == workdir and ckpt.label_stats == (50.0, 20.0)
        assert ckpt.config.data.crop_size == 56 and set(ckpt.variables) == {"params"}
    shapes = jax.tree.map(lambda x: x.shape, ckpt.variables)
    want = jax.eval_shape(lambda r: ckpt.model.init(r, np.zeros((1, 56, 56, 3), np.float32)),
                          jax.random.PRNGKey(0))
    assert shapes == jax.tree.map(lambda x: x.shape, dict(want))
    with pytest.raises(UserError, match="does not exist.*training workdir"):
        checkpointing.load_for_inference(tmp_path / "nowhere")


def test_inference_does_not_import_the_trainer(workdir, images):
    code = ("import sys; from hyperiqa_jax import QualityModel; "
            f"QualityModel.from_checkpoint({str(workdir)!r}).score({images[:1]!r}); "
            "loaded = [m for m in ('hyperiqa_jax.train', 'optax', 'tensorboardX', 'tqdm') "
            "if m in sys.modules]; print(loaded)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_import_is_light():
    code = ("import sys, hyperiqa_jax; assert 'jax' not in sys.modules, 'jax imported'; "
            "assert 'torch' not in sys.modules; print(hyperiqa_jax.QualityModel.__name__); "
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "QualityModel"


def test_dense_positions_cover_the_image_edge_to_edge():
    from hyperiqa_jax.scoring import dense_positions

    tops, lefts = dense_positions(64, 224, 56, 28)
    assert tops.tolist() == [0, 8]  # 0, then flush with the bottom edge
    assert lefts.tolist() == [0, 28, 56, 84, 112, 140, 168]  # 168 + 56 = 224: on the stride
    assert [t.tolist() for t in dense_positions(56, 100, 56, 30)] == [[0], [0, 30, 44]]
