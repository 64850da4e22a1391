"""hyperiqa_jax.distributed: start-up planning from flags/env, and a real 2-process cluster."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

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
