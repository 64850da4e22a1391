"""hyperiqa_jax.distributed: start-up planning from flags/env, and a real 2-process cluster."""

import json
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import pytest
from absl import flags

from hyperiqa_jax import distributed

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_worker.py"


# ---------------------------------------------------------------------------- plan()


def test_plan_single_process_without_settings():
    assert distributed.plan(env={}).kind == "single"


def test_plan_explicit_from_env():
    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    assert distributed.plan(env=env) == distributed.Plan("explicit", "127.0.0.1:1234", 4, 3)


def test_plan_arguments_override_env():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1", "JAX_NUM_PROCESSES": "8",
           "JAX_PROCESS_ID": "7"}
    p = distributed.plan("127.0.0.1:99", 2, 0, local_device_ids=1, env=env)
    assert p == distributed.Plan("explicit", "127.0.0.1:99", 2, 0, (1,))


def test_plan_one_process_count_means_single():
    assert distributed.plan(num_processes=1, env={}).kind == "single"


def test_plan_incomplete_explicit_settings_say_what_is_missing():
    with pytest.raises(ValueError, match="missing: process id"):
        distributed.plan(env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="not in"):
        distributed.plan("h:1", 2, 2, env={})
    with pytest.raises(ValueError, match="integer"):
        distributed.plan(env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
                              "JAX_PROCESS_ID": "0"})


SLURM = {"SLURM_JOB_ID": "4100", "SLURM_NTASKS": "16", "SLURM_NNODES": "2",
         "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[017-018]"}


def test_plan_slurm_one_process_per_gpu():
    p = distributed.plan(env=SLURM)
    assert p == distributed.Plan("slurm", "gpu017:61444", 16, 9, (1,))


def test_plan_slurm_one_process_per_node_sees_all_gpus():
    env = dict(SLURM, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0")
    assert distributed.plan(env=env) == distributed.Plan("slurm", "gpu017:61444", 2, 1, None)


def test_plan_slurm_gpus_per_task_keeps_slurm_visibility():
    env = dict(SLURM, CUDA_VISIBLE_DEVICES="1")  # srun --gpus-per-task=1 already chose
    assert distributed.plan(env=env).local_device_ids is None


def test_plan_slurm_single_task_is_single_and_explicit_wins():
    assert distributed.plan(env=dict(SLURM, SLURM_NTASKS="1")).kind == "single"
    env = dict(SLURM, JAX_COORDINATOR_ADDRESS="h:5", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    assert distributed.plan(env=env).kind == "explicit"


@pytest.mark.parametrize("nodes,host", [("n1", "n1"), ("n1,n2", "n1"), ("a[3-5,9],b", "a3"),
                                        ("a[07,9]", "a07"), ("x1,a[2-3]", "x1")])
def test_slurm_coordinator_is_first_node(nodes, host):
    assert distributed.slurm_coordinator({"SLURM_JOB_NODELIST": nodes, "SLURM_JOB_ID": "1"}) \
        == f"{host}:61441"


def test_plan_tpu_vm():
    assert distributed.plan(env={"TPU_WORKER_HOSTNAMES": "t0,t1", "TPU_WORKER_ID": "1"}).kind \
        == "tpu"


def test_flags_are_defined_by_the_command_and_read_by_initialize(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    flag_values = flags.FlagValues()
    distributed.define_flags(flag_values)
    flag_values(["train", "--num_processes=2", "--process_id=1"])
    # The flags reach plan(): it names what is missing from them.
    with pytest.raises(ValueError, match="missing: coordinator address"):
        distributed.initialize(flag_values=flag_values)
    # An argument of initialize() wins over its flag.
    assert distributed.initialize(num_processes=1, flag_values=flag_values)["process_count"] == 1
    # Not parsed yet (library use): the flags are not read.
    unparsed = flags.FlagValues()
    distributed.define_flags(unparsed)
    unparsed["num_processes"].value = 2  # would be "missing: coordinator address" if read
    assert distributed.initialize(flag_values=unparsed)["process_count"] == 1


def test_importing_defines_no_flags():
    probe = ("from absl import flags; import hyperiqa_jax.distributed; "
             "print(sorted(n for n in ('coordinator_address', 'num_processes', 'process_id') "
             "if n in flags.FLAGS))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_initialize_single_process_and_early_return(capsys):
    # This pytest process is single-process: nothing starts, a topology is returned.
    info = distributed.initialize()
    assert info["process_count"] == 1 and info["process_index"] == 0
    assert info["device_count"] >= 1


# ---------------------------------------------------------------------------- SLURM layouts
# The variables srun sets in one task of a 2-node step (one process per GPU: 8 tasks per
# node with --gpus-per-task=1; one process per node: 1 task with 8 GPUs), and the GPU
# indices (among those the process sees) each layout needs.


def slurm_task(tasks_per_node, proc, local, visible, nodes=2):
    return {"SLURM_JOB_ID": "4100", "SLURM_JOB_NODELIST": "gpu[017-018]",
            "SLURM_STEP_NODELIST": "gpu[017-018]", "SLURM_NNODES": str(nodes),
            "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_NTASKS": str(tasks_per_node * nodes),
            "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})",
            "SLURM_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})",
            "SLURM_NODEID": str(proc // tasks_per_node), "SLURM_PROCID": str(proc),
            "SLURM_LOCALID": str(local), "CUDA_VISIBLE_DEVICES": visible}


ALL8 = "0,1,2,3,4,5,6,7"
LAYOUTS = {
    # --ntasks-per-node=8 --gpus-per-task=1: SLURM binds one GPU to each task; it is the
    # process's only GPU (index 0), whatever its number on the node.
    "per_gpu": (slurm_task(8, 11, 3, "3"), None, "all"),
    "per_gpu_cgroup": (slurm_task(8, 11, 3, "0"), None, "all"),
    # --ntasks-per-node=1 --gpus-per-task=8: one process drives the node's 8 GPUs.
    "per_node": (slurm_task(1, 1, 0, ALL8), None, "all"),
    # --ntasks-per-node=8 --gpus-per-node=8: every task sees all 8; each takes its own.
    "per_gpu_shared": (slurm_task(8, 11, 3, ALL8), (3,), "3"),
    # --ntasks-per-node=2 --gpus-per-node=8: 4 GPUs per task.
    "two_per_node": (slurm_task(2, 3, 1, ALL8), (4, 5, 6, 7), "4,5,6,7"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_slurm_layouts_choose_the_devices_each_task_needs(layout):
    env, devices, _ = LAYOUTS[layout]
    p = distributed.plan(env=env)
    assert p == distributed.Plan("slurm", "gpu017:61444", int(env["SLURM_NTASKS"]),
                                 int(env["SLURM_PROCID"]), devices)


def test_slurm_tasks_that_cannot_share_the_gpus_evenly_are_refused():
    with pytest.raises(ValueError, match="3 SLURM tasks on this node share its 8 GPUs"):
        distributed.plan(env=slurm_task(3, 1, 1, ALL8))


def test_slurm_uneven_task_counts_per_node():
    env = dict(slurm_task(8, 9, 1, ""), SLURM_NTASKS="12", SLURM_STEP_TASKS_PER_NODE="8,4",
               SLURM_NODEID="1")
    assert distributed.plan(env=env).local_device_ids == (1,)  # 4 tasks here, one GPU each
    one = dict(env, SLURM_STEP_TASKS_PER_NODE="11,1", SLURM_LOCALID="0",
               CUDA_VISIBLE_DEVICES=ALL8)
    assert distributed.plan(env=one).local_device_ids is None  # alone on its node


@pytest.fixture
def cluster_env(monkeypatch):
    """A clean environment (no SLURM, TPU or JAX_* cluster variables) to set a layout in."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "JAX_COORDINATOR", "TPU_")) or name in (
                "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS",
                "CUDA_VISIBLE_DEVICES", "JAX_INITIALIZATION_TIMEOUT"):
            monkeypatch.delenv(name)

    def set_env(env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
    return set_env


@pytest.mark.parametrize("layout", LAYOUTS)
def test_initialize_hands_the_choice_to_jax_with_its_detection_off(layout, cluster_env,
                                                                   monkeypatch):
    env, devices, _ = LAYOUTS[layout]
    cluster_env(env)
    seen = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: seen.append((a, kw)))
    distributed.initialize()
    assert seen == [((), {"coordinator_address": "gpu017:61444",
                          "num_processes": int(env["SLURM_NTASKS"]),
                          "process_id": int(env["SLURM_PROCID"]),
                          "local_device_ids": list(devices) if devices else None,
                          "cluster_detection_method": "deactivate",
                          "initialization_timeout": 300})]


@pytest.fixture
def fake_runtime(monkeypatch):
    """jax.distributed.initialize runs for real, but its coordination service and client are
    stand-ins (nothing listens or connects), and the CPU backend this test process already
    runs does not count as started; JAX's global state and the device choice it writes
    (jax_cuda_visible_devices) are restored afterwards."""
    from jax._src import distributed as jax_distributed
    from jax._src import xla_bridge

    jax.devices()  # the CPU backend exists before the fake client could reach it
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    state = jax_distributed.global_state
    for field in ("service", "client", "preemption_sync_manager", "coordinator_address",
                  "process_id", "num_processes", "partition_index"):
        monkeypatch.setattr(state, field, getattr(state, field, None), raising=False)
    monkeypatch.setattr(state, "initialize_preemption_sync_manager", lambda: None)
    runtime = types.SimpleNamespace(
        get_distributed_runtime_service=lambda *a, **kw: types.SimpleNamespace(),
        get_distributed_runtime_client=lambda *a, **kw: types.SimpleNamespace(
            connect=lambda: None))
    monkeypatch.setattr(jax_distributed, "_jax", runtime)
    yield lambda: xla_bridge.CUDA_VISIBLE_DEVICES.value
    jax.config.update("jax_cuda_visible_devices", "all")
    jax.config.update("jax_rocm_visible_devices", "all")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_jax_uses_the_gpus_each_layout_needs(layout, cluster_env, fake_runtime):
    env, _, visible = LAYOUTS[layout]
    cluster_env(env)
    assert fake_runtime() == "all"
    info = distributed.initialize()
    assert info["kind"] == "slurm"
    assert fake_runtime() == visible


def test_jax_detection_alone_would_ask_for_gpu_slurm_localid(cluster_env, fake_runtime):
    """Why the detection is switched off: with --gpus-per-task=1, JAX's own SLURM detection
    restricts task 3 to GPU 3, which its single visible GPU (index 0) does not have."""
    cluster_env(LAYOUTS["per_gpu"][0])
    jax.distributed.initialize()
    assert fake_runtime() == "3"


# ---------------------------------------------------------------------------- JAX's variables


def test_jax_coordinator_address_alone_keeps_the_detected_count_and_id():
    env = dict(LAYOUTS["per_gpu"][0], JAX_COORDINATOR_ADDRESS="10.0.0.5:7000")
    assert distributed.plan(env=env) == distributed.Plan("slurm", "10.0.0.5:7000", 16, 11)
    tpu = {"TPU_WORKER_HOSTNAMES": "t0,t1", "TPU_WORKER_ID": "1",
           "JAX_COORDINATOR_ADDRESS": "t0:8476"}
    assert distributed.plan(env=tpu) == distributed.Plan("tpu", "t0:8476")


def test_jax_coordinator_port_and_local_device_ids_are_honoured():
    env = dict(LAYOUTS["per_node"][0], JAX_COORDINATOR_PORT="7001", JAX_LOCAL_DEVICE_IDS="0,1")
    assert distributed.plan(env=env) == distributed.Plan("slurm", "gpu017:7001", 2, 1, (0, 1))
    env = {"JAX_COORDINATOR_ADDRESS": "head", "JAX_COORDINATOR_PORT": "7002",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert distributed.plan(env=env).coordinator_address == "head:7002"
    with pytest.raises(ValueError, match="'head' has no port"):
        distributed.plan(env=dict(env, JAX_COORDINATOR_PORT=""))
    with pytest.raises(ValueError, match="JAX_LOCAL_DEVICE_IDS must be comma-separated"):
        distributed.plan(env=dict(env, JAX_LOCAL_DEVICE_IDS="gpu0"))


def test_jax_coordinator_address_alone_off_a_cluster_says_what_is_missing():
    with pytest.raises(ValueError, match="missing: process count, process id.*SLURM step"):
        distributed.plan(env={"JAX_COORDINATOR_ADDRESS": "head:1234"})


def test_explicit_settings_and_tpu_reach_jax(cluster_env, monkeypatch):
    seen = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: seen.append(kw))
    # Explicit settings inside a SLURM step: JAX must not override the devices either.
    cluster_env(dict(LAYOUTS["per_gpu"][0], JAX_COORDINATOR_ADDRESS="h:5",
                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1", JAX_INITIALIZATION_TIMEOUT="9"))
    distributed.initialize()
    assert seen.pop() == {"coordinator_address": "h:5", "num_processes": 2, "process_id": 1,
                          "local_device_ids": None, "cluster_detection_method": "deactivate",
                          "initialization_timeout": 9}
    for name in list(os.environ):
        if name.startswith(("SLURM_", "JAX_")):
            monkeypatch.delenv(name)
    cluster_env({"TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "t0"})
    distributed.initialize()
    assert seen.pop() == {"coordinator_address": None, "initialization_timeout": 300}


# ---------------------------------------------------------------------------- the platform


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_a_platform_that_cannot_start_is_one_error_line_not_a_cpu_run(platform, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS=platform)
    done = subprocess.run([sys.executable, "-m", "hyperiqa_jax.train", "--config=configs/demo.py",
                           f"--workdir={tmp_path / 'w'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: JAX_PLATFORMS={platform}, but JAX could not start it")
    assert "nothing runs on the CPU instead" in last
    assert not (tmp_path / "w" / "checkpoints").exists()


# ---------------------------------------------------------------------------- real processes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(n, devices, port, ids=None, timeout_s=None):
    procs = []
    for i in ids if ids is not None else range(n):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   PYTHONPATH=str(REPO))
        if timeout_s:
            env["JAX_INITIALIZATION_TIMEOUT"] = str(timeout_s)
        procs.append(subprocess.Popen([sys.executable, str(WORKER)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def collect(procs, timeout_s):
    """(returncode, stdout, stderr) per process; kills everyone when one hangs."""
    deadline = time.time() + timeout_s
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a loopback worker hung for more than {timeout_s}s (dead peer?)")
        results.append((p.returncode, out, err))
    return results


def test_two_processes_two_devices_each_form_one_mesh():
    procs = start_workers(2, 2, free_port(), timeout_s=60)
    results = collect(procs, timeout_s=120)
    seen = []
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
        seen.append(json.loads(out.strip().splitlines()[-1]))
    assert [s["process_index"] for s in seen] == [0, 1]
    for s in seen:
        assert s["process_count"] == 2 and s["device_count"] == 4
        assert s["local_device_count"] == 2 and s["kind"] == "explicit"
        assert s["global_shape"] == [4]
        assert s["sum"] == 0 + 1 + 2 + 3 and s["psum"] == [6.0]
    # Topology is logged once per process, the total once.
    assert results[0][2].count("[distributed] process 0/2") == 1
    assert results[0][2].count("4 cpu device(s) in 2 process(es)") == 1
    assert "device(s) in" not in results[1][2]


def test_missing_peer_fails_fast_with_a_clear_message():
    # Process 1 of 2 never starts: process 0 must give up inside its timeout, saying why.
    t0 = time.time()
    [(rc, _, err)] = collect(start_workers(2, 1, free_port(), ids=[0], timeout_s=3),
                             timeout_s=60)
    assert rc != 0
    assert "process 0 of 2 joining 127.0.0.1" in err and "aborts this after 3s" in err
    assert "DEADLINE_EXCEEDED" in err
    assert time.time() - t0 < 60
