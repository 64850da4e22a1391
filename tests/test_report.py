"""The HTML folder report: every image listed, best first, errors shown, nothing external."""

import base64
import io
from html.parser import HTMLParser

import numpy as np
from PIL import Image

from hyperiqa_jax import report


class PageParser(HTMLParser):
    """Collects the scored figures, failed rows, every URL-bearing attribute and the tags."""

    def __init__(self):
        super().__init__()
        self.figures, self.failed, self.urls, self.tags = [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "figure":
            self.figures.append({"path": attrs["data-path"], "score": float(attrs["data-score"]),
                                 "img": None, "map": None})
        if tag == "img":
            self.figures[-1]["map" if attrs.get("class") == "map" else "img"] = attrs["src"]
        self.urls += [v for k, v in attrs.items() if k in ("src", "href", "srcset", "action")]
        if tag == "tr" and attrs.get("class") == "failed":
            self.failed.append({})
        if tag == "td" and self.failed:
            self._cell = attrs.get("class")

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._cell:
            self.failed[-1][self._cell] = self.failed[-1].get(self._cell, "") + data


def _images(folder):
    rng = np.random.default_rng(0)
    paths = []
    for i, (size, ext) in enumerate([((300, 200), "jpg"), ((40, 30), "png"), ((64, 96), "webp"),
                                     ((1200, 900), "jpg")]):
        path = folder / f"img{i} <&>.{ext}"  # characters that must be escaped
        Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_page_lists_every_image_by_score_with_errors(tmp_path):
    paths = _images(tmp_path)
    scores = [41.5, 77.25, 12.0, 77.25]
    results = [(p, s, None) for p, s in zip(paths, scores)]
    results += [(str(tmp_path / "broken.jpg"), float("nan"), "cannot decode image: truncated"),
                (str(tmp_path / "gone.png"), float("nan"), "cannot decode image: file not found")]
    out = tmp_path / "report.html"
    report.write_report(out, results, source="runs/demo/best/117")
    page = PageParser()
    page.feed(out.read_text(encoding="utf-8"))

    # Every scored image once, best first (ties by path), with its exact score.
    assert [f["path"] for f in page.figures] == [paths[1], paths[3], paths[0], paths[2]]
    assert [f["score"] for f in page.figures] == [77.25, 77.25, 41.5, 12.0]
    # Each has an inline JPEG thumbnail that decodes and fits in the thumbnail size.
    for f in page.figures:
        assert f["img"].startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(f["img"].split(",", 1)[1])))
        assert max(thumb.size) <= report.THUMBNAIL_SIZE
    # The failed files with their errors.
    assert page.failed == [
        {"path": str(tmp_path / "broken.jpg"), "error": "cannot decode image: truncated"},
        {"path": str(tmp_path / "gone.png"), "error": "cannot decode image: file not found"}]
    # Self-contained: every URL is inline data, no external stylesheet or script.
    assert page.urls and all(u.startswith("data:") for u in page.urls)
    assert "link" not in page.tags and "script" not in page.tags
    assert "http://" not in out.read_text() and "https://" not in out.read_text()


def test_unreadable_image_gets_no_thumbnail_but_is_listed(tmp_path):
    bad = tmp_path / "renamed.jpg"
    bad.write_bytes(b"not an image")
    page = PageParser()
    page.feed(report.render([(str(bad), 50.0, None)]))
    assert [f["path"] for f in page.figures] == [str(bad)]
    assert page.figures[0]["img"] is None


def test_empty_results_render():
    page = PageParser()
    page.feed(report.render([]))
    assert page.figures == [] and page.failed == []


def _quality_map(scores, lefts, crop=50, size=(50, 100)):
    from hyperiqa_jax.scoring import QualityMap

    return QualityMap(scores=np.array([scores], np.float64), tops=np.array([0]),
                      lefts=np.array(lefts), crop_size=crop, stride=25, image_size=size,
                      thumbnail=np.full((*size, 3), 128, np.uint8))


def test_map_pixels_are_the_mean_of_the_crops_covering_them():
    qmap = _quality_map([10.0, 30.0, 50.0], [0, 25, 50])
    values = qmap.coverage_mean(50, 100)
    expected = np.repeat([10.0, 20.0, 40.0, 50.0], 25)  # 1, 2, 2, 1 crops over each quarter
    np.testing.assert_array_equal(values, np.tile(expected, (50, 1)))
    # At half the size crop edges fall at 12.5 and 37.5 pixels, rounded to even: 12, 38.
    np.testing.assert_array_equal(qmap.coverage_mean(25, 50)[0, [0, 11, 12, 37, 38, 49]],
                                  [10.0, 10.0, 20.0, 40.0, 50.0, 50.0])


def test_map_picture_is_red_where_low_and_blue_where_high():
    picture = report.map_picture(_quality_map([10.0, 90.0], [0, 50]))
    assert picture.size == (100, 50 + report.LEGEND_HEIGHT)
    pixels = np.asarray(picture).astype(int)
    left, right = pixels[25, 10], pixels[25, 90]
    assert left[0] > left[2] + 50 and right[2] > right[0] + 50, (left, right)
    png = report.map_png(_quality_map([10.0, 90.0], [0, 50]))
    assert Image.open(io.BytesIO(png)).size == picture.size


def test_page_shows_a_map_beside_its_thumbnail(tmp_path):
    paths = _images(tmp_path)[:2]
    uri = report.png_data_uri(report.map_png(_quality_map([10.0, 90.0], [0, 50])))
    page = PageParser()
    page.feed(report.render([(p, 50.0 + i, None) for i, p in enumerate(paths)],
                            maps={paths[0]: uri}))
    by_path = {f["path"]: f for f in page.figures}
    assert by_path[paths[0]]["map"] == uri and by_path[paths[1]]["map"] is None
    assert all(f["img"].startswith("data:image/jpeg;base64,") for f in page.figures)
