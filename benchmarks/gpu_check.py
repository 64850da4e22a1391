"""GPU check: Swin-B E6 training and scoring, JAX against the PyTorch reference, in one call.

    bash benchmarks/gpu_check.sh                      # on the GPU machine (installs .whl first)
    python -m benchmarks.gpu_check --dry_run          # the whole plan on the CPU, tiny model
    python -m benchmarks.gpu_check --check_wheels .whl   # does the wheel set resolve?

Every measurement runs in a process of its own, one after the other, in the
order of `make_plan` (the headline pair first: JAX bf16 train step at batch 128
against torch AMP eager): device memory statistics start fresh, JAX and torch
never share the GPU, and a run that crashes or hangs loses only itself. A run
is not started once `--budget` seconds have passed, or when its estimated cost
would end it past `--deadline`; a running one is killed at the deadline.

Results (RESULTS_DIR, else $OUT, else benchmarks/results/<UTC time>; a temporary
folder with --dry_run) are rewritten after every run, so a time-out keeps what
was measured:

    results.jsonl   raw records, one JSON object a line (benchmarks/results/README.md)
    summary.json    derived numbers: per-run rows, JAX/torch pairs, before/after
    results.md      the same as Markdown tables, then the profile summary
    profile.md      top ops of the profiled step (jax.profiler trace)
    log.txt         this driver's log, with the end of each failed run's stderr
    trace.json.gz   the profiler trace itself, when it is small enough to bring back

MFU: FLOPs per step from XLA's cost analysis of the compiled step (what it counts:
docs/benchmarks.md, "GPU check (H200)") over the measured time per step, against the
card's dense peak for the dtype (bf16, or TF32 for float32) and against a matmul of
the same dtype measured in the same run.
"""

import dataclasses
import datetime
import fnmatch
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
import zipfile
from importlib import metadata
from pathlib import Path

from absl import app, flags

from hyperiqa_jax import cli, errors

REPO = Path(__file__).absolute().parent.parent
DEFAULT_BASELINE_REF = "ea5da69"  # the last commit before the accelerator-first model work
CACHE_DIR = "/tmp/hyperiqa_jax_xla_cache"  # persistent JAX compilation cache
TOP_OPS = 15
MAX_TRACE_MB = 15  # the device tool brings back files of up to 16 MiB


# ----------------------------------------------------------------------------
# The plan.


@dataclasses.dataclass
class Run:
    framework: str             # "jax" or "torch"
    mode: str                  # "train" or "eval"
    dtype: str                 # "bfloat16" or "float32"
    batch: int
    variant: str = "xla"       # jax: "xla"; torch: "eager", "channels_last" or "compile"
    code: str = "current"      # "current" (this tree) or "baseline" (BASELINE_REF)
    extras: tuple = ()         # "matmul", "profile": done in the same process after timing
    est_s: float = 60.0        # a guess at its cost on an H200 (start, compile, timing)

    @property
    def name(self):
        short = {"bfloat16": "bf16", "float32": "fp32"}[self.dtype]
        variant = "" if self.framework == "jax" else f"-{self.variant}"
        prefix = "baseline-" if self.code == "baseline" else ""
        return f"{prefix}{self.framework}{variant}-{self.mode}-{short}-b{self.batch}"


def make_plan(batches, headline):
    """Runs by priority: the goals' pairs at the headline batch, then the rest.

    est_s are guesses for an H200 (process start, compile, timing); a run is skipped
    when its guess would end it past the deadline.
    """
    h = headline
    plan = [
        Run("jax", "train", "bfloat16", h, extras=("matmul", "profile"), est_s=100),
        Run("torch", "train", "bfloat16", h, "eager", est_s=35),
        Run("jax", "eval", "bfloat16", h, est_s=40),
        Run("torch", "eval", "bfloat16", h, "eager", est_s=25),
        Run("torch", "train", "bfloat16", h, "compile", est_s=120),
        Run("jax", "train", "bfloat16", h, code="baseline", est_s=90),
        Run("torch", "train", "bfloat16", h, "channels_last", est_s=35),
        Run("jax", "train", "float32", h, est_s=90),
        Run("torch", "train", "float32", h, "eager", est_s=35),
    ]
    for b in batches:
        if b != h:
            plan += [Run("jax", "train", "bfloat16", b, est_s=80),
                     Run("torch", "train", "bfloat16", b, "eager", est_s=35)]
    for b in batches:
        if b != h:
            plan += [Run("jax", "eval", "bfloat16", b, est_s=40),
                     Run("torch", "eval", "bfloat16", b, "eager", est_s=25)]
    plan += [Run("jax", "eval", "bfloat16", h, code="baseline", est_s=40),
             Run("jax", "eval", "float32", h, est_s=40),
             Run("torch", "eval", "bfloat16", h, "compile", est_s=90)]
    plan += [Run("jax", "train", "float32", b, est_s=90) for b in batches if b != h]
    return plan


# ----------------------------------------------------------------------------
# The worker: one run in this process (`--worker SPEC`), records appended to a file.


def emit(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def worker(spec: dict, records: str) -> int:
    if spec.get("code_root"):  # baseline code: its hyperiqa_jax and configs come first
        sys.path.insert(0, spec["code_root"])
    import jax

    jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
    from benchmarks import throughput

    base = {k: spec[k] for k in ("run", "framework", "variant", "code", "mode", "dtype",
                                 "batch", "model")}
    runner, ok = None, False
    try:
        config = throughput.model_config(spec["model"], spec["dtype"])
        torch_options = {}
        if spec["framework"] == "torch":
            torch_options = {"layout": "channels_last" if spec["variant"] == "channels_last"
                             else "nchw", "compile": spec["variant"] == "compile",
                             "compile_backend": spec["compile_backend"]}
        runner, warmup_s = throughput.build(spec["framework"], config, spec["mode"],
                                            spec["batch"], **torch_options)
        for _ in range(spec["warmup_steps"]):
            runner.step()
        runner.sync()
        times = [throughput.timed(runner, spec["steps_per_call"]) for _ in range(spec["repeats"])]
        emit(records, {**base, **step_record(runner, spec, times, warmup_s, throughput)})
        ok = True
    except Exception:  # the record says what failed; the matmul below still runs
        emit(records, {**base, "kind": "error", "stage": "step",
                       "error": traceback.format_exc()[-3000:]})
    if "matmul" in spec["extras"]:
        for dtype in ("bfloat16", "float32"):
            try:
                rec = matmul_record(spec["matmul_n"], dtype)
                rec["peak_flops_spec"] = (spec["peak_flops"].get(dtype) or
                                          throughput.peak_flops(rec["device"], dtype))
                emit(records, {**base, **rec})
            except Exception:
                emit(records, {**base, "kind": "error", "stage": f"matmul {dtype}",
                               "error": traceback.format_exc()[-3000:]})
    if "profile" in spec["extras"] and ok:
        try:
            emit(records, {**base, **profile_record(runner, spec)})
        except Exception:
            emit(records, {**base, "kind": "error", "stage": "profile",
                           "error": traceback.format_exc()[-3000:]})
    return 0 if ok else 1


def step_record(runner, spec, times, warmup_s, throughput) -> dict:
    import jax
    import numpy as np

    step_s = float(np.median(times))
    rec = {"kind": "step", "images_per_s": spec["batch"] / step_s, "step_s": step_s,
           "step_s_calls": times, "steps_per_call": spec["steps_per_call"],
           "warmup_s": warmup_s, **runner.memory()}
    rec["peak_memory_mb"] = rec.pop("peak_mb", None)
    if spec["framework"] == "torch":
        torch = runner.torch
        rec["device"] = torch.cuda.get_device_name(0) if runner.device == "cuda" else "cpu"
        rec["layout"] = runner.layout
        return rec
    device = jax.devices()[0]
    compiled, lowered = runner.cost("compiled"), runner.cost("lowered")
    flops = compiled.get("flops")
    peak = spec["peak_flops"].get(spec["dtype"]) or throughput.peak_flops(device.device_kind,
                                                                         spec["dtype"])
    import hyperiqa_jax

    rec.update(
        device=device.device_kind, platform=device.platform,
        flops_per_step=flops, flops_lowered=lowered.get("flops"),
        transcendentals=compiled.get("transcendentals"),
        bytes_accessed=compiled.get("bytes accessed"),
        peak_flops_spec=peak,
        mfu_spec=flops / step_s / peak if flops and peak else None,
        matmul_precision=str(jax.config.jax_default_matmul_precision),
        steps_done=int(runner.state["step"]) if spec["mode"] == "train" else None,
        module_file=hyperiqa_jax.__file__)
    return rec


def matmul_record(n: int, dtype: str) -> dict:
    """Measured matmul rate (random data, default precision: TF32 for float32 on H100/H200)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            out = f(a, b)
        out.block_until_ready()
        times.append((time.perf_counter() - start) / 10)
    t = float(np.median(times))
    return {"kind": "matmul", "matmul_dtype": dtype, "n": n, "step_s": t,
            "flops_per_s": 2 * n**3 / t, "device": jax.devices()[0].device_kind}


def profile_record(runner, spec) -> dict:
    """A jax.profiler trace of `profile_steps` steps, summarised as the top ops by time."""
    import jax

    trace_dir = Path(spec["trace_dir"])
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(spec["profile_steps"]):
            runner.step()
        runner.sync()
    files = sorted(trace_dir.rglob("*.trace.json.gz")) or sorted(trace_dir.rglob("*.json.gz"))
    if not files:
        raise FileNotFoundError(f"jax.profiler wrote no trace JSON under {trace_dir}")
    summary = summarise_trace(files[-1], spec["profile_steps"],
                              hlo_ops(runner.compiled.as_text()))
    return {"kind": "profile", "trace_file": str(files[-1]), **summary}


# ----------------------------------------------------------------------------
# Trace summary (parses the trace-event JSON that jax.profiler writes; needs nothing else).

# Host-side bookkeeping events on the CPU client's threads: not ops.
_NOT_OPS = ("ThreadpoolListener", "ThunkExecutor", "SlinkyThreadPool", "end: ")


def summarise_trace(path, steps: int, hlo: dict | None = None, top: int = TOP_OPS) -> dict:
    """Top ops by summed duration per step.

    GPU/TPU: the device process's "XLA Ops" line if there is one, else its kernel
    (stream) lines; an event's `hlo_op` argument names the op, else its name.
    CPU: the XLA CPU client's worker threads (their durations can overlap, so
    shares are of summed op time, not of wall time). `hlo` (from `hlo_ops`) adds
    each op's shape and source.
    """
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    if devices:
        lines = {k for k in threads if k[0] in devices}
        xla_ops = {k for k in lines if threads[k] == "XLA Ops"}
        skip = ("Module", "Launch", "Step", "Framework", "TensorFlow", "Source")
        lines = xla_ops or {k for k in lines if not any(s in threads[k] for s in skip)}
        source = "device"
    else:
        lines = {k for k, name in threads.items() if name.startswith("tf_XLA")}
        source = "host"
    totals, counts, kernels = {}, {}, {}
    for e in events:
        if e.get("ph") != "X" or (e["pid"], e.get("tid")) not in lines:
            continue
        if e["name"].startswith(_NOT_OPS):
            continue
        op = (e.get("args") or {}).get("hlo_op") or e["name"]
        op = op.split(" = ")[0].lstrip("%")  # some lines name an op by its HLO text
        totals[op] = totals.get(op, 0.0) + float(e.get("dur", 0.0))
        counts[op] = counts.get(op, 0) + 1
        kernels.setdefault(op, e["name"])
    total_us = sum(totals.values())
    ranked = sorted(totals, key=totals.get, reverse=True)[:top]
    top_ops = [{"op": op, "kernel": kernels[op] if kernels[op] != op else None,
                **(hlo or {}).get(op, {"shape": None, "source": None}),
                "calls_per_step": counts[op] / steps,
                "ms_per_step": totals[op] / 1e3 / steps,
                "share": totals[op] / total_us if total_us else None} for op in ranked]
    summary = {"profile_steps": steps, "source": source,
               "op_ms_per_step": total_us / 1e3 / steps, "distinct_ops": len(totals),
               "lines": sorted(threads[k] for k in lines),
               "processes": sorted(processes.values()), "top_ops": top_ops}
    if not totals:  # a layout this parser does not know: say what the trace holds
        summary["all_lines"] = sorted(set(threads.values()))[:40]
    return summary


_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+) = ")


def _describe(meta: str, frames: dict) -> str:
    """'op_name (file:line)' from an HLO metadata={...} body, shortened for a table."""
    op = re.search(r'op_name="([^"]*)"', meta)
    text = op.group(1) if op else ""
    text = re.sub(r"^jit\([^)]*\)/", "", text)  # the jitted function's name
    text = re.sub(r"transpose\(jvp\(\w*\)\)", "bwd", text)
    text = re.sub(r"jvp\(\w*\)", "fwd", text)
    src = re.search(r'source_file="([^"]*)" source_line=(\d+)', meta)
    frame = re.search(r"stack_frame_id=(\d+)", meta)
    where = (Path(src.group(1)).name, src.group(2)) if src else frames.get(
        frame.group(1) if frame else None)
    if where:
        text += f" ({where[0]}:{where[1]})"
    return text.strip()


def _stack_frames(hlo_text: str) -> dict:
    """stack_frame_id -> (file name, line), from the module's FileNames / FileLocations /
    StackFrames tables (newer XLA writes these instead of source_file in each metadata)."""
    tables, section = {"FileNames": {}, "FileLocations": {}, "StackFrames": {}}, None
    for line in hlo_text.splitlines():
        if line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line.strip()
            continue
        row = re.match(r"^(\d+) (.*)$", line)
        if row is None:
            if line.strip():
                section = None
            continue
        if section in tables:
            tables[section][row.group(1)] = row.group(2)
    frames = {}
    for frame, body in tables["StackFrames"].items():
        loc = tables["FileLocations"].get(_field(body, "file_location_id"), "")
        name = tables["FileNames"].get(_field(loc, "file_name_id"), "").strip('"')
        if name:
            frames[frame] = (Path(name).name, _field(loc, "line"))
    return frames


def _field(body, key):
    found = re.search(rf"\b{key}=(\d+)", body)
    return found.group(1) if found else None


def hlo_ops(hlo_text: str) -> dict:
    """HLO instruction name -> {"shape", "source"}: its result type, and what it computes
    (op_name and source line from its metadata; for a fusion without any, the metadata of
    its fused computation's root, else of the first instruction there that has some)."""
    frames = _stack_frames(hlo_text)
    own, calls, shapes, roots, firsts, computation = {}, {}, {}, {}, {}, None
    for line in hlo_text.splitlines():
        instr = _INSTR.match(line)
        if instr is None:
            header = _HEADER.match(line)
            if header:
                computation = header.group(1)
            continue
        root, name = instr.groups()
        shape = re.match(r"\s*(\S+)", line[instr.end():]).group(1)
        shapes[name] = re.sub(r"\{[^}]*\}", "", shape)  # without the layout
        meta = re.search(r"metadata=\{([^}]*)\}", line)
        if meta:
            own[name] = _describe(meta.group(1), frames)
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if called:
            calls[name] = called.group(1)
        if root:
            roots[computation] = name
        if meta:
            firsts.setdefault(computation, name)
    out = {}
    for name in shapes:
        text, seen = own.get(name), name
        for _ in range(4):  # nested fusions: follow the calls until one says something
            if text or seen not in calls:
                break
            callee = calls[seen]
            seen = roots.get(callee) if roots.get(callee) in own else firsts.get(callee)
            text = own.get(seen)
        out[name] = {"shape": shapes[name], "source": text}
    return out


# ----------------------------------------------------------------------------
# Derived numbers and reports.


def derive(records: list[dict]) -> dict:
    """Rows per run (with MFU against the measured matmul), JAX/torch pairs, before/after."""
    steps = [r for r in records if r.get("kind") == "step"]
    matmul = {r["matmul_dtype"]: r["flops_per_s"] for r in records if r.get("kind") == "matmul"}
    rows = []
    for r in steps:
        row = {k: r.get(k) for k in ("run", "framework", "variant", "code", "mode", "dtype",
                                     "batch", "images_per_s", "step_s", "flops_per_step",
                                     "mfu_spec", "peak_memory_mb", "warmup_s")}
        flops = r.get("flops_per_step")
        row["tflops_per_s"] = flops / r["step_s"] / 1e12 if flops else None
        rate = matmul.get(r["dtype"])
        row["mfu_matmul"] = flops / r["step_s"] / rate if flops and rate else None
        rows.append(row)
    key = lambda r: (r["mode"], r["dtype"], r["batch"])
    jax_current = [r for r in steps if r["framework"] == "jax" and r["code"] == "current"]
    pairs = [{"mode": j["mode"], "dtype": j["dtype"], "batch": j["batch"], "jax_run": j["run"],
              "torch_run": t["run"], "torch_variant": t["variant"],
              "jax_images_per_s": j["images_per_s"], "torch_images_per_s": t["images_per_s"],
              "jax_step_s": j["step_s"], "torch_step_s": t["step_s"],
              "ratio": t["step_s"] / j["step_s"]}
             for j in jax_current for t in steps if t["framework"] == "torch" and key(t) == key(j)]
    before_after = [{"mode": c["mode"], "dtype": c["dtype"], "batch": c["batch"],
                     "baseline_images_per_s": b["images_per_s"],
                     "current_images_per_s": c["images_per_s"],
                     "speedup": b["step_s"] / c["step_s"]}
                    for c in jax_current for b in steps
                    if b["framework"] == "jax" and b["code"] == "baseline" and key(b) == key(c)]
    return {"rows": rows, "pairs": pairs, "before_after": before_after,
            "matmul_flops_per_s": matmul}


def _f(value, fmt="{:.1f}"):
    return "-" if value is None else fmt.format(value)


def markdown(records: list[dict], derived: dict, header: dict) -> str:
    env = next((r for r in records if r.get("kind") == "env"), {})
    devices = sorted({r["device"] for r in records if r.get("kind") == "step"})
    dry = "DRY RUN on the CPU, " if env.get("dry_run") else ""
    out = [f"# GPU check: {', '.join(devices) or 'no run finished'}", "",
           f"{header.get('started', '')}, {dry}model {env.get('model')}, "
           f"command `{env.get('command')}`", "",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items()),
           "", f"GPU: {env.get('nvidia_smi') or 'none'}", "",
           "## Runs (plan order)", "",
           "| run | images/s | ms/step | GFLOP/step (XLA) | TFLOP/s | MFU vs spec "
           "| MFU vs matmul | peak MiB | warm-up s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in derived["rows"]:
        out.append(f"| {r['run']} | {_f(r['images_per_s'])} | {_f(r['step_s'] * 1e3, '{:.2f}')} "
                   f"| {_f(r['flops_per_step'] and r['flops_per_step'] / 1e9)} "
                   f"| {_f(r['tflops_per_s'], '{:.3g}')} | {_f(r['mfu_spec'], '{:.1%}')} "
                   f"| {_f(r['mfu_matmul'], '{:.1%}')} | {_f(r['peak_memory_mb'], '{:.0f}')} "
                   f"| {_f(r['warmup_s'])} |")
    out += ["", "## JAX / torch (same mode, dtype and batch; ratio = torch s/step over JAX s/step)",
            "", "| mode | dtype | batch | JAX images/s | torch variant | torch images/s "
            "| JAX/torch |", "|---|---|---|---|---|---|---|"]
    for p in derived["pairs"]:
        out.append(f"| {p['mode']} | {p['dtype']} | {p['batch']} | {_f(p['jax_images_per_s'])} "
                   f"| {p['torch_variant']} | {_f(p['torch_images_per_s'])} "
                   f"| {_f(p['ratio'], '{:.2f}')} |")
    out += ["", "## Before / after (JAX, baseline code against this tree)", ""]
    if derived["before_after"]:
        out += ["| mode | dtype | batch | baseline images/s | current images/s | speed-up |",
                "|---|---|---|---|---|---|"]
        out += [f"| {b['mode']} | {b['dtype']} | {b['batch']} | {_f(b['baseline_images_per_s'])} "
                f"| {_f(b['current_images_per_s'])} | {_f(b['speedup'], '{:.2f}')} |"
                for b in derived["before_after"]]
    else:
        out.append(f"No baseline measured: {env.get('baseline') or 'not reached'}.")
    out += ["", "## Matmul (JAX, random n x n, default precision)", "",
            "| dtype | n | TFLOP/s | of spec peak |", "|---|---|---|---|"]
    for r in records:
        if r.get("kind") == "matmul":
            spec = r.get("peak_flops_spec")
            out.append(f"| {r['matmul_dtype']} | {r['n']} "
                       f"| {_f(r['flops_per_s'] / 1e12, '{:.3g}')} "
                       f"| {_f(spec and r['flops_per_s'] / spec, '{:.1%}')} |")
    odd = [r for r in records if r.get("kind") == "step" and r.get("flops_per_step")
           and r.get("flops_lowered") and not 0.8 < r["flops_per_step"] / r["flops_lowered"] < 1.25]
    if odd:  # e.g. library calls the compiled module's cost analysis does not count
        out += ["", "Note: XLA's FLOP count of the compiled step differs from that of the "
                "unoptimised HLO by more than 20% in " + ", ".join(
                    f"{r['run']} ({r['flops_per_step'] / r['flops_lowered']:.2f}x)" for r in odd)
                + "; the MFU columns use the compiled count."]
    problems = [r for r in records if r.get("kind") in ("skip", "error")]
    if problems:
        out += ["", "## Skipped or failed", ""]
        for r in problems:
            why = r.get("reason") or (r.get("error") or "").strip().splitlines()[-1:]
            out.append(f"- {r['run']} ({r['kind']}{', ' + r['stage'] if r.get('stage') else ''}): "
                       f"{why if isinstance(why, str) else ' '.join(why)}")
    return "\n".join(out) + "\n"


def profile_markdown(p: dict, step_s: float | None = None) -> str:
    timed = f" (the timed step: {step_s * 1e3:.2f} ms)" if step_s else ""
    out = [f"## Profile: {p['run']}, top {len(p['top_ops'])} ops", "",
           f"{p['profile_steps']} steps traced; {p['source']} lines {', '.join(p['lines'])}; "
           f"summed op time {p['op_ms_per_step']:.2f} ms/step{timed} over "
           f"{p['distinct_ops']} ops.", "",
           "| # | op | ms/step | share | calls/step | shape | source (or kernel) |",
           "|---|---|---|---|---|---|---|"]
    for i, op in enumerate(p["top_ops"], 1):
        name = op["op"] if len(op["op"]) <= 60 else op["op"][:57] + "..."
        src = op["source"] or op["kernel"] or ""
        src = src if len(src) <= 100 else src[:40] + " ... " + src[-55:]
        shape = (op.get("shape") or "")[:40]
        out.append(f"| {i} | `{name}` | {op['ms_per_step']:.3f} | {_f(op['share'], '{:.1%}')} "
                   f"| {op['calls_per_step']:g} | {shape} | {src} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------
# The driver.


class Driver:
    def __init__(self, args):
        self.args = args
        self.start = time.monotonic()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.records_path = self.out / "results.jsonl"
        self.records_path.write_text("")
        (self.out / "log.txt").write_text("")
        self.records = []
        self.header = {"started": datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%d %H:%M UTC")}

    def elapsed(self):
        return time.monotonic() - self.start

    def log(self, message):
        line = f"[{self.elapsed():6.1f} s] {message}"
        print(line, flush=True)
        with open(self.out / "log.txt", "a") as f:
            f.write(line + "\n")

    def add(self, record):
        self.records.append(record)
        emit(self.records_path, record)

    def report(self):
        """Rewrites summary.json, results.md and profile.md; returns (tables, profile)."""
        derived = derive(self.records)
        (self.out / "summary.json").write_text(json.dumps(derived, indent=1))
        tables = markdown(self.records, derived, self.header)
        profile = next((r for r in self.records if r.get("kind") == "profile"), None)
        if profile:
            step = next((r for r in self.records if r.get("kind") == "step"
                         and r["run"] == profile["run"]), {})
            profile = profile_markdown(profile, step.get("step_s"))
        else:
            profile = ""
        (self.out / "results.md").write_text(tables + ("\n" + profile if profile else ""))
        if profile:
            (self.out / "profile.md").write_text(profile)
        return tables, profile

    def env(self, **extra):
        """Subprocess environment: JAX not holding the GPU, the CPU only when dry."""
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1",
                   TF_CPP_MIN_LOG_LEVEL="2")
        if self.args.dry_run:
            # Fast XLA:CPU compiles: the dry run checks the plumbing, not the speed.
            env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
                       XLA_FLAGS=(env.get("XLA_FLAGS", "") +
                                  " --xla_backend_optimization_level=0").strip())
        env.update(extra)
        return env

    def run_one(self, run: Run, code_root):
        a = self.args
        spec = {"run": run.name, "framework": run.framework, "variant": run.variant,
                "code": run.code, "mode": run.mode, "dtype": run.dtype, "batch": run.batch,
                "model": a.model, "extras": list(run.extras), "code_root": code_root,
                "repeats": a.repeats, "steps_per_call": a.steps_per_call,
                "warmup_steps": a.warmup_steps, "matmul_n": a.matmul_n,
                "profile_steps": a.profile_steps, "trace_dir": str(self.work / "trace"),
                "cache_dir": a.cache_dir, "compile_backend": a.torch_compile_backend,
                "peak_flops": {"bfloat16": a.peak_bf16, "float32": a.peak_fp32}}
        records = self.work / f"{run.name}.jsonl"
        stderr_path = self.work / f"{run.name}.log"
        timeout = max(1.0, a.deadline - self.elapsed())
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--worker", json.dumps(spec),
               "--records", str(records)]
        t0 = time.monotonic()
        with open(stderr_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:  # the whole group: torch.compile has workers
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = "killed at the deadline"
        wall = time.monotonic() - t0
        got = [json.loads(line) for line in records.read_text().splitlines()] \
            if records.exists() else []
        for rec in got:
            rec["wall_s"] = wall
            self.add(rec)
        step = next((r for r in got if r["kind"] == "step"), None)
        if step:
            mfu = f", MFU {step['mfu_spec']:.1%}" if step.get("mfu_spec") else ""
            self.log(f"{run.name}: {step['images_per_s']:.1f} images/s, "
                     f"{step['step_s'] * 1e3:.2f} ms/step{mfu} ({wall:.0f} s)")
        if rc != 0 or not step:
            tail = stderr_path.read_text()[-2500:]
            self.log(f"{run.name}: FAILED ({rc}) after {wall:.0f} s; end of its output:\n{tail}")
            if not any(r["kind"] == "error" for r in got):
                self.add({"kind": "error", "run": run.name, "stage": "process",
                          "error": f"exit {rc}\n{tail}"})
        for rec in got:
            if rec["kind"] == "error":
                self.log(f"{run.name}: error in {rec['stage']}:\n{rec['error'][-1500:]}")
            if rec["kind"] == "profile" and Path(rec["trace_file"]).exists():
                size = Path(rec["trace_file"]).stat().st_size / 2**20
                if size <= MAX_TRACE_MB:
                    shutil.copy(rec["trace_file"], self.out / "trace.json.gz")
        self.report()

    def main(self):
        a = self.args
        self.log(f"results in {self.out}; work files in {self.work}")
        baseline_root, baseline_note = prepare_baseline(a, self.work)
        self.log(f"baseline: {baseline_note}")
        self.add(env_record(a, baseline_note, baseline_root))
        plan = [r for r in make_plan(a.batches, a.headline)
                if not a.runs or any(fnmatch.fnmatch(r.name, p) for p in a.runs)]
        tables = profile = ""
        try:
            for run in plan:
                if run.code == "baseline" and baseline_root is None:
                    self.add({"kind": "skip", "run": run.name, "reason": baseline_note})
                    continue
                est = 0 if a.dry_run else run.est_s
                if self.elapsed() > a.budget or self.elapsed() + est > a.deadline:
                    self.add({"kind": "skip", "run": run.name,
                              "reason": f"time budget ({self.elapsed():.0f} s gone, "
                                        f"~{est:.0f} s needed)"})
                    self.log(f"{run.name}: skipped (time budget)")
                    continue
                self.log(f"{run.name}: starting")
                self.run_one(run, str(baseline_root) if run.code == "baseline" else None)
        finally:
            tables, profile = self.report()
            cleanup_baseline(baseline_root, self.work)
            if not a.keep_work:
                shutil.rmtree(self.work, ignore_errors=True)
        self.log(f"done in {self.elapsed():.0f} s")
        print(profile + "\n" + tables)  # the main tables last: the end of the output is kept
        return 0


def git(*args):
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_hash(root) -> str:
    """sha256 of the model code (hyperiqa_jax/ and configs/ *.py), to tell two trees apart."""
    digest = hashlib.sha256()
    for path in sorted(Path(root).glob("hyperiqa_jax/**/*.py")) + \
            sorted(Path(root).glob("configs/*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


CARRY_HINT = ("to measure it anyway, carry a copy: git archive {ref} | tar -x -C .baseline "
              "(after mkdir .baseline and echo /.baseline/ >> .git/info/exclude), "
              "then name .baseline in the device tool's carry list")


def prepare_baseline(args, work):
    """(folder holding the baseline's hyperiqa_jax and configs, or None; a note saying which)."""
    if args.baseline_dir:
        root = Path(args.baseline_dir).absolute()
        if not (root / "hyperiqa_jax").is_dir():
            return None, f"BASELINE_DIR {root} holds no hyperiqa_jax/"
        return root, f"copy in {root} (code {code_hash(root)})"
    ref = args.baseline_ref
    if not ref or ref.lower() == "none":
        return None, "BASELINE_REF is empty"
    if ref.startswith("-") or not re.fullmatch(r"[\w./^~@{}-]+", ref):
        return None, f"BASELINE_REF {ref!r} is not a git revision"
    commit = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if commit is None:
        return None, (f"{ref} is not in this checkout's git history (the device tool sends the "
                      f"working tree without .git); {CARRY_HINT.format(ref=ref)}")
    root = work / "baseline"
    if git("worktree", "add", "--detach", str(root), commit) is None:
        return None, f"git worktree add {ref} failed"
    if code_hash(root) == code_hash(REPO):
        cleanup_baseline(root, work)
        return None, f"{ref} has the same model code as this tree"
    return root, f"{ref} = {commit[:12]} in a git worktree (code {code_hash(root)})"


def cleanup_baseline(root, work):
    if root is not None and Path(root) == work / "baseline":
        git("worktree", "remove", "--force", str(root))


def env_record(args, baseline_note, baseline_root) -> dict:
    versions = {}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
                 "orbax-checkpoint", "grain", "ml-collections", "numpy", "torch", "timm"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    versions["python"] = sys.version.split()[0]
    smi = None
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                               "clocks.max.sm", "--format=csv,noheader"],
                              capture_output=True, text=True)
        smi = done.stdout.strip() or None
    dirty = git("status", "--porcelain", "--", "hyperiqa_jax", "configs", "benchmarks")
    return {"kind": "env", "run": "env", "dry_run": args.dry_run, "model": args.model,
            "batches": args.batches, "headline_batch": args.headline,
            "command": " ".join(["python -m benchmarks.gpu_check", *args.argv]),
            "versions": versions, "nvidia_smi": smi,
            "commit": git("rev-parse", "HEAD"), "tree_dirty": bool(dirty) if dirty is not None
            else None, "code_hash": code_hash(REPO),
            "baseline": baseline_note, "baseline_code_hash": baseline_root and code_hash(
                baseline_root), "peaks": {"bfloat16": args.peak_bf16, "float32": args.peak_fp32},
            "budget_s": args.budget, "deadline_s": args.deadline, "repeats": args.repeats,
            "steps_per_call": args.steps_per_call}


# ----------------------------------------------------------------------------
# The wheel set for the GPU machine.

# Python packages of the GPU machine's image (the device tool's nvidia-h200 kind, as read
# 2026-11-17); versions where they were read (2026-11).
GPU_IMAGE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch
grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp
""".split()
GPU_IMAGE_VERSIONS = {"jax": "0.11.2", "jaxlib": "0.11.2", "numpy": "2.5.2", "torch": "2.11.0",
                      "torchvision": "0.26.0", "safetensors": "0.8.0", "triton": "3.6.0"}
# The machine: CPython 3.12 on x86-64 Linux.
GPU_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version


def check_wheels(wheel_dir, list_file) -> list[str]:
    """Problems with the wheel set: each listed name==version once, tags for CPython 3.12
    x86-64 Linux, and every Requires-Dist (with the extras asked for) either a listed wheel
    or a package of the GPU image, at a version that fits where the version is known."""
    Requirement, Version = _packaging()
    wanted = {}
    for line in Path(list_file).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            wanted[_norm(name)] = version.strip()
    problems, wheels = [], {}
    for path in sorted(Path(wheel_dir).glob("*.whl")):
        name, version, *_, py, abi, plat = path.name[:-4].split("-")
        key = _norm(name)
        if key in wheels:
            problems.append(f"two wheels of {key}: {wheels[key].name} and {path.name}")
        wheels[key] = path
        if wanted.get(key) != version:
            problems.append(f"{path.name}: not {key}=={wanted.get(key)} as listed")
        if not (set(py.split(".")) & {"py3", "cp312"} and set(abi.split(".")) & {"none", "abi3",
                                                                                   "cp312"}
                and (plat == "any" or plat.endswith("x86_64"))):
            problems.append(f"{path.name}: not installable on CPython 3.12 x86-64 Linux")
    problems += [f"{k}=={v} is listed but has no wheel" for k, v in wanted.items()
                 if k not in wheels]
    installed = set(map(_norm, GPU_IMAGE_PACKAGES))
    versions = {**{_norm(k): v for k, v in GPU_IMAGE_VERSIONS.items()}, **wanted}

    def requirements(name, extras):
        """Requires-Dist of `name` for `extras`: from its wheel, else this machine's copy."""
        if name in wheels:
            with zipfile.ZipFile(wheels[name]) as z:
                meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
                lines = z.read(meta).decode().splitlines()
            reqs = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Dist:")]
        else:
            try:
                reqs = metadata.distribution(name).requires or []
            except metadata.PackageNotFoundError:
                return None
        out = []
        for text in reqs:
            req = Requirement(text)
            for extra in ("", *extras):
                if req.marker is None or req.marker.evaluate({**GPU_MARKERS, "extra": extra}):
                    out.append(req)
                    break
        return out

    todo, seen = [(k, ()) for k in wheels], set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        reqs = requirements(name, extras)
        if reqs is None:  # a preinstalled package's extras, not checkable here
            continue
        for req in reqs:
            dep = _norm(req.name)
            if dep not in wheels and dep not in installed:
                problems.append(f"{name} needs {req}: neither listed nor on the GPU image")
                continue
            known = versions.get(dep)
            if known and req.specifier and Version(known) not in req.specifier:
                problems.append(f"{name} needs {req}, but {dep} is {known}")
            if req.extras or dep in wheels:
                todo.append((dep, tuple(sorted(req.extras))))
    return problems


def check_wheels_main(wheel_dir, list_file) -> int:
    sizes = {p.name: p.stat().st_size for p in Path(wheel_dir).glob("*.whl")}
    for name, size in sorted(sizes.items()):
        print(f"  {size / 2**20:7.2f} MiB  {name}")
    total = sum(sizes.values()) / 2**20
    print(f"  {total:7.2f} MiB  in all ({len(sizes)} wheels)")
    problems = check_wheels(wheel_dir, list_file)
    if total > 32:  # they travel with the working tree, 64 MiB in all
        problems.append(f"{total:.1f} MiB of wheels: keep well under the 64 MiB limit")
    for p in problems:
        print(f"PROBLEM: {p}")
    print("wheel set resolves" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


# ----------------------------------------------------------------------------
# Command line.


def define_flags(flag_values=flags.FLAGS):
    """The command's flags (defined when it runs, see hyperiqa_jax/cli.py). Defaults come
    from the environment variables named in their help, as gpu_check.sh documents."""
    env = os.environ.get
    f = dict(flag_values=flag_values)
    flags.DEFINE_bool("dry_run", False, "The whole plan on the CPU with the micro model, "
                      "batch 2, few steps: checks the plumbing, not the speed.", **f)
    flags.DEFINE_string("out", env("RESULTS_DIR") or env("OUT"), "Results folder (default: "
                        "$RESULTS_DIR, $OUT, else benchmarks/results/<UTC time>; a temporary "
                        "one with --dry_run).", **f)
    flags.DEFINE_float("budget", float(env("BUDGET_S", 270)), "Seconds after which no new run "
                       "starts ($BUDGET_S).", **f)
    flags.DEFINE_float("deadline", float(env("DEADLINE_S", 340)), "Seconds at which a running "
                       "run is killed; a run whose estimated cost would pass it is not started "
                       "($DEADLINE_S).", **f)
    flags.DEFINE_string("batches", env("BATCHES", "64,128,256"), "Batch sizes, comma- or "
                        "space-separated ($BATCHES).", **f)
    flags.DEFINE_integer("headline", 0, "Batch of the headline runs (default: 128 if listed "
                         "in --batches, else the first).", **f)
    flags.DEFINE_string("model", "base", "benchmarks.throughput model (base: Swin-B E6).", **f)
    flags.DEFINE_string("runs", env("RUNS", ""), "Only the runs whose names match these "
                        "comma-separated globs, e.g. 'jax-train-*' ($RUNS).", **f)
    flags.DEFINE_string("baseline_ref", env("BASELINE_REF", DEFAULT_BASELINE_REF), "Git "
                        "revision measured as the baseline; 'none' skips it ($BASELINE_REF).",
                        **f)
    flags.DEFINE_string("baseline_dir", env("BASELINE_DIR") or (
        str(REPO / ".baseline") if (REPO / ".baseline" / "hyperiqa_jax").is_dir() else None),
        "A copy of the baseline tree to measure instead of --baseline_ref ($BASELINE_DIR; "
        "default .baseline/ when it exists).", **f)
    flags.DEFINE_integer("repeats", 5, "Timed calls per run.", **f)
    flags.DEFINE_integer("steps_per_call", 10, "Steps per timed call.", **f)
    flags.DEFINE_integer("warmup_steps", 3, "Untimed steps after the first.", **f)
    flags.DEFINE_integer("matmul_n", 8192, "Size of the measured square matmul.", **f)
    flags.DEFINE_integer("profile_steps", 3, "Steps in the profiler trace.", **f)
    flags.DEFINE_float("peak_bf16", None, "bf16 peak FLOP/s for MFU (default: the card's, "
                       "from benchmarks.throughput).", **f)
    flags.DEFINE_float("peak_fp32", None, "float32 (TF32) peak FLOP/s for MFU (default: the "
                       "card's).", **f)
    flags.DEFINE_string("torch_compile_backend", "inductor", "torch.compile backend of the "
                        "torch-compile runs.", **f)
    flags.DEFINE_string("cache_dir", env("JAX_CACHE_DIR", CACHE_DIR), "Persistent JAX "
                        "compilation cache ($JAX_CACHE_DIR).", **f)
    flags.DEFINE_bool("keep_work", False, "Keep the temporary work folder.", **f)
    flags.DEFINE_string("check_wheels", None, "Instead of measuring: check the wheel set in "
                        "this folder against --wheel_list.", **f)
    flags.DEFINE_string("wheel_list", str(REPO / "benchmarks" / "gpu_wheels.txt"), "Wheel list "
                        "for --check_wheels.", **f)
    # The driver's own call of a worker process; listed by --helpfull only.
    for name, text in WORKER_FLAGS.items():
        flag = flags.Flag(flags.ArgumentParser(), flags.ArgumentSerializer(), name, None, text)
        flags.DEFINE_flag(flag, flag_values, module_name="benchmarks.gpu_check (worker)")


WORKER_FLAGS = {"worker": "Internal: run the measurement of this JSON spec in this process.",
                "records": "Internal: the file the worker appends its JSON records to."}
# What --dry_run changes, where the flag is not given: the plumbing in a minute or two.
DRY_RUN = {"model": "micro", "batches": "2", "repeats": 2, "steps_per_call": 1,
           "warmup_steps": 0, "matmul_n": 256, "profile_steps": 2, "budget": 600,
           "deadline": 900, "torch_compile_backend": "eager"}


def settings(flag_values):
    """The run's settings (a namespace) from parsed flags: --dry_run's defaults, the batch
    list, the headline batch, the run globs and the results folder filled in."""
    own = flags.FlagValues()
    define_flags(own)
    names = list(own)  # this command's flags (a FlagValues of `run` holds absl's too)
    args = types.SimpleNamespace(**{name: flag_values[name].value for name in names})
    # The command as given (for the env record), without the worker's internal flags.
    args.argv = [flag_values[name].serialize() for name in names
                 if flag_values[name].present and name not in WORKER_FLAGS]
    if args.dry_run:
        for name, value in DRY_RUN.items():
            if not flag_values[name].present:
                setattr(args, name, value)
        if not flag_values["out"].present and not (os.environ.get("RESULTS_DIR") or
                                                   os.environ.get("OUT")):
            args.out = tempfile.mkdtemp(prefix="gpu_check_dry_")
    args.batches = [int(b) for b in re.split(r"[,\s]+", str(args.batches).strip()) if b]
    if not args.batches:
        raise errors.ConfigError("--batches lists no batch size")
    args.headline = args.headline or (128 if 128 in args.batches else args.batches[0])
    args.runs = [r for r in args.runs.split(",") if r]
    if not args.out:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d_%H%M")
        args.out = str(REPO / "benchmarks" / "results" / stamp)
    if Path(args.out).absolute() == REPO:
        raise errors.ConfigError(f"--out {args.out}: the results folder must not be the "
                              "repository root")
    return args


def parse_args(argv):
    """settings() of a command line (the arguments after the program name)."""
    flag_values, _ = cli.parse(define_flags, argv)
    return settings(flag_values)


def main(argv, flag_values=flags.FLAGS) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = settings(flag_values)
    if args.worker:
        return worker(json.loads(args.worker), args.records)
    if args.check_wheels:
        return check_wheels_main(args.check_wheels, args.wheel_list)
    return Driver(args).main()


if __name__ == "__main__":
    cli.run(main, define_flags=define_flags)
