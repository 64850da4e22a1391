"""study: a small study planned, run and reported end to end, and the numbers it reports."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from hyperiqa_jax import cli, study
from hyperiqa_jax import study_report as sr
from tests import train_utils

REPO = Path(__file__).resolve().parents[1]
CACHE = train_utils.enable_compilation_cache()


def call(*argv):
    return cli.call(study.main, argv, define_flags=study.define_flags)


# ---------------------------------------------------------------------------- aggregation


def test_median_over_an_odd_and_an_even_number_of_splits():
    assert sr.summarize([0.9, 0.7, 0.8], "splits")["value"] == pytest.approx(0.8, abs=1e-15)
    even = sr.summarize([0.9, 0.6, 0.8, 0.7], "splits")  # 0.6 0.7 | 0.8 0.9
    assert even["value"] == pytest.approx(0.75, abs=1e-15)
    assert (even["n"], even["std"], even["n_missing"]) == (4, None, 0)


def test_mean_and_sample_std_over_seeds_and_missing_runs():
    cell = sr.summarize([0.8, 0.7, 0.9], "seeds")
    # mean 0.8; sample variance (0 + 0.01 + 0.01) / (3 - 1) = 0.01
    assert cell["value"] == pytest.approx(0.8, abs=1e-15)
    assert cell["std"] == pytest.approx(0.1, abs=1e-15)
    assert sr.summarize([0.5], "seeds")["std"] is None
    partial = sr.summarize([0.8, None, float("nan")], "seeds")
    assert (partial["value"], partial["n"], partial["n_missing"]) == (0.8, 1, 2)
    assert sr.fmt_cell(partial) == "0.8000 (2 missing)"
    assert sr.summarize([None], "splits")["value"] is None


def test_ablation_deltas_and_shares_of_the_originals_numbers():
    # C0 0.907 -> A2 0.9338 -> A1 0.9353 -> E6 0.9378: gains 0.0268, 0.0015, 0.0025 of 0.0308.
    values = {"C0": 0.907, "A2": 0.9338, "A1": 0.9353, "E6": 0.9378}
    steps, total = sr.ablation_steps(values, list(values))
    assert total == pytest.approx(0.0308, abs=1e-12)
    assert steps[0] == {"row": "C0", "baseline": None, "value": 0.907, "delta": None,
                        "share": None}
    assert [s["baseline"] for s in steps[1:]] == ["C0", "A2", "A1"]
    assert [s["delta"] for s in steps[1:]] == pytest.approx([0.0268, 0.0015, 0.0025], abs=1e-12)
    shares = [s["share"] for s in steps[1:]]
    assert shares == pytest.approx([100 * 268 / 308, 100 * 15 / 308, 100 * 25 / 308], rel=1e-9)
    assert [round(s) for s in shares] == [87, 5, 8]  # as the original reports them
    assert sum(shares) == pytest.approx(100.0, rel=1e-12)


def test_ablation_with_a_missing_row():
    steps, total = sr.ablation_steps({"C0": 0.9, "A2": None, "E6": 0.95}, ["C0", "A2", "E6"])
    assert total == pytest.approx(0.05, abs=1e-15)
    assert [s["delta"] for s in steps] == [None, None, None]
    steps, total = sr.ablation_steps({"C0": None, "E6": 0.95}, ["C0", "E6"])
    assert total is None and steps[1]["share"] is None


def test_relative_change():
    assert sr.relative_change(0.75, 0.9) == pytest.approx(-100 / 6, rel=1e-12)
    assert sr.relative_change(None, 0.9) is None and sr.relative_change(0.5, None) is None


# ---------------------------------------------------------------------------- attention


def test_stage_attention_of_a_hand_built_gate_vector():
    channels = (2, 3, 1, 4)
    gates = np.array([[0.1, 0.3, 0.2, 0.4, 0.6, 0.9, 0.5, 0.5, 0.7, 0.3],
                      [1.0, 1.0, 0.0, 0.0, 0.0, 0.25, 1.0, 0.0, 1.0, 0.0]])
    np.testing.assert_allclose(sr.stage_attention(gates, channels),
                               [[0.2, 0.4, 0.9, 0.5], [1.0, 0.0, 0.25, 0.5]], atol=1e-15)
    scale = np.array([[0.1, 0.2, 0.3, 0.4]])  # scale attention: one weight per stage already
    np.testing.assert_array_equal(sr.stage_attention(scale, channels), scale)
    with pytest.raises(ValueError, match="need 10"):
        sr.stage_attention(np.ones((1, 9)), channels)


def test_stage_channels_follow_the_fused_maps():
    tiny = train_utils.tiny_config().model  # Swin width 8: 8, 16, 32, 64 channels
    assert sr.stage_channels(tiny) == (8, 16, 32, 64)
    tiny.multi_scale = False
    assert sr.stage_channels(tiny) == (64,)  # the deepest stage alone
    assert sr.stage_labels(1) == ["stage 4"]
    demo = train_utils.load_config("demo").model  # width 24
    assert sr.stage_channels(demo) == (24, 48, 96, 192)


def test_attention_groups_and_their_combination():
    values = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    paths = ["/d/a.jpg", "/d/b.jpg", "/d/c.jpg", "/d/./e.jpg"]
    kinds = {"/d/a.jpg": "noise", "/d/b.jpg": "blur", "/d/c.jpg": "noise", "/d/e.jpg": "blur"}
    run = sr.attention_groups(values, paths, ["stage 3", "stage 4"], distortions=kinds)
    assert run["by"] == "distortion"
    assert run["groups"] == {"blur": [5.0, 6.0], "noise": [3.0, 4.0]}
    assert run["counts"] == {"blur": 2, "noise": 2} and run["overall"] == [4.0, 5.0]
    # Without labels: MOS quintiles (five images, one per bin).
    mos = {p: m for p, m in zip("vwxyz", (50, 10, 40, 20, 30))}
    by_mos = sr.attention_groups(np.arange(5.0)[:, None], list("vwxyz"), ["stage 4"], mos=mos)
    assert by_mos["by"] == "MOS quintile"
    assert [v[0] for v in by_mos["groups"].values()] == [1.0, 3.0, 4.0, 2.0, 0.0]
    # Two runs: blur's gates against the stage means, in %, then their mean and std.
    other = dict(run, groups={"blur": [4.0, 4.0], "noise": [4.0, 6.0]}, overall=[4.0, 5.0])
    both = sr.combine_attention([run, other])
    # run 1: blur +25% / +20%, noise -25% / -20%; run 2: blur 0% / -20%, noise 0% / +20%
    np.testing.assert_allclose(both["relative"], [[12.5, 0.0], [-12.5, 0.0]], atol=1e-12)
    np.testing.assert_allclose(both["relative_std"],
                               [[np.std([25, 0], ddof=1), np.std([20, -20], ddof=1)]] * 2,
                               atol=1e-12)
    assert both["top_stage"] == {"blur": {"stage 3": 2},
                                 "noise": {"stage 4": 2}}
    np.testing.assert_allclose(both["mean"], [[4.5, 5.0], [3.5, 5.0]], atol=1e-15)


# ---------------------------------------------------------------------------- study files


def test_study_file_mistakes_are_one_line_errors(tmp_path, at_repo):
    with pytest.raises(study.ConfigError, match="did you mean 'seeds'"):
        study.check_study({"rows": [{"name": "A", "config": "x.py"}], "seed": [1]}, "s.py")
    with pytest.raises(study.ConfigError, match="no row named 'B'"):
        study.check_study({"rows": [{"name": "A", "config": "x.py"}], "ablation": ["A", "B"]},
                          "s.py")
    with pytest.raises(study.ConfigError, match="KEY=VALUE"):
        study.check_study({"rows": [{"name": "A", "config": "x.py", "overrides": ["lr"]}]},
                          "s.py")
    assert call("--study=nowhere.py", f"--root={tmp_path}", "plan") == 2
    assert call(f"--root={tmp_path}", "plan") == 2  # a new root needs --study
    assert call("--study=configs/studies/demo.py", f"--root={tmp_path}", "--override=train.x=1",
                "plan") == 2
    assert not (tmp_path / "study.json").exists()  # nothing remembered from failed plans


@pytest.fixture()
def at_repo(monkeypatch):
    """Study commands read config paths from the repository root, as documented."""
    monkeypatch.chdir(REPO)


def test_shipped_studies_plan(tmp_path, at_repo):
    root = tmp_path / "ref"
    assert call("--study=configs/studies/reference.py:splits", f"--root={root}",
                "--data=koniq10k=/data/koniq10k", "--data=spaq=/data/spaq", "plan") == 0
    plan = json.loads((root / "plan" / "plan.json").read_text())
    assert len(plan["runs"]) == 60  # 6 rows x 10 splits
    split3 = next(r for r in plan["runs"] if r["row"] == "E6-Base" and r["tag"] == "split3")
    assert "--config.seed=3" in split3["train"]
    assert "--config.data.test_split=random:test" in split3["train"]
    assert [e[-3:-1] for e in split3["evaluate"]] == [
        ["--data=koniq10k:random:test=/data/koniq10k", "--seed=3"],
        ["--data=spaq=/data/spaq", "--seed=3"]]
    assert sorted(plan["not_evaluated"])[0].startswith("agiqa3k")
    root = tmp_path / "demo"
    assert call("--study=configs/studies/demo.py", f"--root={root}", "plan") == 0
    plan = json.loads((root / "plan" / "plan.json").read_text())
    assert [(r["row"], r["tag"]) for r in plan["runs"][:4]] == [
        ("A2", "seed0"), ("A1", "seed0"), ("E6", "seed0"), ("A2", "seed1")]
    a2 = plan["runs"][0]["train"]
    assert a2[1:4] == ["-m", "hyperiqa_jax.train", "--config=configs/demo.py"]
    assert a2[-2:] == ["--config.model.multi_scale=False", "--config.model.attention=none"]
    # The root remembers its overrides: others are refused.
    assert call(f"--root={root}", "--override=train.epochs=2", "plan") == 2


# ---------------------------------------------------------------------------- cluster scripts


def _tiny_study(tmp_path, rows, **extra):
    """A study file of tiny configs on a generated manifest data set."""
    data = train_utils.write_manifest_dataset(str(tmp_path / "data"), n_train=16, n_test=8)
    config = tmp_path / "tiny.py"
    config.write_text(
        "from tests.train_utils import tiny_config\n\n\n"
        "def get_config():\n"
        "    c = tiny_config(name='manifest')\n"
        "    c.train.update(max_steps=2, eval_every_epochs=0, final_eval=False)\n"
        "    return c\n")
    spec = {"name": "tiny", "rows": [dict(r, config=str(config)) for r in rows], **extra}
    path = tmp_path / "study_file.py"
    path.write_text(f"def get_study():\n    return {spec!r}\n")
    return str(path), data


def test_slurm_array_runs_each_run_through_the_launch_script(tmp_path, at_repo):
    spec, data = _tiny_study(tmp_path, [{"name": "A", "overrides": ["model.attention=none"]},
                                        {"name": "B"}], seeds=[0, 1])
    root = tmp_path / "root"
    assert call(f"--study={spec}", f"--root={root}", f"--data=manifest={data}", "plan") == 0
    script = (root / "plan" / "slurm_array.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script.splitlines()
    # Array task 3 (B, seed 1: runs go seed by seed), with a stand-in srun that records what
    # it would start.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.txt"
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" "--" >> {record}\n')
    (bin_dir / "srun").chmod(0o755)
    workdir = root / "runs" / "B" / "seed1"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable,
               PYTHONPATH=str(REPO), SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="7",
               SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NODELIST="node1",
               SLURM_ARRAY_TASK_ID="3")

    def task():
        record.unlink(missing_ok=True)
        out = subprocess.run(["bash", str(root / "plan" / "slurm_array.sbatch")], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return [c.split("\n") for c in record.read_text().split("\n--\n") if c.strip()]

    commands = task()  # the run has not finished: train only
    assert len(commands) == 1
    train = commands[0][commands[0].index(sys.executable):]
    assert train == [sys.executable, "-m", "hyperiqa_jax.train", f"--config={tmp_path}/tiny.py",
                     f"--workdir={workdir}", f"--config.data.root={data}", "--config.seed=1"]
    # Finished (summary and checkpoint of the last step): then evaluate it too.
    (workdir / "checkpoints" / "2" / "state").mkdir(parents=True)
    (workdir / "checkpoints" / "2" / "meta").mkdir()
    (workdir / "summary.json").write_text(json.dumps(
        {"step": 2, "total_steps": 2, "stop_reason": "completed"}))
    evaluate = task()[1]
    assert evaluate[evaluate.index(sys.executable):] == [
        sys.executable, "-m", "hyperiqa_jax.evaluate", f"--checkpoint={workdir}",
        f"--data=manifest:test={data}", "--seed=1",
        f"--out={workdir}/eval/manifest_test"]
    env["SLURM_ARRAY_TASK_ID"] = "4"
    out = subprocess.run(["bash", str(root / "plan" / "slurm_array.sbatch")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "runs 0-3" in out.stderr
    tpu = (root / "plan" / "tpu_commands.sh").read_text().splitlines()
    lines = [x for x in tpu if x.startswith("launch/tpu_pod.sh")]
    assert len(lines) == 4
    assert lines[3].endswith(f"-w {workdir} -d {data} -c {tmp_path}/tiny.py -r -k -- "
                             "--config.seed=1")


def test_run_finished_reads_summary_and_checkpoints(tmp_path):
    def workdir(name, summary, steps):
        wd = tmp_path / name
        for s in steps:
            (wd / "checkpoints" / str(s) / "state").mkdir(parents=True)
            (wd / "checkpoints" / str(s) / "meta").mkdir()
        wd.mkdir(exist_ok=True)
        if summary:
            (wd / "summary.json").write_text(json.dumps(summary))
        return wd

    done = {"step": 8, "total_steps": 8, "stop_reason": "completed"}
    assert study.run_finished(workdir("done", done, [4, 8]))
    assert not study.run_finished(workdir("stale", done, [8, 12]))  # trained on after it
    assert not study.run_finished(workdir("preempted", dict(
        done, step=4, stop_reason="preempted (SIGTERM)"), [4]))
    assert study.run_finished(workdir("early", dict(
        done, step=4, stop_reason="early stopping (no SRCC gain in 5 evaluations)"), [4]))
    assert not study.run_finished(workdir("none", None, [4]))


# ---------------------------------------------------------------------------- end to end


def test_plan_run_report_end_to_end(tmp_path, at_repo, monkeypatch):
    """Two ablation rows (no attention -> channel attention), a row that fails, a zero-shot
    data set and one without a root: plan, run (twice), report."""
    rows = [{"name": "A", "overrides": ["model.attention=none"], "about": "no attention"},
            {"name": "B", "about": "channel attention"},
            {"name": "C", "overrides": ["pretrained_backbone=/nowhere/weights"]}]
    spec, data = _tiny_study(tmp_path, rows, ablation=["A", "B"], sizes=["A", "B"],
                             zero_shot={"other": "manifest:all", "unseen": "manifest"},
                             cross_data=["B"])
    # The images' noise level (image i has level i % 4) as the distortion column.
    manifest = Path(data) / "manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0] + ",distortion"] + [
        f"{line},noise{i % 4}" for i, line in enumerate(lines[1:])]) + "\n")
    other = train_utils.write_manifest_dataset(str(tmp_path / "other"), n_train=4, n_test=4,
                                               seed=3)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH",
                                                                                  "")]))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", CACHE)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    root = tmp_path / "root"
    flags_ = [f"--root={root}", f"--data=manifest={data}", f"--data=other={other}"]
    assert call(f"--study={spec}", *flags_, "plan") == 0
    commands = (root / "plan" / "commands.sh").read_text()
    assert commands.count("-m hyperiqa_jax.train") == 3
    assert commands.count("-m hyperiqa_jax.evaluate") == 4  # A, B, C in-domain; B on other

    assert call(*flags_, "run") == 1  # C fails
    log_a = root / "runs" / "A" / "seed0" / "logs" / "train.log"
    assert log_a.read_text().count("\n$ ") == 1
    assert call(*flags_, "run") == 1  # A and B are skipped, C fails again
    assert log_a.read_text().count("\n$ ") == 1

    assert call(*flags_, "--timing_batches=2", "report") == 0
    out = root / "report"
    report = json.loads((out / "report.json").read_text())
    runs = {r["row"]: r for r in report["runs"]}
    assert {k: r["status"] for k, r in runs.items()} == {"A": "finished", "B": "finished",
                                                         "C": "failed"}
    assert "pretrained_backbone" in runs["C"]["error"]
    assert any(m.startswith("C/seed0: failed") for m in report["missing"])
    assert any("unseen" in m and "no --data unseen=ROOT" in m for m in report["missing"])
    for row in "AB":
        assert report["rows"][row]["srcc"]["value"] == runs[row]["results"]["manifest:test"][
            "srcc"]
    steps = report["ablation"]["steps"]
    assert steps[1]["delta"] == pytest.approx(runs["B"]["results"]["manifest:test"]["srcc"]
                                              - runs["A"]["results"]["manifest:test"]["srcc"],
                                              abs=1e-15)
    other_srcc = runs["B"]["results"]["other"]["srcc"]
    assert report["rows"]["B"]["other"]["srcc_vs_train_pct"] == pytest.approx(
        sr.relative_change(other_srcc, runs["B"]["results"]["manifest:test"]["srcc"]))
    assert set(report["sizes"]["A"]["seconds_per_image"]) == {"2"}
    assert report["sizes"]["B"]["params"] == sum(report["parameters"]["B"].values())
    assert report["parameters"]["B"]["attention"] > 0
    assert "attention" not in report["parameters"]["A"]

    # B scored here: its SRCC, and its gates reduced per stage and grouped by the manifest's
    # distortion column, as the report has them.
    from hyperiqa_jax import QualityModel
    from hyperiqa_jax import data as data_lib

    records = data_lib.load_records("manifest", data, "test")
    model = QualityModel.from_checkpoint(str(root / "runs" / "B" / "seed0"), protocol=None)
    scores, gates = model.score([r.path for r in records], return_attention=True)
    assert runs["B"]["results"]["manifest:test"]["srcc"] == pytest.approx(
        stats.spearmanr(scores, [r.score for r in records])[0], abs=1e-12)
    stages = sr.stage_attention(gates, (8, 16, 32, 64))
    with open(manifest, newline="") as f:
        kind = {os.path.normpath(os.path.join(data, r["path"])): r["distortion"]
                for r in csv.DictReader(f)}
    groups = [kind[os.path.normpath(r.path)] for r in records]
    attention = report["attention"]["B"]
    assert attention["by"] == "distortion" and list(report["attention"]) == ["B"]
    for g, mean in zip(attention["groups"], attention["mean"]):
        expected = stages[[x == g for x in groups]].mean(0)
        np.testing.assert_allclose(mean, expected, atol=1e-7)

    md = (out / "report.md").read_text()
    assert "| A | no attention |" in md and "C/seed0: failed" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "src=\"http" not in page
    for name in ("size_vs_srcc.png", "cross_data.png", "training_curves.png",
                 "stage_attention.png"):
        assert (out / name).stat().st_size > 5000, name
