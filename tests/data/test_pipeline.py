"""grain training/evaluation pipelines: shapes, determinism, checkpointing, bad images."""

import collections

import grain
import numpy as np
import pytest

from hyperiqa_jax.data import pipeline
from hyperiqa_jax.data.image import eval_crops, num_eval_crops
from hyperiqa_jax.data.pipeline import (
    TooManyBadImagesError,
    make_eval_batches,
    make_train_dataset,
    steps_per_epoch,
)
from hyperiqa_jax.data.records import load_records
from tests.data.conftest import data_config, write_manifest


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_train_batches_shapes(manifest_dir):
    recs = load_records("manifest", manifest_dir, "all")
    it = iter(make_train_dataset(recs, data_config(), batch_size=6, seed=0))
    batches = _take(it, 12)  # 8 images x 4 crops = 32 crops per epoch: crosses epochs
    for b in batches:
        assert b["image"].shape == (6, 32, 32, 3) and b["image"].dtype == np.uint8
        assert b["score"].shape == (6,) and b["score"].dtype == np.float32
    assert set(np.concatenate([b["score"] for b in batches])) <= {i * 10.0 for i in range(8)}
    assert steps_per_epoch(len(recs), data_config(), 6) == 5


def test_deterministic_for_a_seed(manifest_dir):
    recs = load_records("manifest", manifest_dir, "all")
    a = _take(iter(make_train_dataset(recs, data_config(), batch_size=4, seed=1)), 5)
    b = _take(iter(make_train_dataset(recs, data_config(num_workers=1), batch_size=4, seed=1)), 5)
    c = _take(iter(make_train_dataset(recs, data_config(), batch_size=4, seed=2)), 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["score"], y["score"])
    assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))


def test_checkpoint_state_restores_stream(manifest_dir):
    recs = load_records("manifest", manifest_dir, "all")
    ds = make_train_dataset(recs, data_config(), batch_size=5, seed=0)
    it = iter(ds)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 4)
    it2 = iter(make_train_dataset(recs, data_config(), batch_size=5, seed=0))
    it2.set_state(state)
    for x, y in zip(expected, _take(it2, 4)):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_orbax_checkpoint_of_iterator(manifest_dir, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    recs = load_records("manifest", manifest_dir, "all")
    it = iter(make_train_dataset(recs, data_config(), batch_size=5, seed=0))
    _take(it, 2)
    with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data_iter",)) as mgr:
        mgr.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
        expected = next(it)
        it2 = iter(make_train_dataset(recs, data_config(), batch_size=5, seed=0))
        mgr.restore(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it2)))
    np.testing.assert_array_equal(expected["image"], next(it2)["image"])


def test_each_image_decoded_once_per_epoch_and_crops_mixed(manifest_dir, monkeypatch):
    calls = collections.Counter()
    real = pipeline.load_resized

    def counting(source, *a, **k):
        if str(source).startswith(str(manifest_dir)):  # not other tests' lingering threads
            calls[str(source)] += 1
        return real(source, *a, **k)

    monkeypatch.setattr(pipeline, "load_resized", counting)
    recs = load_records("manifest", manifest_dir, "all")
    cfg = data_config(train_crops=4, mix_images=8, num_workers=1, prefetch=1)
    # The group step itself: one decode per image, N crops each.
    group = pipeline._TrainGroup(cfg, pipeline.BadImageTracker(8, 0.0))
    out = group([pipeline.RecordSource(recs)[i] for i in range(8)], np.random.default_rng(0))
    assert out["image"].shape == (32, 32, 32, 3)
    assert set(calls.values()) == {1} and len(calls) == 8
    calls.clear()
    it = iter(make_train_dataset(recs, cfg, batch_size=8, seed=0))
    first_epoch = _take(it, 4)  # 8 images x 4 crops = 32 crops = 4 batches
    _take(it, 4)  # second epoch
    # Two epochs: each image decoded twice, plus at most one read-ahead group
    # (decoding per crop, as the PyTorch code does, would be 8 times).
    assert len(calls) == 8 and 2 <= min(calls.values()) and max(calls.values()) <= 3
    for b in first_epoch:  # a batch is not 8 crops of one photo
        assert len(set(b["score"].tolist())) > 2
    epoch = np.sort(np.concatenate([b["score"] for b in first_epoch]))
    np.testing.assert_array_equal(epoch, np.repeat(np.arange(8) * 10.0, 4))


def test_process_sharding_is_disjoint(tmp_path):
    root = write_manifest(tmp_path / "m", n=8)
    recs = load_records("manifest", root, "all")
    seen = []
    for pi in range(2):
        ds = make_train_dataset(recs, data_config(mix_images=2), batch_size=4, seed=0,
                                process_index=pi, process_count=2)
        batches = _take(iter(ds), 4)
        assert batches[0]["image"].shape[0] == 4
        seen.append(set(np.concatenate([b["score"] for b in batches]).tolist()))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 8
    with pytest.raises(ValueError, match="process_index 2 not in"):
        make_train_dataset(recs, data_config(), batch_size=4, seed=0, process_index=2,
                           process_count=2)


def test_bad_images_skipped_and_counted(tmp_path, caplog):
    root = write_manifest(tmp_path / "m", n=10, bad=(3,))
    recs = load_records("manifest", root, "all")
    ds = make_train_dataset(recs, data_config(max_bad_fraction=0.2), batch_size=4, seed=0)
    batches = _take(iter(ds), 12)
    scores = set(np.concatenate([b["score"] for b in batches]).tolist())
    assert 30.0 not in scores and len(scores) == 9
    assert ds.bad_images.failures >= 1 and list(ds.bad_images.bad) == [recs[3].path]
    assert any("img/003.jpg" in r.getMessage() for r in caplog.records)


def test_too_many_bad_images_abort_with_clear_error(tmp_path):
    root = write_manifest(tmp_path / "m", n=6, bad=(0, 2))
    recs = load_records("manifest", root, "all")
    it = iter(make_train_dataset(recs, data_config(max_bad_fraction=0.2), batch_size=4, seed=0))
    with pytest.raises(TooManyBadImagesError, match=r"2 of 6 images failed to decode.*"
                       r"max_bad_fraction=0.2.*img/00[02].jpg"):
        _take(it, 10)


def test_resize_none_and_small_crops(tmp_path):
    root = write_manifest(tmp_path / "m", n=4, size=(20, 30))
    recs = load_records("manifest", root, "all")
    b = next(iter(make_train_dataset(recs, data_config(resize=None, crop_size=24), batch_size=3,
                                     seed=0)))
    assert b["image"].shape == (3, 24, 24, 3)


@pytest.mark.parametrize("protocol, per_image", [("random", 3), ("center", 1), ("grid", 3)])
def test_eval_batches(manifest_dir, protocol, per_image):
    recs = load_records("manifest", manifest_dir, "all")
    cfg = data_config(eval_protocol=protocol)
    batches = list(make_eval_batches(recs, cfg, batch_size=5))
    total = len(recs) * per_image
    assert len(batches) == -(-total // 5) and num_eval_crops(cfg) == per_image
    for b in batches:
        assert b["image"].shape == (5, 32, 32, 3) and b["image"].dtype == np.uint8
        assert b["image_index"].dtype == np.int32 and b["valid"].dtype == bool
    image = np.concatenate([b["image"] for b in batches])
    idx = np.concatenate([b["image_index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == total and (idx[~valid] == -1).all()
    # Image i fills rows [i * n, (i + 1) * n) with exactly `eval_crops` of it.
    np.testing.assert_array_equal(idx[:total], np.repeat(np.arange(len(recs)), per_image))
    for i in (0, len(recs) - 1):
        np.testing.assert_array_equal(image[i * per_image:(i + 1) * per_image],
                                      eval_crops(recs[i].path, cfg, index=i))
    if protocol == "random":  # crops depend on (seed, image), not on the batch size
        other = np.concatenate([b["image"] for b in make_eval_batches(recs, cfg, batch_size=7)])
        np.testing.assert_array_equal(image[:total], other[:total])
        assert not np.array_equal(image[:per_image], image[per_image:2 * per_image])


def test_eval_batches_sharded_over_processes(manifest_dir):
    """Each process gets images p, p + P, ... and the same number of batches."""
    recs = load_records("manifest", manifest_dir, "all")[:7]
    cfg = data_config(eval_protocol="grid")
    single = np.concatenate([b["image"] for b in make_eval_batches(recs, cfg, batch_size=4)])
    shards = [list(make_eval_batches(recs, cfg, batch_size=4, process_index=p, process_count=3))
              for p in range(3)]
    assert len({len(s) for s in shards}) == 1  # 3 images of 3 crops = 9 rows -> 3 batches
    for p, shard in enumerate(shards):
        idx = np.concatenate([b["image_index"] for b in shard])
        valid = np.concatenate([b["valid"] for b in shard])
        image = np.concatenate([b["image"] for b in shard])
        mine = list(range(p, 7, 3))
        np.testing.assert_array_equal(idx[valid], np.repeat(mine, 3))
        for i in mine:
            rows = image[valid][idx[valid] == i]
            np.testing.assert_array_equal(rows, single[3 * i:3 * i + 3])


def test_eval_keeps_rows_of_a_bad_image_invalid(tmp_path):
    root = write_manifest(tmp_path / "m", n=5, bad=(1,))
    recs = load_records("manifest", root, "all")
    errors = {}
    batches = list(make_eval_batches(recs, data_config(max_bad_fraction=0.5), batch_size=4,
                                     on_error=errors.__setitem__))
    idx = np.concatenate([b["image_index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(idx[:15], np.repeat(np.arange(5), 3))
    assert not valid[3:6].any() and valid[:3].all() and valid[6:15].all()
    assert list(errors) == [1] and errors[1]  # the decoder's reason
    with pytest.raises(TooManyBadImagesError):
        list(make_eval_batches(recs, data_config(max_bad_fraction=0.1), batch_size=4))


def test_worker_processes_give_the_threads_stream_and_resume(manifest_dir):
    """Decoding in 2 grain worker processes: the same batches as threads, and exact resume."""
    recs = load_records("manifest", manifest_dir, "all")
    threads = _take(iter(make_train_dataset(recs, data_config(), batch_size=4, seed=3)), 6)
    cfg = data_config(worker_processes=2)
    pipeline.mark_flags_parsed()  # as a training run does where it starts
    it = iter(make_train_dataset(recs, cfg, batch_size=4, seed=3))
    first = _take(it, 3)
    state = it.get_state()
    rest = _take(it, 3)
    for x, y in zip(threads, first + rest):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["score"], y["score"])
    resumed = iter(make_train_dataset(recs, cfg, batch_size=4, seed=3))
    resumed.set_state(state)
    for x, y in zip(rest, _take(resumed, 3)):
        np.testing.assert_array_equal(x["image"], y["image"])
