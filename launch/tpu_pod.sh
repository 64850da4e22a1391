#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create it (or a queued resource), install the project
# on every worker, start the same `train` command on all of them detached from this
# terminal, follow worker 0's log until the run ends, then delete the slice.
#
#   launch/tpu_pod.sh -n iqa-v5e -z us-west4-a -t v5litepod-16 -q -s \
#       -w gs://BUCKET/runs/swin_base -d gs://BUCKET/koniq10k -c configs/base.py \
#       -- --config.pretrained_backbone=gs://BUCKET/weights/swin_base_patch4_window7_224
#
# Options:
#   -n NAME      TPU (and queued resource) name                               (required)
#   -z ZONE      zone                                                         (required)
#   -t TYPE      accelerator type: v4-32, v5litepod-16, v5p-32, v6e-16, ...   (required)
#   -w WORKDIR   gs:// workdir: checkpoints, metrics, TensorBoard, logs/      (required)
#   -d DATA      gs:// data root                                              (required)
#   -c CONFIG    config file in this checkout                       (configs/base.py)
#   -v VERSION   TPU software version (default from the type: v2/v3/v4 tpu-ubuntu2204-base,
#                v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
#   -q           queued resource: wait for capacity, at most -W minutes
#   -W MINUTES   how long to wait for the queued resource                     (120)
#   -s           spot capacity (preemptible: rerun to resume from the workdir)
#   -k           keep the slice after the run (default: delete a slice this script created)
#   -r           reuse an existing slice; it is never deleted here
#   -x           start the run and return at once (the slice is kept; see tpu_ctl.sh)
#   -m           paths that are not gs:// are mounted at the same path on every worker
#   Arguments after -- go to `train`, e.g. -- --config.train.batch_size=256
#
# Follow, stop or delete a run from any terminal with launch/tpu_ctl.sh. Closing this
# terminal or losing the connection does not stop the run (it runs under setsid on
# the workers, logging to WORKDIR/logs/worker-N.log); the slice is then kept.
# Exit status: train's on worker 0 (0 finished, 75 preempted with a checkpoint saved:
# rerun the same command, with -r if the slice still exists), 1 when the slice could
# not be had, 2 for a usage error. On TPU VMs hyperiqa_jax.distributed.initialize()
# finds the pod layout itself (jax.distributed.initialize() with no arguments).

set -euo pipefail

usage() { sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; }
die() {
    echo "[tpu_pod] error: $*" >&2
    exit 2
}

name="" zone="" type="" workdir="" data="" config="configs/base.py" version=""
queued=0 wait_min=120 spot=0 keep=0 reuse=0 detach=0 mounted=0
while getopts "n:z:t:w:d:c:v:qW:skrxmh" opt; do
    case "$opt" in
        n) name=$OPTARG ;;
        z) zone=$OPTARG ;;
        t) type=$OPTARG ;;
        w) workdir=$OPTARG ;;
        d) data=$OPTARG ;;
        c) config=$OPTARG ;;
        v) version=$OPTARG ;;
        q) queued=1 ;;
        W) wait_min=$OPTARG ;;
        s) spot=1 ;;
        k) keep=1 ;;
        r) reuse=1 ;;
        x) detach=1 ;;
        m) mounted=1 ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
for var in name zone type workdir data; do
    [[ -n "${!var}" ]] || die "missing -${var:0:1} (${var}); see $0 -h"
done
[[ "$wait_min" =~ ^[0-9]+$ ]] || die "-W takes whole minutes, got '$wait_min'"

# The software version per generation: https://cloud.google.com/tpu/docs/runtimes
if [[ -z "$version" ]]; then
    case "$type" in
        v2-* | v3-* | v4-*) version="tpu-ubuntu2204-base" ;;
        v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
        v5p-*) version=v2-alpha-tpuv5 ;;
        v6e-*) version=v2-alpha-tpuv6e ;;
        *) die "no default software version for -t $type: give one with -v" ;;
    esac
fi

repo_root=$(cd "$(dirname "$0")/.." && pwd)
[[ "$config" != /* && -f "$repo_root/$config" ]] \
    || die "-c $config: give a config file of this checkout, relative to its root" \
        "(e.g. configs/base.py): the workers get the checkout, nothing else"
local_python=${PYTHON:-}
if [[ -z "$local_python" ]]; then
    if [[ -x "$repo_root/.venv/bin/python" ]]; then
        local_python="$repo_root/.venv/bin/python"
    else
        local_python=python3
    fi
fi
if ((mounted == 0)); then
    (cd "$repo_root" && "$local_python" launch/remote_paths.py "$config" "$workdir" "$data" \
        "$@") || exit 2
fi

# What ships: the files git tracks, as they are on disk (uncommitted edits included);
# untracked ones (weights/, data, runs/) stay here.
git -C "$repo_root" ls-files --error-unmatch -- "$config" >/dev/null 2>&1 \
    || die "-c $config is not tracked by git, so it would not reach the workers:" \
        "git add it first"
tarball=$(mktemp --suffix=.tar.gz)
(cd "$repo_root" && git ls-files -z --cached \
    | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
    | tar --null -T - -czf "$tarball")
untracked=$(git -C "$repo_root" ls-files --others --exclude-standard | wc -l)
echo "[tpu_pod] shipping the $(tar -tzf "$tarball" | wc -l) files git tracks in" \
    "$repo_root ($untracked untracked file(s) stay here)" >&2

tpu=(gcloud compute tpus tpu-vm)
worker_script="bash ~/hyperiqa_jax/launch/tpu_worker.sh"
on_workers() {  # WORKER COMMAND
    "${tpu[@]}" ssh "$name" --zone="$zone" --worker="$1" --command="$2"
}

# phase: setup (delete what was created here on exit), running (never delete: the
# run goes on without this terminal), done (delete unless -k).
phase=setup created=0
# shellcheck disable=SC2329  # called by the EXIT trap
on_exit() {
    local rc=$?
    rm -f "$tarball"
    if [[ "$phase" == running ]]; then
        echo "[tpu_pod] the run goes on on $name; follow: launch/tpu_ctl.sh -n $name" \
            "-z $zone logs; stop (checkpoint, then exit): launch/tpu_ctl.sh -n $name" \
            "-z $zone stop; delete the slice: launch/tpu_ctl.sh -n $name -z $zone" \
            "$( ((queued)) && echo '-q ')delete" >&2
    elif ((created && keep == 0)); then
        echo "[tpu_pod] deleting $name" >&2
        if ((queued)); then
            gcloud compute tpus queued-resources delete "$name" --zone="$zone" --force \
                --quiet || true
        else
            "${tpu[@]}" delete "$name" --zone="$zone" --quiet || true
        fi
    elif ((created)); then
        echo "[tpu_pod] keeping $name (-k); delete it with launch/tpu_ctl.sh -n $name" \
            "-z $zone $( ((queued)) && echo '-q ')delete" >&2
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

wait_active() {
    # Ends on ACTIVE; fails on FAILED / SUSPENDING / SUSPENDED / DELETING (states of
    # https://cloud.google.com/tpu/docs/reference/rest/v2/projects.locations.queuedResources)
    # or after -W minutes.
    local deadline=$((SECONDS + 60 * wait_min)) state
    while :; do
        state=$(gcloud compute tpus queued-resources describe "$name" --zone="$zone" \
            --format='value(state.state)' || echo "UNREADABLE")
        case "$state" in
            ACTIVE) return 0 ;;
            FAILED | SUSPENDING | SUSPENDED | DELETING)
                echo "[tpu_pod] queued resource $name is $state: giving up" \
                    "(gcloud compute tpus queued-resources describe $name --zone=$zone" \
                    "says why)" >&2
                return 1
                ;;
        esac
        if ((SECONDS >= deadline)); then
            echo "[tpu_pod] queued resource $name still $state after $wait_min minute(s):" \
                "giving up (-W sets the wait)" >&2
            return 1
        fi
        echo "[tpu_pod] queued resource $name: $state" >&2
        sleep "${TPU_POD_POLL_S:-30}"
    done
}

if ((reuse == 0)); then
    extra=()
    ((spot)) && extra+=(--spot)
    created=1  # from here on an interrupted start deletes what it asked for
    if ((queued)); then
        gcloud compute tpus queued-resources create "$name" --node-id="$name" \
            --zone="$zone" --accelerator-type="$type" --runtime-version="$version" \
            "${extra[@]}"
        echo "[tpu_pod] waiting for $name to become ACTIVE (at most $wait_min min)" >&2
        wait_active || exit 1
    else
        "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$type" \
            --version="$version" "${extra[@]}"
    fi
fi

# Install: the code replaces ~/hyperiqa_jax (a run still going there from an earlier
# launch is stopped first, with SIGTERM: it checkpoints); the environment
# (~/hyperiqa_venv) is reused.
"${tpu[@]}" scp "$tarball" "$name:~/hyperiqa_jax.tar.gz" --zone="$zone" --worker=all
on_workers all "set -e
  if [ -f ~/hyperiqa_jax/launch/tpu_worker.sh ]; then $worker_script stop; fi
  rm -rf ~/hyperiqa_jax; mkdir -p ~/hyperiqa_jax
  tar -xzf ~/hyperiqa_jax.tar.gz -C ~/hyperiqa_jax; $worker_script setup"

# Start the same command on every worker, detached. Process 0 writes metrics,
# TensorBoard and summary.json into the workdir; Orbax writes checkpoints from all.
args=("--config=$config" "--workdir=$workdir" "--config.data.root=$data" "$@")
printf -v quoted '%q ' "${args[@]}"
printf -v workdir_q '%q' "$workdir"
phase=running
on_workers all "$worker_script start $workdir_q -- $quoted"
if ((detach)); then
    exit 0
fi

# Follow worker 0 until its run ends; a dropped connection is retried, the run itself
# is not touched by it.
follow_log=$(mktemp)
status=""
for attempt in 1 2 3 4 5; do
    if on_workers 0 "$worker_script follow" | tee "$follow_log"; then :; fi
    status=$(sed -n 's/^\[tpu_worker\] exit //p' "$follow_log" | tail -n 1)
    [[ -n "$status" ]] && break
    echo "[tpu_pod] lost the log stream (attempt $attempt of 5); the run is not affected" >&2
    sleep "${TPU_POD_POLL_S:-30}"
done
rm -f "$follow_log"
[[ "$status" =~ ^[0-9]+$ ]] || exit 1  # on_exit says how to follow, stop and delete
on_workers all "$worker_script status" || true
phase="done"
case "$status" in
    0) echo "[tpu_pod] training finished" >&2 ;;
    75) echo "[tpu_pod] preempted: checkpoint saved in $workdir; rerun the same command" \
        "(with -r if $name still exists) to resume" >&2 ;;
    *) echo "[tpu_pod] train exited with status $status; logs in $workdir/logs/" >&2 ;;
esac
exit "$status"
