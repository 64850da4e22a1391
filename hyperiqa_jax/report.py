"""Pictures of scores for people: the folder report (`predict --report`) and quality maps.

The report is one self-contained HTML page: every scored image as a thumbnail
with its score and path, best first (with its quality map beside it when
`predict --map` made one), then the files that could not be scored with their
error. It has no external resources: pictures are inline base64 images and the
CSS is inline, so it opens offline and can be mailed or archived as one file.

A quality map picture (`map_picture`) is a heat map of a `scoring.QualityMap`
over the dimmed image: each pixel coloured by the mean score of the crops that
cover it, red for the image's lowest and blue for its highest, with a legend
strip giving the two scores.
"""

import base64
import concurrent.futures
import datetime
import html
import io
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from hyperiqa_jax.data import image as image_lib

THUMBNAIL_SIZE = 160  # pixels, the longer side
MAP_COLORMAP = "RdYlBu"  # matplotlib's: red (low) - yellow - blue (high)
MAP_OPACITY = 0.6  # of the colours over the dimmed image
LEGEND_HEIGHT = 18  # pixels

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
p.summary { color: #555; margin-top: 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr));
        gap: 12px; }
figure { margin: 0; padding: 8px; background: #fff; border: 1px solid #ddd;
         border-radius: 6px; }
figure .thumb { height: 160px; display: flex; align-items: center; justify-content: center;
                background: #eee; }
figure img { max-width: 100%; max-height: 160px; }
figure.with-map { grid-column: span 2; }
figure.with-map .thumb { gap: 6px; }
figure.with-map img { max-width: 49%; }
figcaption { margin-top: 6px; font-size: 0.85em; }
.rank { color: #888; }
.score { font-size: 1.3em; font-weight: 600; }
.bar { height: 5px; background: #e3e3e3; border-radius: 3px; margin: 4px 0; }
.bar span { display: block; height: 100%; background: #3a7bd5; border-radius: 3px; }
.name { overflow-wrap: anywhere; color: #222; }
.folder { overflow-wrap: anywhere; color: #888; font-size: 0.9em; }
table { border-collapse: collapse; margin-top: 0.5em; }
td, th { border: 1px solid #ddd; padding: 4px 8px; text-align: left; font-size: 0.9em; }
th { background: #f0f0f0; }
td.error { color: #a00; }
td.path { overflow-wrap: anywhere; }
"""


def thumbnail_data_uri(path, size=THUMBNAIL_SIZE):
    """The image shrunk to fit size x size as a `data:image/jpeg;base64,...` URI, or None."""
    try:
        # JPEGs decode at reduced DCT scale: fast even for large photographs.
        img = image_lib.open_rgb(path, min_size=(size, size), draft=True)
    except image_lib.ImageDecodeError:
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render(results, *, title="Image quality report", source=None, thumbnails=None, maps=None,
           direction="higher scores = better quality"):
    """The HTML page (a str) for `results`, a list of (path, score, error).

    A result with an error (or a non-finite score) is listed as failed.
    thumbnails: {path: data URI or None}; by default made here. maps: {path:
    data URI of its quality map picture}, shown beside the thumbnail.
    """
    maps = maps or {}
    scored = [(p, float(s)) for p, s, e in results if e is None and math.isfinite(s)]
    failed = [(p, e or "no score") for p, s, e in results
              if not (e is None and math.isfinite(s))]
    scored.sort(key=lambda r: (-r[1], r[0]))
    if thumbnails is None:
        thumbnails = make_thumbnails([p for p, _ in scored])
    lo = min((s for _, s in scored), default=0.0)
    hi = max((s for _, s in scored), default=1.0)
    esc = html.escape
    now = datetime.datetime.now().isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="summary">{len(scored)} scored, {len(failed)} failed; {esc(direction)}; '
        "sorted best first; each bar spans this page's lowest to highest score."
        + (f" Checkpoint {esc(str(source))}." if source else "") + f" Written {esc(now)}.</p>",
        f'<h2 id="scored">Scored images ({len(scored)})</h2>', '<div class="grid">',
    ]
    for rank, (path, score) in enumerate(scored, 1):
        uri = thumbnails.get(path)
        img = (f'<img src="{uri}" alt="{esc(os.path.basename(path))}">' if uri
               else "<span>no preview</span>")
        if maps.get(path):
            img += (f'<img class="map" src="{maps[path]}" '
                    f'alt="quality map of {esc(os.path.basename(path))}">')
        width = 100.0 if hi == lo else 100.0 * (score - lo) / (hi - lo)
        kind = "image with-map" if maps.get(path) else "image"
        parts.append(
            f'<figure class="{kind}" data-score="{score:.4f}" data-path="{esc(path)}">'
            f'<div class="thumb">{img}</div><figcaption>'
            f'<span class="rank">#{rank}</span> <span class="score">{score:.2f}</span>'
            f'<div class="bar"><span style="width: {width:.1f}%"></span></div>'
            f'<div class="name">{esc(os.path.basename(path))}</div>'
            f'<div class="folder">{esc(os.path.dirname(path))}</div></figcaption></figure>')
    parts.append("</div>")
    if failed:
        parts += [f'<h2 id="failed">Not scored ({len(failed)})</h2>',
                  "<table><tr><th>path</th><th>error</th></tr>"]
        parts += [f'<tr class="failed"><td class="path">{esc(p)}</td>'
                  f'<td class="error">{esc(e)}</td></tr>' for p, e in failed]
        parts.append("</table>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def make_thumbnails(paths, workers=None):
    """{path: data URI or None}, decoded in threads (PIL releases the GIL while decoding)."""
    workers = workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(zip(paths, pool.map(thumbnail_data_uri, paths)))


def write_report(path, results, **kwargs):
    """Writes `render(results, **kwargs)` to `path`."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(results, **kwargs))


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------- quality maps


def map_picture(quality_map) -> Image.Image:
    """The heat map of a `scoring.QualityMap` over its dimmed thumbnail, with a legend."""
    from matplotlib import colormaps

    thumb = quality_map.thumbnail
    h, w = thumb.shape[:2]
    values = quality_map.coverage_mean(h, w)
    lo, hi = float(values.min()), float(values.max())
    unit = (values - lo) / (hi - lo) if hi > lo else np.full_like(values, 0.5)
    cmap = colormaps[MAP_COLORMAP]
    colours = cmap(unit)[..., :3] * 255.0
    dimmed = thumb.astype(np.float64).mean(axis=-1, keepdims=True) * 0.5
    blend = (1 - MAP_OPACITY) * dimmed + MAP_OPACITY * colours
    picture = Image.new("RGB", (w, h + LEGEND_HEIGHT), "white")
    picture.paste(Image.fromarray(np.clip(np.round(blend), 0, 255).astype(np.uint8)), (0, 0))
    strip = cmap(np.linspace(0.0, 1.0, w))[None, :, :3] * 255.0
    strip = np.repeat(strip, LEGEND_HEIGHT, axis=0).round().astype(np.uint8)
    picture.paste(Image.fromarray(strip), (0, h))
    draw = ImageDraw.Draw(picture)
    text = dict(fill="white", stroke_width=2, stroke_fill="black")  # legible on either end
    draw.text((3, h + 3), f"{lo:.1f}", **text)
    label = f"{hi:.1f}"
    draw.text((w - 3 - draw.textlength(label), h + 3), label, **text)
    return picture


def map_png(quality_map) -> bytes:
    """`map_picture` as PNG bytes."""
    buf = io.BytesIO()
    map_picture(quality_map).save(buf, "PNG", optimize=True)
    return buf.getvalue()
