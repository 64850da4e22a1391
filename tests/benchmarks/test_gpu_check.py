"""The GPU check without a GPU: its CPU dry run end to end, and its parts on made-up input."""

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks import gpu_check
from hyperiqa_jax import cli, errors

REPO = Path(__file__).absolute().parents[2]


def read_records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_dry_run_end_to_end(tmp_path):
    """The headline pair (JAX bf16 train with matmul and profile, torch AMP eager) and a
    baseline that is not available, through the real driver, workers and reports."""
    out = tmp_path / "results"
    runs = "jax-train-bf16-b2,torch-eager-train-bf16-b2,baseline-jax-train-bf16-b2"
    env = dict(os.environ, BASELINE_REF="none", PYTHON=sys.executable)
    env.pop("BASELINE_DIR", None)
    # Through the shell wrapper, as on the GPU machine (its wheel install is skipped here:
    # this environment has grain and ml_collections).
    subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry_run", "--out", str(out),
                    "--runs", runs, "--repeats", "2", "--peak_bf16", "1e12", "--baseline_dir", ""],
                   cwd=REPO, env=env, check=True, timeout=600)
    records = read_records(out)
    env_rec = records[0]
    assert env_rec["kind"] == "env" and env_rec["dry_run"] and env_rec["model"] == "micro"
    # What was asked, and --dry_run's defaults for the rest.
    assert (env_rec["batches"], env_rec["headline_batch"]) == ([2], 2)
    assert (env_rec["repeats"], env_rec["steps_per_call"]) == (2, 1)
    assert env_rec["peaks"]["bfloat16"] == 1e12
    command = env_rec["command"].split()
    assert command[:3] == ["python", "-m", "benchmarks.gpu_check"]
    assert sorted(command[3:]) == ["--baseline_dir=", "--dry_run", f"--out={out}",
                                   "--peak_bf16=1000000000000.0", "--repeats=2", f"--runs={runs}"]
    steps = {r["run"]: r for r in records if r["kind"] == "step"}
    assert list(steps) == ["jax-train-bf16-b2", "torch-eager-train-bf16-b2"]  # plan order
    jx, tr = steps["jax-train-bf16-b2"], steps["torch-eager-train-bf16-b2"]
    for r in (jx, tr):
        assert r["batch"] == 2 and r["dtype"] == "bfloat16" and r["mode"] == "train"
        assert len(r["step_s_calls"]) == 2
        assert r["step_s"] == pytest.approx(np.median(r["step_s_calls"]))
        assert r["images_per_s"] == pytest.approx(2 / r["step_s"])
    # The JAX record: the working tree's code, XLA's FLOPs, MFU = FLOPs / time / peak.
    assert Path(jx["module_file"]).is_relative_to(REPO)
    assert jx["steps_done"] == 3  # the warm-up step and two timed calls of one step
    assert 1e9 < jx["flops_per_step"] < 1e10
    assert jx["peak_flops_spec"] == 1e12
    assert jx["mfu_spec"] == pytest.approx(jx["flops_per_step"] / jx["step_s"] / 1e12)
    assert tr["layout"] == "nchw" and tr["framework"] == "torch"

    matmul = {r["matmul_dtype"]: r for r in records if r["kind"] == "matmul"}
    assert set(matmul) == {"bfloat16", "float32"}
    assert matmul["bfloat16"]["n"] == 256
    assert matmul["bfloat16"]["flops_per_s"] == pytest.approx(
        2 * 256**3 / matmul["bfloat16"]["step_s"])
    skip = next(r for r in records if r["kind"] == "skip")
    assert skip["run"] == "baseline-jax-train-bf16-b2" and "BASELINE_REF" in skip["reason"]
    assert not [r for r in records if r["kind"] == "error"]

    # Derived numbers come from those same records.
    summary = json.loads((out / "summary.json").read_text())
    (pair,) = summary["pairs"]
    assert (pair["jax_run"], pair["torch_run"]) == ("jax-train-bf16-b2",
                                                    "torch-eager-train-bf16-b2")
    assert pair["ratio"] == pytest.approx(tr["step_s"] / jx["step_s"])
    row = summary["rows"][0]
    assert row["mfu_matmul"] == pytest.approx(
        jx["flops_per_step"] / jx["step_s"] / matmul["bfloat16"]["flops_per_s"])
    assert row["tflops_per_s"] == pytest.approx(jx["flops_per_step"] / jx["step_s"] / 1e12)

    # The profile: the CPU client's op lines, top ops by time, shares of the summed time.
    profile = next(r for r in records if r["kind"] == "profile")
    top = profile["top_ops"]
    assert profile["source"] == "host" and profile["profile_steps"] == 2
    assert len(top) == min(15, profile["distinct_ops"]) and len(top) >= 5
    times = [op["ms_per_step"] for op in top]
    assert times == sorted(times, reverse=True) and times[0] > 0
    assert sum(op["share"] for op in top) <= 1 + 1e-9
    assert sum(times) <= profile["op_ms_per_step"] * (1 + 1e-9)

    md = (out / "results.md").read_text()
    assert md.index("| jax-train-bf16-b2 |") < md.index("| torch-eager-train-bf16-b2 |")
    assert f"| train | bfloat16 | 2 | {jx['images_per_s']:.1f} | eager " \
           f"| {tr['images_per_s']:.1f} | {pair['ratio']:.2f} |" in md
    assert f"{jx['mfu_spec']:.1%}" in md and "No baseline measured: BASELINE_REF" in md
    profile_md = (out / "profile.md").read_text()
    assert profile_md.count("\n| ") == len(top) + 1  # header + one row per op
    assert sum(bool(op["source"]) for op in top) >= 5  # mapped to the model's code
    assert f"`{top[0]['op'][:57]}" in profile_md and profile_md in md
    assert "done in" in (out / "log.txt").read_text()
    with gzip.open(out / "trace.json.gz") as f:
        assert "traceEvents" in json.load(f)


def test_budget_stops_new_runs(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.call(gpu_check.main, ["--dry_run", "--out", str(out), "--budget", "-1",
                                     "--runs", "jax-eval-*", "--baseline_ref", "none"],
                    define_flags=gpu_check.define_flags) == 0
    records = read_records(out)
    skips = [r for r in records if r["kind"] == "skip"]
    assert [r["run"] for r in skips] == ["jax-eval-bf16-b2", "jax-eval-fp32-b2"]
    assert all("time budget" in r["reason"] for r in skips)
    assert "## Skipped or failed" in (out / "results.md").read_text()


def test_plan_puts_the_headline_pair_first():
    plan = gpu_check.make_plan([64, 128, 256], 128)
    names = [r.name for r in plan]
    assert names[:2] == ["jax-train-bf16-b128", "torch-eager-train-bf16-b128"]
    assert "matmul" in plan[0].extras and "profile" in plan[0].extras
    assert len(set(names)) == len(names)
    assert {"torch-compile-train-bf16-b128", "torch-channels_last-train-bf16-b128",
            "baseline-jax-train-bf16-b128", "jax-train-fp32-b128", "jax-eval-bf16-b256",
            "jax-train-bf16-b64"} <= set(names)


def test_results_never_in_the_repo_root(monkeypatch):
    with pytest.raises(errors.ConfigError, match="must not be the repository root"):
        gpu_check.parse_args(["--out", str(REPO)])
    monkeypatch.delenv("RESULTS_DIR", raising=False)
    monkeypatch.delenv("OUT", raising=False)
    assert Path(gpu_check.parse_args([]).out).parent == REPO / "benchmarks" / "results"
    monkeypatch.setenv("OUT", "/tmp/device-out")
    assert gpu_check.parse_args([]).out == "/tmp/device-out"


def test_settings_from_the_command_line(monkeypatch):
    for name in ("RESULTS_DIR", "OUT", "BATCHES", "RUNS", "BUDGET_S"):
        monkeypatch.delenv(name, raising=False)
    args = gpu_check.parse_args(["--dry_run", "--repeats=4", "--batches", "2 8", "--out=/tmp/x"])
    assert (args.repeats, args.batches, args.headline, args.out) == (4, [2, 8], 2, "/tmp/x")
    # --dry_run's defaults where a flag is not given.
    assert {name: getattr(args, name) for name in gpu_check.DRY_RUN if name not in (
        "repeats", "batches")} == {k: v for k, v in gpu_check.DRY_RUN.items() if k not in (
            "repeats", "batches")}
    assert sorted(args.argv) == ["--batches=2 8", "--dry_run", "--out=/tmp/x", "--repeats=4"]
    monkeypatch.setenv("BATCHES", "64 256")  # environment defaults, read when flags are defined
    monkeypatch.setenv("BUDGET_S", "12")
    args = gpu_check.parse_args(["--runs=jax-*,torch-eager-*"])
    assert (args.batches, args.headline, args.budget) == ([64, 256], 64, 12.0)
    assert args.runs == ["jax-*", "torch-eager-*"] and not args.dry_run
    # The driver's call of a worker process.
    args = gpu_check.parse_args(["--worker", '{"run": "x"}', "--records", "/tmp/r.jsonl"])
    assert (json.loads(args.worker), args.records, args.argv) == ({"run": "x"}, "/tmp/r.jsonl",
                                                                   [])
    with pytest.raises(Exception, match="dry-run"):
        gpu_check.parse_args(["--dry-run"])  # argparse's spelling is gone


def test_help_lists_the_flags_but_not_the_worker_flags():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # absl's --help exits with status 1
    assert "--dry_run" in proc.stdout and "--check_wheels" in proc.stdout
    assert "GPU check: Swin-B E6" in proc.stdout  # the module docstring
    assert "--worker" not in proc.stdout and "--records" not in proc.stdout


def test_baseline_ref_not_available(tmp_path):
    args = gpu_check.parse_args(["--baseline_ref", "0123456789abcdef0123"])
    args.baseline_dir = None
    root, note = gpu_check.prepare_baseline(args, tmp_path)
    assert root is None and "git archive" in note and ".baseline" in note
    args.baseline_ref = "--upload-pack=x"
    assert gpu_check.prepare_baseline(args, tmp_path)[0] is None
    args.baseline_dir = str(tmp_path)  # no hyperiqa_jax/ in it
    assert "holds no hyperiqa_jax" in gpu_check.prepare_baseline(args, tmp_path)[1]


def _trace(path, events, processes, threads):
    meta = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}
            for pid, name in processes.items()]
    meta += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}
             for (pid, tid), name in threads.items()]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def test_trace_summary_on_a_gpu_trace(tmp_path):
    """A GPU trace: the device's "XLA Ops" line when there is one, else its kernel lines
    (named by their hlo_op argument); module lines and the host never count."""
    x = lambda tid, name, dur, **args: {"ph": "X", "pid": 1, "tid": tid, "name": name,
                                        "ts": 0, "dur": dur, "args": args}
    processes = {1: "/device:GPU:0", 2: "/host:CPU"}
    threads = {(1, 10): "Stream #13(Compute)", (1, 11): "XLA Ops", (1, 12): "XLA Modules",
               (2, 20): "python"}
    events = [x(11, "fusion.1", 300), x(11, "fusion.1", 300), x(11, "custom-call.2", 200),
              x(10, "loop_fusion_kernel", 300, hlo_op="fusion.1"),
              x(10, "sm90_gemm", 200, hlo_op="custom-call.2"), x(12, "jit_step", 1000),
              {"ph": "X", "pid": 2, "tid": 20, "name": "fusion.1", "ts": 0, "dur": 5000}]
    path = tmp_path / "t.trace.json.gz"
    _trace(path, events, processes, threads)
    hlo = {"fusion.1": {"shape": "f32[8]", "source": "fwd/dot (swin.py:1)"}}
    s = gpu_check.summarise_trace(path, steps=2, hlo=hlo)
    assert s["source"] == "device" and s["lines"] == ["XLA Ops"]
    assert [op["op"] for op in s["top_ops"]] == ["fusion.1", "custom-call.2"]
    assert s["top_ops"][0]["ms_per_step"] == pytest.approx(0.3)
    assert s["top_ops"][0]["calls_per_step"] == 1
    assert s["top_ops"][0]["share"] == pytest.approx(0.75)
    assert s["top_ops"][0]["source"] == "fwd/dot (swin.py:1)"
    assert s["top_ops"][1]["source"] is None
    assert s["op_ms_per_step"] == pytest.approx(0.4)

    del threads[(1, 11)]  # no "XLA Ops" line: the kernels, by hlo_op
    _trace(path, [e for e in events if e["tid"] != 11], processes, threads)
    s = gpu_check.summarise_trace(path, steps=1)
    assert s["lines"] == ["Stream #13(Compute)"]
    assert [(op["op"], op["kernel"]) for op in s["top_ops"]] == [
        ("fusion.1", "loop_fusion_kernel"), ("custom-call.2", "sm90_gemm")]


def test_hlo_ops():
    """Both ways XLA writes where an op comes from; a fusion borrows its root's metadata."""
    tanh_meta = 'metadata={op_name="jit(step)/jvp(HyperIQA)/tanh" stack_frame_id=1}'
    dot_meta = ('metadata={op_name="jit(step)/transpose(jvp(HyperIQA))/swin/attn/dot_general" '
                'source_file="/x/hyperiqa_jax/models/swin.py" source_line=120}')
    text = "\n".join([
        "HloModule jit_step", "", "FileNames", '1 "/x/hyperiqa_jax/models/swin.py"', "",
        "FileLocations", "1 {file_name_id=1 function_name_id=1 line=77 end_line=77}", "",
        "StackFrames", "1 {file_location_id=1 parent_frame_id=1}", "",
        "%fused_computation.7 (param_0: f32[8]) -> f32[8] {",
        "  %param_0 = f32[8]{0} parameter(0)",
        f"  ROOT %tanh.1 = f32[8]{{0}} tanh(%param_0), {tanh_meta}", "}", "",
        "ENTRY %main (p: f32[8]) -> f32[8] {",
        f"  %fusion.3 = bf16[8,49,49]{{2,1,0}} fusion(%p), kind=kLoop, calls=%fc, {dot_meta}",
        "  ROOT %fusion.4 = f32[8]{0} fusion(%p), kind=kLoop, calls=%fused_computation.7", "}"])
    ops = gpu_check.hlo_ops(text)
    assert ops["fusion.3"] == {"shape": "bf16[8,49,49]",
                               "source": "bwd/swin/attn/dot_general (swin.py:120)"}
    assert ops["tanh.1"]["source"] == ops["fusion.4"]["source"] == "fwd/tanh (swin.py:77)"
    assert ops["param_0"] == {"shape": "f32[8]", "source": None}


def test_derive_pairs_and_before_after():
    def step(run, framework, step_s, code="current", variant="xla", flops=None, dtype="bfloat16"):
        return {"kind": "step", "run": run, "framework": framework, "variant": variant,
                "code": code, "mode": "train", "dtype": dtype, "batch": 128,
                "images_per_s": 128 / step_s, "step_s": step_s, "flops_per_step": flops}
    records = [step("j", "jax", 0.05, flops=4e13), step("t", "torch", 0.1, variant="eager"),
               step("c", "torch", 0.04, variant="compile"),
               step("b", "jax", 0.2, code="baseline", flops=5e13),
               step("f", "jax", 0.1, dtype="float32", flops=4e13),
               {"kind": "matmul", "matmul_dtype": "bfloat16", "flops_per_s": 8e14}]
    d = gpu_check.derive(records)
    assert [(p["torch_variant"], round(p["ratio"], 6)) for p in d["pairs"]] == [
        ("eager", 2.0), ("compile", 0.8)]
    assert d["before_after"][0]["speedup"] == pytest.approx(4.0)
    rows = {r["run"]: r for r in d["rows"]}
    assert rows["j"]["mfu_matmul"] == pytest.approx(4e13 / 0.05 / 8e14)
    assert rows["f"]["mfu_matmul"] is None  # no float32 matmul measured
    assert rows["t"]["tflops_per_s"] is None


def _wheel(folder, name, version, requires):
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\n" +
                   "".join(f"Requires-Dist: {r}\n" for r in requires))
    return path


def test_check_wheels(tmp_path):
    _wheel(tmp_path, "alpha", "1.0", ["numpy", "beta>=2", "gamma; extra == 'docs'",
                                      "delta; python_version < '3.10'", "torch<2"])
    _wheel(tmp_path, "beta", "2.1", ["not_there", "absl-py"])
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nalpha==1.0\nbeta==2.1\nepsilon==3\n")
    problems = gpu_check.check_wheels(tmp_path, listing)
    assert sorted(problems) == sorted([
        "alpha needs torch<2, but torch is 2.11.0",
        "beta needs not_there: neither listed nor on the GPU image",
        "epsilon==3 is listed but has no wheel"])
    _wheel(tmp_path, "beta", "2.2", [])
    assert any("two wheels of beta" in p for p in gpu_check.check_wheels(tmp_path, listing))


def test_wheel_list_covers_the_imports():
    """Every package the benchmark imports that the GPU image lacks is in the wheel list."""
    listed = {gpu_check._norm(line.split("==")[0]) for line in
              (REPO / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    image = set(map(gpu_check._norm, gpu_check.GPU_IMAGE_PACKAGES))
    assert {"grain", "ml-collections"} <= listed and not listed & image
