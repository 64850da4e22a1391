"""GPU benchmark: images/s, MFU and memory of the E6 model's train and eval steps, JAX
against the PyTorch reference, written to a folder as JSON and Markdown.

On a machine with an NVIDIA GPU, in a checkout of this repository:

    pip install -e '.[torch]' 'jax[cuda12]'
    python -m benchmarks.gpu_check --out gpu_results
    python -m benchmarks.gpu_check --out gpu_results --models base --batches 64,128,256
    python -m benchmarks.gpu_check --out new_results --baseline main

One row per model, mode, dtype and batch, timed by benchmarks.throughput's runners
(training's own jitted step and the PyTorch reference's, built in this process and
timed alternately; a row's time is the median per step): images/s of both and
JAX/torch (above 1: JAX is faster); MFU (XLA's FLOP count of the compiled step over
s/step and the card's dense peak for the dtype; float32 matmuls run as TF32);
memory (XLA's memory analysis of the step, the device's peak bytes in use in this
process so far, torch.cuda.max_memory_allocated); with --baseline, the baseline's
JAX images/s and the speed-up over it. --baseline REF (a git ref) first runs this
benchmark's JAX rows with the same settings from a `git worktree` of REF, in a child
process; --baseline FILE reads the gpu_check.json of an earlier run. JAX allocates
GPU memory as it needs it (XLA_PYTHON_CLIENT_PREALLOCATE=false), leaving room for
the PyTorch reference. A row that fails (out of memory, say) records its error.
"""

import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

from benchmarks import throughput
from hyperiqa_jax.errors import ConfigError, UserError

KEY = ("model", "mode", "dtype", "batch")
# What is measured: a baseline run gets the same (JAX only: the speed-up is JAX's).
SETTINGS = ("models", "modes", "dtypes", "batches", "repeats", "steps_per_call", "peak_flops")


def define_flags(flag_values=None):
    """The command's flags (absl), on `flag_values` (default: the global FLAGS)."""
    fv = dict(flag_values=flag_values) if flag_values is not None else {}
    flags.DEFINE_string("out", None, "Folder for gpu_check.json and gpu_check.md.", **fv)
    flags.DEFINE_list("models", ["tiny", "small", "base"], "benchmarks.throughput models "
                      "(the E6 model with a Swin-T/S/B backbone; micro, nano: small ones).", **fv)
    flags.DEFINE_list("modes", ["train", "eval"], "train and/or eval.", **fv)
    flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Compute dtypes.", **fv)
    flags.DEFINE_list("batches", ["32", "128"], "Batch sizes (images per step).", **fv)
    flags.DEFINE_integer("repeats", 5, "Timed calls per framework and row.", **fv)
    flags.DEFINE_integer("steps_per_call", 10, "Steps per timed call (one wait at its end).",
                         **fv)
    flags.DEFINE_bool("torch", True, "Time the PyTorch reference too (--notorch: JAX only).",
                      **fv)
    flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s for MFU (default: the card's dense "
                       "peak for each dtype, if known).", **fv)
    flags.DEFINE_string("baseline", None, "A git ref to measure the same way, or the "
                        "gpu_check.json of an earlier run.", **fv)


def rows_to_measure(args) -> list[tuple]:
    """(model, mode, dtype, batch) of every row, checked."""
    known = {"models": [m for m in throughput.MODELS if m != "demo"],  # demo: JAX only
             "modes": ["train", "eval"], "dtypes": ["bfloat16", "float32"]}
    for name, choices in known.items():
        if not args[name].value or set(args[name].value) - set(choices):
            raise ConfigError(f"--{name} {','.join(args[name].value)}: choose from "
                              f"{', '.join(choices)}")
    try:
        batches = [int(b) for b in args.batches]
    except ValueError:
        raise ConfigError(f"--batches {','.join(args.batches)}: give integers") from None
    if min(batches, default=0) < 1:
        raise ConfigError("--batches: give batch sizes of at least 1")
    return [(m, mode, d, b) for m in args.models for mode in args.modes for d in args.dtypes
            for b in batches]


def measure_row(key, args) -> dict:
    """throughput.measure of one row, or the row with the error that stopped it."""
    model, mode, dtype, batch = key
    try:
        return throughput.measure(model, mode, batch, dtype,
                                  ("jax", "torch") if args.torch else ("jax",),
                                  repeats=args.repeats, steps_per_call=args.steps_per_call,
                                  peak=args.peak_flops or None)
    except Exception as error:  # out of memory, mostly: the other rows still run
        text = (str(error).strip().splitlines() or [""])[0][:300]
        return {**dict(zip(KEY, key)), "error": f"{type(error).__name__}: {text}"}
    finally:  # this row's memory, free for the next; torch's peak counted per row
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def baseline_result(baseline, args) -> dict:
    """The baseline's gpu_check.json: read from a file, or measured in a git worktree."""
    if os.path.isfile(baseline):
        return json.loads(Path(baseline).read_text())
    commit = None if baseline.startswith("-") else throughput.git(
        "rev-parse", "--verify", "--quiet", f"{baseline}^{{commit}}")
    if commit is None:
        raise UserError(f"--baseline {baseline}: neither a file nor a git ref of this checkout")
    with tempfile.TemporaryDirectory(prefix="gpu_check_baseline_") as tmp:
        tree = Path(tmp, "tree")
        if throughput.git("worktree", "add", "--detach", str(tree), commit) is None:
            raise UserError(f"--baseline {baseline}: git worktree add failed")
        try:
            if not (tree / "benchmarks" / "gpu_check.py").is_file():
                raise UserError(f"--baseline {baseline}: no benchmarks/gpu_check.py there; "
                                "give the gpu_check.json of a run of it instead")
            print(f"baseline: {baseline} = {commit[:12]}", flush=True)
            status = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check",
                                     *(args[name].serialize() for name in SETTINGS),
                                     "--notorch", f"--out={tmp}/out"], cwd=tree).returncode
            if status:
                raise UserError(f"--baseline {baseline}: its benchmark failed (status {status}, "
                                "output above)")
            return json.loads(Path(tmp, "out", "gpu_check.json").read_text())
        finally:
            throughput.git("worktree", "remove", "--force", str(tree))


def compare(rows, baseline):
    """Adds the baseline's JAX images/s and the speed-up over it to each row."""
    theirs = {tuple(r[k] for k in KEY): r for r in baseline["rows"] if "error" not in r}
    for row in rows:
        other = theirs.get(tuple(row[k] for k in KEY))
        if other and "error" not in row:
            before = other["frameworks"]["jax"]["images_per_s"]
            row["baseline_jax_images_per_s"] = before
            row["speedup"] = row["frameworks"]["jax"]["images_per_s"] / before


def _f(value, fmt="{:.1f}"):
    return "-" if value is None else fmt.format(value)


def markdown(result) -> str:
    env, base = result["environment"], result["baseline"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    out = [f"# GPU benchmark: {env['device']}", "", f"{env['date']}, commit {env['commit']}"
           f"{' (modified)' if env['tree_dirty'] else ''}, {versions}", "",
           f"`{result['command']}`", ""]
    if base:
        out += [f"Baseline: {base['name']} (commit {base['commit']}, "
                f"{base['environment']['device']}).", ""]
    out += ["| model | mode | dtype | batch | JAX images/s | torch images/s | JAX/torch | MFU "
            "| GFLOP/step | XLA step MiB | JAX peak MiB | torch peak MiB | baseline images/s "
            "| speed-up |", "|" + "---|" * 14]
    for r in result["rows"]:
        head = f"| {r['model']} | {r['mode']} | {r['dtype']} | {r['batch']} |"
        if "error" in r:
            out.append(f"{head} {r['error']} |" + " |" * 9)
            continue
        j, t = r["frameworks"]["jax"], r["frameworks"].get("torch", {})
        step = sum(j.get(k, 0) for k in ("argument_mb", "output_mb", "temp_mb")) or None
        out.append(f"{head} {_f(j['images_per_s'])} | {_f(t.get('images_per_s'))} "
                   f"| {_f(r.get('median_ratio'), '{:.2f}')} | {_f(j['mfu'], '{:.1%}')} "
                   f"| {_f(j['flops_per_step'] and j['flops_per_step'] / 1e9, '{:.4g}')} "
                   f"| {_f(step, '{:.0f}')} | {_f(j.get('peak_mb'), '{:.0f}')} "
                   f"| {_f(t.get('peak_mb'), '{:.0f}')} "
                   f"| {_f(r.get('baseline_jax_images_per_s'))} "
                   f"| {_f(r.get('speedup'), '{:.2f}')} |")
    return "\n".join(out) + "\n"


def main(argv, flag_values=None) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flag_values if flag_values is not None else flags.FLAGS
    if not args.out:
        raise app.UsageError("--out is required: the folder for the results")
    keys = rows_to_measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # The baseline first: its process needs the GPU that this one has not touched yet.
    baseline = baseline_result(args.baseline, args) if args.baseline else None
    result = {"command": throughput.command_line("benchmarks.gpu_check", args),
              "environment": throughput.environment(), "rows": [], "baseline": baseline and {
                  "name": args.baseline, "commit": baseline["environment"]["commit"],
                  "environment": baseline["environment"]}}
    for i, key in enumerate(keys, 1):
        result["rows"].append(row := measure_row(key, args))
        compare([row], baseline or {"rows": []})
        done = row.get("error") or f"JAX {row['frameworks']['jax']['images_per_s']:.1f} images/s"
        print(f"[{i}/{len(keys)}] {' '.join(map(str, key))}: {done}", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
        (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    failed = sum("error" in r for r in result["rows"])
    print(f"rows: {len(keys)}, failed: {failed}; written: {out}/gpu_check.json, gpu_check.md")
    return 0


if __name__ == "__main__":
    from hyperiqa_jax import cli

    cli.run(main, define_flags=define_flags)
