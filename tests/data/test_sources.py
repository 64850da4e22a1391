"""Data roots, label files and images at URLs (gs://), read through etils.epath.

etils' `mock_epath` routes every epath call to functions given here; they map
gs://bucket/... onto a temporary folder, so the readers see real URLs (which
os.path cannot open) while the test stays offline.
"""

import json
import os

import numpy as np
import pytest
from etils.epath import testing as epath_testing
from PIL import Image

from hyperiqa_jax.data.image import load_image, load_resized
from hyperiqa_jax.data.records import LabelFileError, load_records
from hyperiqa_jax.data.sources import split_scores
from hyperiqa_jax.paths import is_url
from tests.data.conftest import write_manifest
from tests.data.test_records import make_koniq, make_livec, make_spaq


@pytest.fixture
def bucket(tmp_path):
    """(local folder behind gs://bucket, list of the URLs epath was asked about)."""
    local = tmp_path / "bucket"
    local.mkdir()
    urls = []

    def to_local(path):
        path = os.fspath(path)
        if path.startswith("gs://bucket"):
            urls.append(path)
            return str(local) + path[len("gs://bucket"):]
        return path

    def mocked(original, path, *args, **kwargs):
        return original(to_local(path), *args, **kwargs)

    names = ("open", "exists", "isdir", "listdir", "glob", "stat", "walk")
    with epath_testing.mock_epath(**dict.fromkeys(names, mocked)):
        yield local, urls


def test_koniq_from_a_bucket(bucket):
    local, urls = bucket
    make_koniq(local / "koniq")
    recs = load_records("koniq10k", "gs://bucket/koniq", "train")
    ref = load_records("koniq10k", str(local / "koniq"), "train")
    assert [r.image_id for r in recs] == [r.image_id for r in ref]
    assert [r.score for r in recs] == [40.0, 41.0, 42.0, 45.0, 46.0, 47.0]
    assert recs[0].path == "gs://bucket/koniq/1024x768/1000.jpg"
    assert not os.path.exists(recs[0].path)  # only epath can open it
    assert "gs://bucket/koniq/koniq10k_distributions_sets.csv" in urls
    # The image decodes through epath to the local file's pixels.
    want = np.asarray(Image.open(ref[0].path).convert("RGB"))
    np.testing.assert_array_equal(load_image(recs[0].path), want)
    np.testing.assert_array_equal(load_resized(recs[0].path, (16, 20), 8),
                                  np.asarray(Image.open(ref[0].path).convert("RGB")
                                             .resize((20, 16), Image.BILINEAR)))
    np.testing.assert_array_equal(split_scores(recs), [40, 41, 42, 45, 46, 47])


def test_manifest_xlsx_and_mat_from_a_bucket(bucket):
    local, _ = bucket
    write_manifest(local / "m", n=4)
    recs = load_records("manifest", "gs://bucket/m/manifest.csv", "test")
    assert [(r.path, r.score) for r in recs] == [("gs://bucket/m/img/003.jpg", 30.0)]
    make_spaq(local / "spaq")
    assert load_records("spaq", "gs://bucket/spaq", "all")[1].score == 21.5
    make_livec(local / "livec")
    livec = load_records("livec", "gs://bucket/livec", "all")
    assert livec[0].path == "gs://bucket/livec/Images/107.bmp"
    np.testing.assert_allclose([r.score for r in livec], np.linspace(20, 80, 12)[7:])


def test_bucket_errors_name_the_url(bucket):
    local, _ = bucket
    write_manifest(local / "m", n=4)
    os.remove(local / "m" / "img" / "002.jpg")
    with pytest.raises(LabelFileError, match=r"1 listed image file\(s\) missing: row 4: "
                                             r"gs://bucket/m/img/002.jpg"):
        load_records("manifest", "gs://bucket/m", "all")
    with pytest.raises(FileNotFoundError, match="gs://bucket/nothing"):
        load_records("koniq10k", "gs://bucket/nothing", "all")


def test_is_url():
    assert is_url("gs://b/x") and is_url("s3://b") and not is_url("/data/x")
    assert not is_url("relative/path.jpg")


def test_run_records_in_a_bucket_workdir(bucket):
    """A gs:// workdir: the run's path stays a URL; metrics.jsonl is written through epath."""
    from hyperiqa_jax import train
    from hyperiqa_jax.logs import MetricWriter

    local, urls = bucket
    workdir = train.workdir_path("gs://bucket/run")
    assert str(workdir) == "gs://bucket/run"
    train.check_workdir("gs://bucket/run")  # nothing local to check; no error
    (local / "run").mkdir()
    writer = MetricWriter(workdir)
    writer.write(1, 0.5, "train", {"loss": 1.5})
    writer.write(2, 1.0, "test", {"srcc": float("nan")})
    writer.close()
    again = MetricWriter(workdir)  # a resumed run appends after the earlier rows
    again.write(3, 1.5, "train", {"loss": 1.0})
    lines = (local / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert json.loads(lines[1])["srcc"] is None
    assert "gs://bucket/run/metrics.jsonl" in urls
    assert not (local / "run" / "tb").exists()
