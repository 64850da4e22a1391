"""A study's tables, figures and report files, and the per-stage attention reduction.

`python -m hyperiqa_jax.study ... report` gathers each run's results and calls
`write_report`; everything else here is a small function of plain values, so
the numbers can be checked by hand:

- `summarize`: a row of several runs is the median over random splits (as
  HyperIQA reports its 10 x 80/20 protocol) or the mean and sample standard
  deviation over seeds;
- `ablation_steps`: each step's SRCC gain over the row before it and its share
  of the total gain (first to last row), shares adding to 100%;
- `relative_change`: a zero-shot SRCC against the training set's, in %;
- `stage_attention`: the channel gate's weights over the fused channels
  averaged per backbone stage. The fused map is the concatenation of the pooled
  stage maps in stage order, so stage k owns the next `channels[k]` weights;
- `group_means`: per-stage attention by distortion type (or MOS bin).

evaluate writes each image's per-stage attention next to its predictions
(`write_stage_attention`), so the report never scores an image twice. JAX,
the model and matplotlib are imported only where they are used: evaluate
imports this module.
"""

import base64
import csv
import datetime
import html
import io
import json
import math
import os
import platform
import time

import numpy as np

STAGE_NAMES = ("stage 1", "stage 2", "stage 3", "stage 4")

# ---------------------------------------------------------------------------- attention


def stage_attention(attention, channels):
    """Per-stage mean attention: [N, sum(channels)] channel gates -> [N, len(channels)].

    channels: the channel count of each fused stage map, in fusion order.
    Attention that already has one weight per stage (scale attention) is
    returned as it is.
    """
    attention = np.asarray(attention, np.float64)
    if attention.shape[-1] == len(channels):
        return attention
    if attention.shape[-1] != sum(channels):
        raise ValueError(f"attention has {attention.shape[-1]} weights per image; stages of "
                         f"{tuple(channels)} channels need {sum(channels)}")
    bounds = np.cumsum((0, *channels))
    return np.stack([attention[..., a:b].mean(-1) for a, b in zip(bounds[:-1], bounds[1:])], -1)


def stage_channels(model_config):
    """Channels of each stage map the model fuses, in order (one entry when single-scale)."""
    import jax
    import jax.numpy as jnp

    from hyperiqa_jax.models import build_model

    model = build_model(model_config)
    size = int(model_config.img_size)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    out, _ = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, return_intermediates=True), images)
    return tuple(int(m.shape[-1]) for m in out["pooled_maps"])


def stage_labels(count):
    """Names of the fused stages: all four, or the deepest alone (single scale)."""
    return list(STAGE_NAMES[-count:]) if count <= len(STAGE_NAMES) else [
        f"stage {i + 1}" for i in range(count)]


def write_stage_attention(paths, stages, path):
    """attention_<data>_<split>.csv: image path and its mean attention per stage."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *[s.replace(" ", "_") for s in stage_labels(stages.shape[1])]])
        for image, row in zip(paths, stages):
            writer.writerow([image, *(f"{x:.9g}" for x in row)])


def read_stage_attention(path):
    """(paths, stage names, [N, S] float64) of a `write_stage_attention` file."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    names = [h.replace("_", " ") for h in rows[0][1:]]
    values = np.array([[float(x) for x in r[1:]] for r in rows[1:]], np.float64)
    return [r[0] for r in rows[1:]], names, values.reshape(-1, len(names))


def quality_bins(mos, bins=5):
    """(bin index per image, label per bin) of MOS quantile bins, lowest first."""
    mos = np.asarray(mos, np.float64)
    edges = np.quantile(mos, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, mos, side="right") - 1, 0, bins - 1)
    return which, [f"MOS {edges[b]:.0f}-{edges[b + 1]:.0f}" for b in range(bins)]


def group_means(values, groups, order=None):
    """{group: mean of its rows of `values`} for each group (in `order`, else sorted)."""
    values = np.asarray(values, np.float64)
    groups = np.asarray(groups)
    order = sorted(set(groups.tolist())) if order is None else order
    return {g: values[groups == g].mean(0) for g in order if np.any(groups == g)}


# ---------------------------------------------------------------------------- aggregation


def summarize(values, kind):
    """One table cell from a row's runs: {'value', 'std', 'n', 'values', 'kind'}.

    kind 'splits': the median over random splits (HyperIQA's protocol); 'seeds':
    the mean and the sample standard deviation (ddof 1; None for one run). Runs
    without a value (missing, failed, undefined correlation) are left out and
    counted in n_missing.
    """
    given = [v for v in values if v is not None and math.isfinite(v)]
    out = {"kind": kind, "n": len(given), "n_missing": len(values) - len(given),
           "values": given, "value": None, "std": None}
    if not given:
        return out
    if kind == "splits":
        out["value"] = float(np.median(given))
    else:
        out["value"] = float(np.mean(given))
        out["std"] = float(np.std(given, ddof=1)) if len(given) > 1 else None
    return out


def ablation_steps(values, chain):
    """The ablation table: each row's gain over the row before it and its share of the total.

    values: {row: SRCC or None}; chain: the rows in order, each the baseline of
    the next. Returns (steps, total): steps [{'row', 'baseline', 'value',
    'delta', 'share'}] (share in % of total = last - first; None where a value
    is missing), so the shares of a complete chain add to 100.
    """
    first, last = values.get(chain[0]), values.get(chain[-1])
    total = None if first is None or last is None else last - first
    steps = []
    for i, row in enumerate(chain):
        baseline = chain[i - 1] if i else None
        value, base = values.get(row), values.get(baseline) if baseline else None
        delta = None if value is None or base is None else value - base
        share = None if delta is None or not total else 100.0 * delta / total
        steps.append({"row": row, "baseline": baseline, "value": value, "delta": delta,
                      "share": share})
    return steps, total


def relative_change(value, reference):
    """`value` against `reference` in % (negative: a drop), or None."""
    if value is None or reference is None or reference == 0:
        return None
    return 100.0 * (value / reference - 1.0)


# ---------------------------------------------------------------------------- model facts


def parameter_breakdown(model_config):
    """{component: parameter count} of a model: backbone stem and stages, LDA, attention,
    hyper network (feature convs; target-weight generators); the target network has none
    of its own (the hyper network generates its weights per image)."""
    import jax
    import jax.numpy as jnp

    from hyperiqa_jax.complexity import count_params
    from hyperiqa_jax.models import build_model

    model = build_model(model_config)
    size = int(model_config.img_size)
    params = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]
    parts = dict.fromkeys(PARTS, 0)

    def add(name, tree):
        parts[name] = parts.get(name, 0) + count_params(tree)

    for key, tree in params["backbone"].items():
        add(_backbone_part(key), tree)
    add("LDA (target-net input)", params["lda"])
    add("attention", params.get("attention", {}))
    for key, tree in params["hyper"].items():
        add("hyper network: feature convs" if key.startswith("feature_conv")
            else "hyper network: target-weight generators", tree)
    add("target network (generated)", params.get("target", {}))
    return {k: v for k, v in parts.items() if v or k.startswith("target")}


PARTS = ("backbone stem", "backbone stage 1", "backbone stage 2", "backbone stage 3",
         "backbone stage 4", "LDA (target-net input)", "attention",
         "hyper network: feature convs", "hyper network: target-weight generators",
         "target network (generated)")


def _backbone_part(key):
    """Swin `layers_<i>` / ResNet `layer<i>_<j>` -> 'backbone stage i+1'; else the stem."""
    for prefix, offset in (("layers_", 1), ("layer", 0)):
        head = key[len(prefix):].split("_")[0]
        if key.startswith(prefix) and head.isdigit():
            return f"backbone stage {int(head) + offset}"
    return "backbone stem"


def scoring_seconds(model_config, batch_sizes, *, crop_size, min_seconds=2.0, max_calls=20):
    """{batch: seconds per image} of the scoring forward (scoring.predict_scores, uint8 crops
    in, one crop per image) after a warm-up call; the median call over >= 3 calls and
    `min_seconds`."""
    import jax
    import jax.numpy as jnp

    from hyperiqa_jax import scoring
    from hyperiqa_jax.models import build_model

    model = build_model(model_config)
    variables = jax.jit(lambda r: model.init(
        r, jnp.zeros((1, crop_size, crop_size, 3), jnp.float32)))(jax.random.key(0))
    forward = jax.jit(lambda v, x: scoring.predict_scores(model, v, x, (0.0, 1.0))[0])
    rng = np.random.default_rng(0)
    out = {}
    for batch in batch_sizes:
        images = rng.integers(0, 256, (batch, crop_size, crop_size, 3), np.uint8)
        jax.block_until_ready(forward(variables, images))  # compilation
        times = []
        while len(times) < 3 or (sum(times) < min_seconds and len(times) < max_calls):
            t0 = time.perf_counter()
            jax.block_until_ready(forward(variables, images))
            times.append(time.perf_counter() - t0)
        out[batch] = float(np.median(times)) / batch
    return out


def machine():
    """Where the report's timings were taken."""
    import jax

    device = jax.devices()[0]
    return {"platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
            "device": device.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__}


# ---------------------------------------------------------------------------- tables


def fmt(x, digits=4):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else \
        f"{x:.{digits}f}"


def fmt_cell(cell, digits=4):
    """'0.8123 +- 0.0100 (3 seeds)', '0.9012 (median of 10 splits)' or '0.8000'."""
    if cell is None or cell["value"] is None:
        return "-"
    text = fmt(cell["value"], digits)
    if cell["kind"] == "splits" and cell["n"] > 1:
        text += f" (median of {cell['n']})"
    elif cell["std"] is not None:
        text += f" +- {fmt(cell['std'], digits)}"
    if cell["n_missing"]:
        text += f" ({cell['n_missing']} missing)"
    return text


def fmt_signed(x, digits=4, suffix=""):
    return "-" if x is None else f"{x:+.{digits}f}{suffix}"


def fmt_count(n):
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


class Table:
    """A header and rows of strings, written as Markdown and as HTML."""

    def __init__(self, header, rows):
        self.header = list(header)
        self.rows = [list(map(str, r)) for r in rows]

    def markdown(self):
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in self.rows]
        return "\n".join(lines)

    def html(self):
        esc = html.escape
        head = "".join(f"<th>{esc(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>"
                       for r in self.rows)
        return f"<table><tr>{head}</tr>{body}</table>"


# ---------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def figure_size_vs_srcc(points):
    """points: [(row, GFLOPs, SRCC, spread or None)] -> PNG bytes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for row, gflops, srcc, spread in points:
        ax.errorbar([gflops], [srcc], yerr=None if spread is None else [[spread], [spread]],
                    marker="o", capsize=3)
        ax.annotate(row, (gflops, srcc), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("GFLOPs per image (XLA)")
    ax.set_ylabel("test SRCC")
    ax.set_title("model size vs SRCC", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def figure_cross_data(rows, labels, values):
    """Grouped bars: values[row][label] = SRCC (or None) -> PNG bytes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels) + 2), 3.6))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        heights = [values[row].get(label) or 0.0 for label in labels]
        ax.bar(np.arange(len(labels)) + i * width, heights, width, label=row)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, fontsize=8)
    ax.set_ylabel("SRCC")
    ax.set_title("trained on the first, zero-shot on the others", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def figure_training_curves(curves, smooth=5):
    """curves: [(row, tag, [(epoch, loss)], [(epoch, test SRCC)])] -> PNG bytes.

    Training loss as a moving average of `smooth` logged steps, every run on one
    axis (one colour per row); test SRCC on a second axis when runs evaluated.
    """
    plt = _pyplot()
    with_test = any(test for *_, test in curves)
    fig, axes = plt.subplots(1, 2 if with_test else 1, figsize=(10 if with_test else 6, 3.8),
                             squeeze=False)
    colours = {}
    styles = ("-", "--", ":", "-.")
    tags = {}
    for row, tag, loss, test in curves:
        colour = colours.setdefault(row, f"C{len(colours) % 10}")
        style = styles[tags.setdefault(row, []).__len__() % len(styles)]
        tags[row].append(tag)
        if loss:
            x, y = map(np.asarray, zip(*loss))
            k = min(smooth, len(y))
            y = np.convolve(y, np.ones(k) / k, mode="valid")
            axes[0, 0].plot(x[k - 1:], y, style, color=colour, lw=1,
                            marker="." if len(y) < 3 else None, label=f"{row} {tag}")
        if test and with_test:
            axes[0, 1].plot(*zip(*test), style, color=colour, marker=".", lw=1,
                            label=f"{row} {tag}")
    axes[0, 0].set_xlabel("epoch")
    axes[0, 0].set_ylabel(f"training loss (mean of {smooth} logs)")
    axes[0, 0].legend(fontsize=6, ncol=2)
    if with_test:
        axes[0, 1].set_xlabel("epoch")
        axes[0, 1].set_ylabel("test SRCC")
    fig.tight_layout()
    return _png(fig)


def figure_stage_attention(panels):
    """panels: [(row, groups, stage names, relative [G, S], spread [G, S] or None)] -> PNG.

    Bars: each group's mean gate of a stage against that stage's mean over all
    images, in % (0 = the stage's average weight).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False)
    for ax, (row, groups, names, rel, spread) in zip(axes[:, 0], panels):
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            ax.bar(np.arange(len(groups)) + k * width, rel[:, k], width, label=name,
                   yerr=None if spread is None else spread[:, k], capsize=2)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, fontsize=8)
        ax.set_ylabel("gate vs stage mean (%)")
        ax.set_title(f"{row}: per-stage channel attention", fontsize=10)
        ax.legend(fontsize=7, ncol=len(names))
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------- the report


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; font-size: 0.9em; text-align: left; }
th { background: #f0f0f0; }
img { max-width: 100%; border: 1px solid #eee; }
p.note { color: #555; }
"""


class Document:
    """The report's sections, written as Markdown (figures beside it) and as one HTML page."""

    def __init__(self, title):
        self.title = title
        self.parts = []  # ("h2" | "p" | "table" | "figure", value)

    def heading(self, text):
        self.parts.append(("h2", text))

    def text(self, text):
        self.parts.append(("p", text))

    def table(self, table):
        self.parts.append(("table", table))

    def figure(self, name, png, caption):
        self.parts.append(("figure", (name, png, caption)))

    def markdown(self):
        out = [f"# {self.title}", ""]
        for kind, value in self.parts:
            if kind == "h2":
                out += [f"## {value}", ""]
            elif kind == "p":
                out += [value, ""]
            elif kind == "table":
                out += [value.markdown(), ""]
            else:
                name, _, caption = value
                out += [f"![{caption}]({name})", "", f"*{caption}*", ""]
        return "\n".join(out)

    def html(self):
        esc = html.escape
        out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
               f"<title>{esc(self.title)}</title><style>{CSS}</style></head><body>",
               f"<h1>{esc(self.title)}</h1>"]
        for kind, value in self.parts:
            if kind == "h2":
                out.append(f"<h2>{esc(value)}</h2>")
            elif kind == "p":
                out.append(f"<p>{_inline_code(esc(value))}</p>")
            elif kind == "table":
                out.append(value.html())
            else:
                name, png, caption = value
                data = base64.b64encode(png).decode("ascii")
                out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(name)}">'
                           f"<figcaption>{esc(caption)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)

    def figures(self):
        return {value[0]: value[1] for kind, value in self.parts if kind == "figure"}


def _inline_code(text):
    """`code` spans of Markdown as <code> in escaped HTML text."""
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def write_report(out_dir, document, data):
    """report.md, report.html, report.json and the figures (PNG) into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    for name, png in document.figures().items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(png)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(document.markdown())
    with open(os.path.join(out_dir, "report.html"), "w", encoding="utf-8") as f:
        f.write(document.html())
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(data, f, indent=2, default=_json_default)
    return out_dir


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def now():
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


# ---------------------------------------------------------------------------- attention groups


def distortion_labels(name, root):
    """{image path: distortion} from a manifest's `distortion` column (the demo's), or None."""
    if name not in ("manifest", "demo") or not root:
        return None
    from hyperiqa_jax.data import records, tables
    from hyperiqa_jax.paths import isfile, join, parent, path_in

    path = root if isfile(root) else join(root, "manifest.csv")
    if not path.endswith(".csv") or not isfile(path):
        return None
    header, rows = tables.read_table(path)
    column = next((c for c in records.PATH_COLUMNS if c in header), None)
    if "distortion" not in header or column is None:
        return None
    folder = parent(path)
    return {os.path.normpath(path_in(folder, r[column])): r["distortion"] for r in rows}


def attention_groups(values, paths, names, *, distortions=None, mos=None, bins=5):
    """One run's per-stage attention by distortion type (when every image has one), else by
    MOS quintile: {'by', 'stages', 'groups': {group: [S] mean gate}, 'counts', 'overall'}."""
    values = np.asarray(values, np.float64)
    keys = [os.path.normpath(p) for p in paths]
    if distortions and all(k in distortions for k in keys):
        by, groups = "distortion", [distortions[k] for k in keys]
        order = sorted(set(groups))
    else:
        mos_by_path = {os.path.normpath(p): v for p, v in (mos or {}).items()}
        which, _ = quality_bins([mos_by_path[k] for k in keys], bins)
        order = [f"MOS quintile {b + 1}" + (" (lowest)" if b == 0 else " (highest)"
                                            if b == bins - 1 else "") for b in range(bins)]
        by, groups = "MOS quintile", [order[b] for b in which]
    means = group_means(values, groups, order)
    return {"by": by, "stages": list(names), "overall": values.mean(0).tolist(),
            "groups": {g: m.tolist() for g, m in means.items()},
            "counts": {g: int(sum(x == g for x in groups)) for g in means}}


def combine_attention(per_run):
    """A row's attention over its runs: mean gate, and each group's gate against the stage's
    mean over all images in % (mean and std over runs), and which stage that favours most.

    per_run: `attention_groups` results of runs with the same groups and stages.
    """
    groups = list(per_run[0]["groups"])
    raw = np.array([[r["groups"][g] for g in groups] for r in per_run])  # [R, G, S]
    overall = np.array([r["overall"] for r in per_run])[:, None, :]
    rel = 100.0 * (raw / overall - 1.0)
    top = rel.argmax(-1)  # [R, G]
    stages = per_run[0]["stages"]
    return {"by": per_run[0]["by"], "stages": stages, "groups": groups, "runs": len(per_run),
            "mean": raw.mean(0).tolist(), "overall": overall.mean(0)[0].tolist(),
            "relative": rel.mean(0).tolist(),
            "relative_std": rel.std(0, ddof=1).tolist() if len(per_run) > 1 else None,
            "top_stage": {g: {s: int((top[:, i] == k).sum()) for k, s in enumerate(stages)
                              if (top[:, i] == k).any()} for i, g in enumerate(groups)}}


# ---------------------------------------------------------------------------- building it


def build_report(study, runs, models, *, root, overrides, skipped, timing_batches, command):
    """(Document, JSON data) of a study.

    study: the checked study (hyperiqa_jax.study.Study); runs: one dict per run
    (hyperiqa_jax.study.gather_run); models: {row: its model config}.
    """
    kind = study.kind
    doc = Document(f"Study {study.name}" + (f": {study.description}" if study.description
                                             else ""))
    finished = [r for r in runs if r["status"] == "finished"]
    repeat = (f"{study.splits} random 80/20 splits per row (median)" if study.splits else
              f"one run per row (seed {study.seeds[0]})" if len(study.seeds) == 1 else
              f"seeds {', '.join(map(str, study.seeds))} per row (mean +- sample std)")
    doc.text(f"Written {now()} by `{command}`. {len(finished)} of {len(runs)} runs finished; "
             f"{repeat}.")
    doc.text("Overrides given to every run: " + ", ".join(f"`{o}`" for o in overrides) + "."
             if overrides else "No overrides: every run trains its config as it is.")
    info = machine()
    doc.text(f"Measured on: {info['processor']}, {info['cpu_count']} CPU cores, JAX "
             f"{info['jax']} on {info['device_count']} {info['jax_backend']} device(s) "
             f"({info['device']}); {info['platform']}.")
    data = {"study": study.spec, "name": study.name, "written": now(), "command": command,
            "overrides": list(overrides), "machine": info, "kind": kind, "runs": runs,
            "not_planned": list(skipped)}

    # ---- runs
    doc.heading("Runs")
    table = []
    for r in runs:
        result = r["results"].get(r["in_domain"], {})
        steps = f"{r['step']}/{r['total_steps']}" if r.get("step") is not None else "-"
        minutes = "-" if not r.get("train_seconds") else f"{r['train_seconds'] / 60:.1f}"
        table.append([r["row"], r["tag"], r["status"], steps, minutes, fmt(result.get("srcc")),
                      fmt(result.get("plcc")), os.path.relpath(r["workdir"], root)])
    doc.table(Table(["row", "run", "status", "steps", "train min", "test SRCC", "test PLCC",
                     "workdir"], table))
    total = sum(r.get("train_seconds") or 0 for r in runs)
    doc.text(f"Training time of all runs: {total / 3600:.2f} h (each run's processes, summed).")
    problems = [f"{r['row']}/{r['tag']}: {r['status']}" + (f" ({r['error']})" if r["error"]
                                                            else "")
                for r in runs if r["status"] != "finished"]
    problems += [f"{r['row']}/{r['tag']}: not evaluated on {label} ({why})"
                 for r in runs for label, why in r["not_evaluated"].items()]
    problems += [f"not planned: {s}" for s in skipped]
    data["missing"] = problems
    doc.text("Missing or failed: " + ("; ".join(problems) if problems else "none") + ".")

    # ---- rows
    def cell(row, metric, label=None):
        values = [(r["results"].get(label or r["in_domain"]) or {}).get(metric)
                  for r in runs if r["row"] == row]
        return summarize(values, kind)

    rows = {row.name: {"srcc": cell(row.name, "srcc"), "plcc": cell(row.name, "plcc")}
            for row in study.rows}
    data["rows"] = rows
    about = {row.name: row.about for row in study.rows}

    if study.ablation:
        doc.heading("Ablation")
        steps, gain = ablation_steps({r: rows[r]["srcc"]["value"] for r in study.ablation},
                                     study.ablation)
        doc.table(Table(["row", "what it is", "SRCC", "PLCC", "SRCC gain over the row above",
                         "share of the total gain"],
                        [[s["row"], about[s["row"]], fmt_cell(rows[s["row"]]["srcc"]),
                          fmt_cell(rows[s["row"]]["plcc"]), fmt_signed(s["delta"]),
                          fmt_signed(s["share"], 1, "%")] for s in steps]))
        doc.text(f"Total gain from {study.ablation[0]} to {study.ablation[-1]}: "
                 + (f"{fmt_signed(gain)} SRCC; the steps' shares of it add to 100%"
                    if gain else "not known yet (a row has no result)")
                 + ". Gains are between the rows' "
                 + ("medians." if kind == "splits" else "means."))
        data["ablation"] = {"steps": steps, "total_gain": gain}

    sizes = {}
    if study.sizes:
        from hyperiqa_jax.complexity import complexity

        doc.heading("Model size and speed")
        for row in study.sizes:
            config = models[row]
            sizes[row] = dict(complexity(config))
            sizes[row]["seconds_per_image"] = scoring_seconds(
                config, timing_batches, crop_size=int(config.img_size)) if timing_batches else {}
        header = ["row", "input", "params", "GFLOPs", "GMACs", "SRCC", "PLCC"]
        header += [f"ms/image at batch {b}" for b in timing_batches]
        if timing_batches:
            header.append(f"images/s at batch {timing_batches[-1]}")
        table = []
        for row in study.sizes:
            s = sizes[row]
            size = int(models[row].img_size)
            line = [row, f"{size}x{size}", fmt_count(s["params"]), fmt(s["flops"] / 1e9, 2),
                    fmt(s["macs"] / 1e9, 2), fmt_cell(rows[row]["srcc"]),
                    fmt_cell(rows[row]["plcc"])]
            line += [fmt(1e3 * s["seconds_per_image"][b], 2) for b in timing_batches]
            if timing_batches:
                line.append(fmt(1 / s["seconds_per_image"][timing_batches[-1]], 1))
            table.append(line)
        doc.table(Table(header, table))
        doc.text("Parameters, and FLOPs of one forward pass of one image at the model's "
                 "input size from XLA's cost analysis (a multiply-add is 2 FLOPs; "
                 "hyperiqa_jax.complexity). Scoring time: the "
                 "jitted scoring forward on uint8 crops, one crop per image, the median of "
                 "repeated calls after a warm-up, on the machine above when the report was "
                 "written (scoring an image with the run's test crops costs that many crops).")
        points = [(row, sizes[row]["flops"] / 1e9, rows[row]["srcc"]["value"],
                   rows[row]["srcc"]["std"]) for row in study.sizes
                  if rows[row]["srcc"]["value"] is not None]
        if points:
            doc.figure("size_vs_srcc.png", figure_size_vs_srcc(points),
                       "Test SRCC against GFLOPs per image" + (
                           " (bars: std over seeds)" if kind == "seeds" and len(study.seeds) > 1
                           else ""))
        data["sizes"] = sizes

    if study.cross_data and study.zero_shot:
        doc.heading("Cross-data-set (zero-shot)")
        labels = list(study.zero_shot)
        table, bars = [], {}
        for row in study.cross_data:
            train_label = next(r["in_domain"] for r in runs if r["row"] == row)
            base = rows[row]["srcc"]["value"]
            line = [row, f"{train_label}: {fmt_cell(rows[row]['srcc'])}"]
            bars[row] = {train_label: base}
            for label in labels:
                srcc, plcc = cell(row, "srcc", label), cell(row, "plcc", label)
                bars[row][label] = srcc["value"]
                rows[row][label] = {"srcc": srcc, "plcc": plcc,
                                    "srcc_vs_train_pct": relative_change(srcc["value"], base)}
                line.append(f"{fmt_cell(srcc)} / {fmt_cell(plcc)} "
                            f"({fmt_signed(relative_change(srcc['value'], base), 1, '%')})")
            table.append(line)
        doc.table(Table(["row", "training set SRCC", *[f"{lab}: SRCC / PLCC (SRCC vs training "
                                                       "set)" for lab in labels]], table))
        doc.text("Zero-shot: trained on the first data set only, scored on every image of "
                 "the others; the percentage is the SRCC's change against the training "
                 "set's test SRCC.")
        order = list(dict.fromkeys(k for b in bars.values() for k in b))
        if any(v is not None for b in bars.values() for v in b.values()):
            doc.figure("cross_data.png", figure_cross_data(list(bars), order, bars),
                       "SRCC on the training set's test split and zero-shot")

    # ---- parameter breakdown
    doc.heading("Parameter breakdown")
    breakdown = {row.name: parameter_breakdown(models[row.name]) for row in study.rows}
    parts = [p for p in PARTS if any(p in b for b in breakdown.values())]
    lines = []
    for part in parts:
        line = [part]
        for row in study.rows:
            n, total_n = breakdown[row.name].get(part, 0), sum(breakdown[row.name].values())
            line.append(f"{fmt_count(n)} ({100 * n / total_n:.1f}%)" if n else "-")
        lines.append(line)
    lines.append(["total", *[fmt_count(sum(breakdown[row.name].values())) for row in study.rows]])
    doc.table(Table(["component", *[row.name for row in study.rows]], lines))
    doc.text("The target network has no parameters of its own: the hyper network's "
             "generators produce its weights for every image. LDA: the local distortion-aware "
             "features of the four stages that make the target network's input.")
    data["parameters"] = breakdown

    # ---- curves
    curves = [(r["row"], r["tag"], r["curve"]["loss"], r["curve"]["test"]) for r in runs
              if r["curve"]["loss"] or r["curve"]["test"]]
    if curves:
        doc.heading("Training curves")
        doc.figure("training_curves.png", figure_training_curves(curves),
                   "Training loss of every run (and test SRCC where runs evaluated while "
                   "training)")

    # ---- attention
    attention = {}
    for row in study.rows:
        per_run = [r["attention"] for r in runs if r["row"] == row.name and r.get("attention")]
        if per_run:
            attention[row.name] = combine_attention(per_run)
    data["attention"] = attention
    if attention:
        doc.heading("Per-stage attention")
        doc.text("The channel gate's weights over the fused channels, averaged over each "
                 "backbone stage's channels (the fused map concatenates the pooled stage maps "
                 "in stage order), for every test image, then averaged per group. The second "
                 "table puts each group's gate against the stage's mean over all test images "
                 "(in %): positive means the group weights that stage more than the average "
                 "image does.")
        panels = []
        for row, a in attention.items():
            runs_text = f"{a['runs']} run" + ("s" if a["runs"] > 1 else "")
            doc.table(Table([f"{row}: mean gate by {a['by']} ({runs_text})", *a["stages"]],
                            [[g, *[fmt(v) for v in vals]] for g, vals in
                             zip(a["groups"], a["mean"])]
                            + [["all test images", *[fmt(v) for v in a["overall"]]]]))
            spread = a["relative_std"]
            doc.table(Table(
                [f"{row}: gate vs stage mean, %", *a["stages"], "highest stage (runs)"],
                [[g, *[fmt_signed(v, 2) + ("" if spread is None else f" +- {spread[i][k]:.2f}")
                       for k, v in enumerate(vals)],
                  ", ".join(f"{s} {n}/{a['runs']}" for s, n in a["top_stage"][g].items())]
                 for i, (g, vals) in enumerate(zip(a["groups"], a["relative"]))]))
            panels.append((row, a["groups"], a["stages"], np.array(a["relative"]),
                           None if spread is None else np.array(spread)))
        doc.figure("stage_attention.png", figure_stage_attention(panels),
                   "Per-stage channel attention: each group's mean gate against the stage's "
                   "mean over all test images (bars: std over runs)")
    return doc, data
