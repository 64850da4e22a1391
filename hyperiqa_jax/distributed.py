"""Multi-host start-up: one `initialize()` for TPU pods, SLURM, explicit clusters and one process.

Every process of a job runs the same command; `initialize()` must run before
anything touches a JAX device. Where the cluster settings come from, first match
wins:

1. explicit: the arguments of `initialize()`, else the flags
   `--coordinator_address`/`--num_processes`/`--process_id` (of a command that
   defines them with `define_flags`, as hyperiqa_jax.train does), else the
   environment variables JAX_COORDINATOR_ADDRESS (host:port of process 0),
   JAX_NUM_PROCESSES, JAX_PROCESS_ID (launch/local_cluster.sh sets these);
   a process count or id given this way needs all three;
2. SLURM: an `srun` step with more than one task (SLURM_NTASKS, SLURM_PROCID,
   SLURM_LOCALID, SLURM_STEP_NODELIST); the coordinator is the first node;
3. TPU: a Cloud TPU VM (libtpu installed or TPU_* variables set) ->
   `jax.distributed.initialize()` asks the TPU metadata for the pod layout;
4. otherwise one process: nothing to start.

JAX's own variables are honoured: JAX_COORDINATOR_ADDRESS alone (or
JAX_COORDINATOR_PORT) replaces the coordinator that SLURM or the TPU metadata
would give, JAX_LOCAL_DEVICE_IDS the devices this process drives;
JAX_COORDINATOR_BIND_ADDRESS reaches JAX unchanged. Under SLURM and with
explicit settings JAX's own cluster detection is switched off, so the devices
chosen here (`Plan.local_device_ids`, None = every device the process sees) are
the ones JAX uses: its detection would restrict each process to GPU
SLURM_LOCALID, which does not exist where SLURM already gave each task its own
GPU, and leaves 7 of 8 idle with one process per node.

A second call returns at once (it is safe in tests and in library code that
cannot know whether its caller already started the cluster).
"""

import dataclasses
import importlib.util
import os
import re
import sys

import jax
from absl import flags

from hyperiqa_jax.errors import UserError


def define_flags(flag_values=flags.FLAGS):
    """--coordinator_address, --num_processes, --process_id: for a command that calls
    `initialize()` (hyperiqa_jax.train), in its own define_flags. Importing this module
    defines no flag."""
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a "
                        "multi-process run off TPU and SLURM (else JAX_COORDINATOR_ADDRESS).",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "Processes in the job (else JAX_NUM_PROCESSES).",
                         lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process's index, 0-based (else "
                         "JAX_PROCESS_ID).", lower_bound=0, flag_values=flag_values)


# Variables whose presence means a Cloud TPU VM (set on TPU VMs and GKE TPU pods).
TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "TPU_ACCELERATOR_TYPE", "TPU_NAME")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins the job: `kind` and the arguments for jax.distributed."""

    kind: str  # "explicit", "slurm", "tpu" or "single"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def _int(value, name):
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def slurm_coordinator(env):
    """First host of the step's node list, port derived from the job id (as JAX does), or
    JAX_COORDINATOR_PORT."""
    nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    # 'node001', 'node001,node002', 'node[001-004,007],other' -> 'node001'.
    first = nodes.split(",")[0]
    if "[" in first:
        prefix, _, rest = nodes.partition("[")
        first = prefix + re.split(r"[,\-\]]", rest)[0]
    port = _int(env.get("JAX_COORDINATOR_PORT"), "JAX_COORDINATOR_PORT")
    if port is None:
        port = int(env.get("SLURM_JOB_ID", "0")) % 4096 + 61440  # the ephemeral range's top
    return f"{first}:{port}"


def _tasks_on_this_node(env):
    """Tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE ('8(x2),4': 8 on each
    of the first two nodes, 4 on the third) at SLURM_NODEID, else tasks / nodes."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node = _int(env.get("SLURM_NODEID"), "SLURM_NODEID")
    if spec and node is not None:
        counts = []
        for part in spec.split(","):
            m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if not m:
                break
            counts += [int(m[1])] * int(m[2] or 1)
        else:
            if node < len(counts):
                return counts[node]
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES")
                or env.get("SLURM_JOB_NUM_NODES") or 1)
    return max(1, int(env["SLURM_NTASKS"]) // max(nodes, 1))


def slurm_local_devices(env):
    """The GPUs (indices among those this process sees) one SLURM task drives, or None
    for all of them.

    - one task on this node (`--ntasks-per-node=1`): all its GPUs (None);
    - SLURM bound fewer GPUs to the task than there are tasks on the node
      (`--gpus-per-task=1`: CUDA_VISIBLE_DEVICES is one GPU): all of those (None);
    - every task sees all G GPUs of the node (`--gpus-per-node=G` with T tasks):
      task SLURM_LOCALID takes its own G / T of them;
    - CUDA_VISIBLE_DEVICES unset with several tasks: one GPU each, index SLURM_LOCALID.
    """
    tasks = _tasks_on_this_node(env)
    if tasks <= 1:
        return None
    local = int(env["SLURM_LOCALID"])
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        return (local,)
    if len(visible) < tasks:
        return None
    if len(visible) % tasks:
        raise ValueError(
            f"{tasks} SLURM tasks on this node share its {len(visible)} GPUs "
            f"(CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}), which do not divide "
            "evenly: ask for --gpus-per-task=N (or one task per node)")
    share = len(visible) // tasks
    return tuple(range(local * share, (local + 1) * share))


def _device_ids(value, name):
    """'0,1' (JAX_LOCAL_DEVICE_IDS) -> (0, 1)."""
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {value!r}") from None


def on_tpu_vm(env):
    return (any(v in env for v in TPU_ENV_VARS)
            or importlib.util.find_spec("libtpu") is not None)


def plan(coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None,
         env=None):
    """Decides how to start (pure: arguments and `env` in, a Plan out)."""
    env = os.environ if env is None else env
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if coordinator_address and ":" not in coordinator_address and \
            env.get("JAX_COORDINATOR_PORT"):
        port = _int(env["JAX_COORDINATOR_PORT"], "JAX_COORDINATOR_PORT")
        coordinator_address = f"{coordinator_address}:{port}"
    if coordinator_address and ":" not in coordinator_address:
        raise ValueError(f"the coordinator address {coordinator_address!r} has no port: give "
                         "host:port (or set JAX_COORDINATOR_PORT)")
    if num_processes is None:
        num_processes = _int(env.get("JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _int(env.get("JAX_PROCESS_ID"), "JAX_PROCESS_ID")
    if isinstance(local_device_ids, int):
        local_device_ids = (local_device_ids,)
    elif local_device_ids is not None:
        local_device_ids = tuple(local_device_ids)
    elif env.get("JAX_LOCAL_DEVICE_IDS"):
        local_device_ids = _device_ids(env["JAX_LOCAL_DEVICE_IDS"], "JAX_LOCAL_DEVICE_IDS")

    if num_processes == 1:
        return Plan("single")
    if num_processes is not None or process_id is not None:
        return _explicit(coordinator_address, num_processes, process_id, local_device_ids)

    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        return Plan("slurm", coordinator_address or slurm_coordinator(env),
                    int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]),
                    local_device_ids if local_device_ids is not None
                    else slurm_local_devices(env))

    if on_tpu_vm(env):
        # JAX reads the rest (and JAX_COORDINATOR_PORT) from the TPU metadata.
        return Plan("tpu", coordinator_address)
    if coordinator_address:
        return _explicit(coordinator_address, num_processes, process_id, local_device_ids)
    return Plan("single")


def _explicit(coordinator_address, num_processes, process_id, local_device_ids):
    missing = [name for name, v in (("coordinator address", coordinator_address),
                                    ("process count", num_processes),
                                    ("process id", process_id)) if v is None]
    if missing:
        raise ValueError(
            f"multi-process start-up needs the coordinator address, the process count and "
            f"this process's id; missing: {', '.join(missing)} (flags --coordinator_address "
            "--num_processes --process_id or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
            "JAX_PROCESS_ID; inside a SLURM step or on a Cloud TPU VM the count and the id "
            "are detected: give none of them, or all three)")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} not in [0, {num_processes})")
    return Plan("explicit", coordinator_address, num_processes, process_id, local_device_ids)


def _flag(flag_values, name):
    """A flag's value, or None when the command did not define it (`define_flags`) or absl
    has not parsed the command line (library use)."""
    flag_values = flags.FLAGS if flag_values is None else flag_values
    if name not in flag_values or not flag_values.is_parsed():
        return None
    return flag_values[name].value


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               local_device_ids=None, initialization_timeout=300, flag_values=None):
    """Joins this process to the job (see the module docstring); returns the topology dict.

    Arguments not given come from the flags of `define_flags` when the command defined
    them (in `flag_values`, absl's FLAGS by default), else from the environment.
    Returns early, without logging again, when jax.distributed is already running.
    A peer that never arrives makes this raise after `initialization_timeout` seconds.
    """
    if jax.distributed.is_initialized():
        return topology()
    p = plan(coordinator_address or _flag(flag_values, "coordinator_address"),
             num_processes if num_processes is not None else _flag(flag_values, "num_processes"),
             process_id if process_id is not None else _flag(flag_values, "process_id"),
             local_device_ids)
    timeout = _int(os.environ.get("JAX_INITIALIZATION_TIMEOUT"), "JAX_INITIALIZATION_TIMEOUT")
    timeout = timeout or initialization_timeout
    if p.kind == "tpu":
        jax.distributed.initialize(coordinator_address=p.coordinator_address,
                                   initialization_timeout=timeout)
    elif p.kind in ("explicit", "slurm"):
        # XLA aborts the process (no Python exception) when peers do not all arrive in
        # time, so say beforehand what this process waits for.
        print(f"[distributed] process {p.process_id} of {p.num_processes} joining "
              f"{p.coordinator_address} ({p.kind}); a missing peer aborts this after "
              f"{timeout}s", file=sys.stderr, flush=True)
        try:
            jax.distributed.initialize(
                coordinator_address=p.coordinator_address, num_processes=p.num_processes,
                process_id=p.process_id,
                local_device_ids=list(p.local_device_ids) if p.local_device_ids else None,
                cluster_detection_method="deactivate",  # the choice above, unchanged
                initialization_timeout=timeout)
        except Exception as e:  # XLA's errors say "DEADLINE_EXCEEDED"; say what it means.
            raise RuntimeError(
                f"process {p.process_id} could not join the {p.num_processes}-process job at "
                f"{p.coordinator_address} within {timeout}s: is every process started with "
                f"the same address and process count, and is process 0 reachable? ({e})") from e
    info = topology(p.kind)
    _log_topology(info)
    return info


_CUDA_HINT = ("is a GPU visible (nvidia-smi) and is the CUDA build of jax installed "
              "(launch/setup_gpu.sh installs jax[cuda12] pinned to constraints.txt)?")
PLATFORM_HINTS = {
    "cuda": _CUDA_HINT,
    "gpu": _CUDA_HINT,
    "tpu": "is jax[tpu] installed, and does another process hold the TPU (`sudo lsof -w "
           "/dev/accel* /dev/vfio/*`; launch/tpu_pod.sh stops such processes and removes "
           "/tmp/libtpu_lockfile before a run)?",
}


def local_devices(env=None):
    """jax.local_devices(), starting JAX's backend if needed.

    A platform that JAX_PLATFORMS names (the GPU and TPU launchers set it) and JAX
    cannot start is a UserError with one line, instead of JAX's traceback; without
    JAX_PLATFORMS, JAX itself falls back to the CPU with a warning.
    """
    env = os.environ if env is None else env
    try:
        return jax.local_devices()
    except (RuntimeError, AssertionError) as e:  # no device of the named kind: AssertionError
        platforms = env.get("JAX_PLATFORMS", "")
        if not platforms:
            raise
        reason = str(e).splitlines()[0] if str(e) else f"no {platforms} device found"
        hint = next((PLATFORM_HINTS[p] for p in platforms.split(",") if p in PLATFORM_HINTS),
                    "")
        raise UserError(f"JAX_PLATFORMS={platforms}, but JAX could not start it ({reason}); "
                        f"nothing runs on the CPU instead. {hint}".rstrip()) from e


def topology(kind=None):
    """This process's view of the job (a plain dict, for logs and tests)."""
    local = local_devices()
    return {"kind": kind, "process_index": jax.process_index(),
            "process_count": jax.process_count(), "local_device_count": len(local),
            "device_count": jax.device_count(), "platform": local[0].platform,
            "device_kind": local[0].device_kind, "local_device_ids": [d.id for d in local]}


def _log_topology(info):
    # Every host logs its own line (hosts keep separate logs); process 0 adds the total.
    print(f"[distributed] process {info['process_index']}/{info['process_count']} "
          f"({info['kind']}): {info['local_device_count']} local {info['device_kind']} "
          f"device(s) {info['local_device_ids']}", file=sys.stderr, flush=True)
    if info["process_index"] == 0:
        print(f"[distributed] {info['device_count']} {info['platform']} device(s) in "
              f"{info['process_count']} process(es)", file=sys.stderr, flush=True)
