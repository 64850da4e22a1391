r"""kill -9 trials: a run killed at random moments resumes and ends equal to an uninterrupted run.

    python -m tests.multihost_trials --trials=10 --out=/tmp/trials   # a few minutes

Each trial starts tests/multihost_train.py (a checkpoint every step), kills it
with SIGKILL at a random moment (--kill_window seconds after start), checks
that the newest checkpoint Orbax reports is complete (it restores), reruns the
same command to the end and compares the final parameters and optimiser state
with an uninterrupted reference run.
With --processes=2 the runs go through launch/local_cluster.sh (2 x 2 devices;
one process is killed, the launcher stops the other); the default is one
process x 4 devices, which a persistent compilation cache makes fast enough.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def command(args, workdir):
    train = ["-m", "tests.multihost_train", f"--workdir={workdir}",
             f"--data_root={args.out}/data", f"--steps={args.steps}", "--checkpoint_every=1",
             f"--step_sleep={args.step_sleep}"]
    if args.processes > 1:
        return ["launch/local_cluster.sh", "-n", str(args.processes), "-d", "2", "-t", "600",
                "-l", f"{workdir}/logs", "--", "python", *train]
    return [sys.executable, *train, f"--emulate_processes={2}"]


def environment(args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    if args.processes == 1:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        env.update(JAX_COMPILATION_CACHE_DIR=f"{args.out}/jax_cache",
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env


def run(args, workdir, kill_after=None):
    """Runs to the end, or SIGKILLs one training process after `kill_after` seconds."""
    log = open(Path(workdir).with_suffix(".log"), "a")
    p = subprocess.Popen(command(args, workdir), cwd=REPO, env=environment(args), stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    if kill_after is None:
        return p.wait(timeout=900)
    try:
        return p.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        pass
    victim = p.pid
    if args.processes > 1:  # one training process, not the launcher
        out = subprocess.run(["pgrep", "-f", f"workdir={workdir}", "-P", str(p.pid)],
                             capture_output=True, text=True).stdout.split()
        victim = int(out[-1]) if out else p.pid
    os.kill(victim, signal.SIGKILL)
    rc = p.wait(timeout=120)
    return rc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--step_sleep", type=float, default=0.5)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--out", default="/tmp/hyperiqa_trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill_window", type=float, nargs=2, default=(8.0, 25.0),
                        help="seconds after start; a warm run here takes about 25-30 s")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.multihost_train import read_state

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    ref_dir = out / "reference"
    if not (ref_dir / "summary.json").exists():
        shutil.rmtree(ref_dir, ignore_errors=True)
        assert run(args, ref_dir) == 0, f"reference run failed, see {ref_dir}.log"
    _, ref = read_state(ref_dir)
    results = []
    for trial in range(args.trials):
        workdir = out / f"trial_{trial}"
        shutil.rmtree(workdir, ignore_errors=True)
        Path(workdir).with_suffix(".log").unlink(missing_ok=True)
        kill_after = rng.uniform(*args.kill_window)
        t = time.time()
        rc = run(args, workdir, kill_after)
        killed_at = None
        if (workdir / "checkpoints").exists():
            try:
                killed_at, _ = read_state(workdir)  # the newest checkpoint must restore
            except Exception as e:  # noqa: BLE001  (recorded as a failed trial)
                killed_at = f"unreadable: {e}"
        # Orbax writes into a temporary folder and renames it when complete: a kill
        # during a save leaves such a folder, which must never be resumed from.
        partial = [p.name for p in (workdir / "checkpoints").glob("*tmp*")] \
            if (workdir / "checkpoints").exists() else []
        rc2 = run(args, workdir)
        found = re.findall(r"Resumed from \S+ at step (\d+)",
                           Path(workdir).with_suffix(".log").read_text(errors="replace"))
        resumed_from = int(found[-1]) if found else None
        step, final = read_state(workdir)
        diff = max(float(np.max(np.abs(final[k] - ref[k]))) for k in ref)
        ok = (rc != 0 and rc2 == 0 and step == args.steps and diff <= 1e-5
              and resumed_from == killed_at and not isinstance(killed_at, str))
        results.append(dict(trial=trial, kill_after_s=round(kill_after, 1), killed_rc=rc,
                            latest_step_after_kill=killed_at, partial_folders=partial,
                            resumed_from=resumed_from, resumed_rc=rc2, final_step=step,
                            max_abs_diff=diff, ok=ok, seconds=round(time.time() - t, 1)))
        print(json.dumps(results[-1]), flush=True)
    passed = sum(r["ok"] for r in results)
    print(f"{passed}/{len(results)} trials resumed and matched the uninterrupted run", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
