"""Fake `gcloud`, `uv`, `sudo`, `lsof`, `srun`, `scontrol` and a fake train process for
tests/test_launch.py: the launch scripts run unchanged with these first on PATH.

Every fake appends one JSON line {"prog", "argv", "env"} to STATE/calls.jsonl.

- gcloud: `compute tpus tpu-vm ssh NAME --worker=W --command=CMD` runs CMD with bash
  once per fake worker (HOME=STATE/workerN, TPU_WORKER_ID=N), `--worker=all` on each of
  FAKE_WORKERS (2) in turn, and exits with the highest status; a command containing
  FAKE_SSH_DROP exits 255 unrun (a dropped connection). `tpu-vm scp FILE NAME:~/X`
  copies FILE to each worker's HOME. `queued-resources describe` prints the first of
  the whitespace-separated states in STATE/qr_states and drops it (the last one
  stays). `create` exits FAKE_CREATE_RC (0). `storage cp SRC gs://B/P` copies SRC to
  STATE/gcs/B/P. Anything else: recorded, exit 0.
- uv: `uv venv ... PATH` makes PATH/bin/python the fake train process.
- sudo runs its arguments; lsof prints the pids listed in STATE/lsof_pids.
- srun, scontrol: recorded; exit FAKE_SRUN_RC / FAKE_SCONTROL_RC (0).
- the fake train (the venv's python): writes its arguments to $HOME/train_args and
  JAX_PLATFORMS to $HOME/train_env, runs FAKE_TRAIN_TICKS x 0.1 s (5), exits
  FAKE_TRAIN_RC (0), or 75 on SIGTERM, as hyperiqa_jax.train does after its checkpoint.
"""

import json
import os
import stat
import sys
from pathlib import Path

RECORDED_ENV = ("JAX_PLATFORMS", "SRUN_CPUS_PER_TASK", "SLURM_CPUS_PER_TASK", "HOME",
                "TPU_WORKER_ID")

RECORD = f'''
import json, os, sys
def record(prog, argv):
    with open(os.path.join(os.environ["FAKE_STATE"], "calls.jsonl"), "a") as f:
        f.write(json.dumps({{"prog": prog, "argv": argv,
                            "env": {{k: os.environ.get(k) for k in {RECORDED_ENV!r}}}}}) + "\\n")
'''

GCLOUD = RECORD + '''
import shutil, subprocess
from pathlib import Path

args = sys.argv[1:]
record("gcloud", args)
state = Path(os.environ["FAKE_STATE"])
opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
positional = [a for a in args if not a.startswith("-")]
workers = int(os.environ.get("FAKE_WORKERS", "2"))
chosen = range(workers) if opts.get("worker") == "all" else [int(opts.get("worker", "0"))]

if args[:2] == ["storage", "cp"]:
    src, dst = positional[2:4]
    out = state / "gcs" / dst[len("gs://"):]
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, out)
elif args[:3] == ["compute", "tpus", "queued-resources"] and args[3] == "describe":
    states = (state / "qr_states").read_text().split()
    print(states[0])
    (state / "qr_states").write_text(" ".join(states[1:] or states))
elif args[:2] == ["compute", "tpus"] and args[3] == "create":
    sys.exit(int(os.environ.get("FAKE_CREATE_RC", "0")))
elif args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    src, dest = positional[4:6]
    for w in chosen:
        home = state / f"worker{w}"
        home.mkdir(exist_ok=True)
        shutil.copy(src, home / dest.split(":", 1)[1].removeprefix("~/"))
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    command = opts["command"]
    if os.environ.get("FAKE_SSH_DROP") and os.environ["FAKE_SSH_DROP"] in command:
        sys.exit(255)
    rc = 0
    for w in chosen:
        home = state / f"worker{w}"
        home.mkdir(exist_ok=True)
        env = dict(os.environ, HOME=str(home), TPU_WORKER_ID=str(w))
        rc = max(rc, subprocess.run(["bash", "-c", command], env=env, cwd=home).returncode)
    sys.exit(rc)
'''

UV = RECORD + '''
from pathlib import Path
args = sys.argv[1:]
record("uv", args)
if args[:1] == ["venv"]:
    python = Path(args[-1]) / "bin" / "python"
    python.parent.mkdir(parents=True, exist_ok=True)
    template = Path(os.environ["FAKE_STATE"]) / "fake_train"
    python.write_text(template.read_text())
    python.chmod(0o755)
'''

LSOF = RECORD + '''
from pathlib import Path
record("lsof", sys.argv[1:])
pids = Path(os.environ["FAKE_STATE"]) / "lsof_pids"
if pids.exists():
    print(pids.read_text().strip())
'''

RECORD_ONLY = RECORD + '''
record(os.path.basename(sys.argv[0]), sys.argv[1:])
sys.exit(int(os.environ.get("FAKE_" + os.path.basename(sys.argv[0]).upper() + "_RC", "0")))
'''

SUDO = '''#!/usr/bin/env bash
exec "$@"
'''

FAKE_TRAIN = '''#!/usr/bin/env bash
if [[ "${1:-}" == "--version" ]]; then echo "Python 3.11 (fake)"; exit 0; fi
printf '%s\\n' "$@" > "$HOME/train_args"
echo "JAX_PLATFORMS=${JAX_PLATFORMS:-}" > "$HOME/train_env"
echo "fake train started"
trap 'echo "preempted (SIGTERM): checkpoint saved"; exit 75' TERM
for ((i = 0; i < ${FAKE_TRAIN_TICKS:-5}; i++)); do sleep 0.1; done
echo "fake train finished"
exit "${FAKE_TRAIN_RC:-0}"
'''


def _write(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def install(root):
    """Writes the fakes into root/bin and returns (bin dir, state dir)."""
    bin_dir, state = Path(root) / "bin", Path(root) / "state"
    bin_dir.mkdir(parents=True)
    state.mkdir(parents=True)
    shebang = f"#!{sys.executable}\n"
    _write(bin_dir / "gcloud", shebang + GCLOUD)
    _write(bin_dir / "uv", shebang + UV)
    _write(bin_dir / "lsof", shebang + LSOF)
    for name in ("srun", "scontrol"):
        _write(bin_dir / name, shebang + RECORD_ONLY)
    _write(bin_dir / "sudo", SUDO)
    _write(state / "fake_train", FAKE_TRAIN)
    return bin_dir, state


def environment(bin_dir, state, **extra):
    """os.environ with the fakes first on PATH and FAKE_STATE set."""
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               FAKE_STATE=str(state))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def calls(state, prog=None):
    """The recorded calls, in order ([{"prog", "argv", "env"}]), of one program or all."""
    path = Path(state) / "calls.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if prog is None or r["prog"] == prog]
