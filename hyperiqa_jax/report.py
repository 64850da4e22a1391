"""A folder report: one self-contained HTML page of scored images (`predict --report`).

Every scored image is shown as a thumbnail with its score and path, best first,
then the files that could not be scored with their error. The page has no
external resources: thumbnails are inline base64 JPEGs and the CSS is inline,
so it opens offline and can be mailed or archived as one file.
"""

import base64
import concurrent.futures
import datetime
import html
import io
import math
import os

from hyperiqa_jax.data import image as image_lib

THUMBNAIL_SIZE = 160  # pixels, the longer side

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


def render(results, *, title="Image quality report", source=None, thumbnails=None,
           direction="higher scores = better quality"):
    """The HTML page (a str) for `results`, a list of (path, score, error).

    A result with an error (or a non-finite score) is listed as failed.
    thumbnails: {path: data URI or None}; by default made here.
    """
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
        width = 100.0 if hi == lo else 100.0 * (score - lo) / (hi - lo)
        parts.append(
            f'<figure class="image" data-score="{score:.4f}" data-path="{esc(path)}">'
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
