#!/usr/bin/env bash
# A multi-process JAX cluster on this machine: N processes x M fake CPU devices on loopback.
#
#   launch/local_cluster.sh                       # 2 x 2, trains configs/demo.py in runs/local_cluster
#   launch/local_cluster.sh -n 4 -d 1 -- python -m hyperiqa_jax.train \
#       --config=configs/demo.py --workdir=runs/demo4 --config.train.max_steps=20
#
# Every process runs the same command with JAX_COORDINATOR_ADDRESS (127.0.0.1:PORT),
# JAX_NUM_PROCESSES and JAX_PROCESS_ID set, which hyperiqa_jax.distributed.initialize()
# reads, and JAX_NUM_CPU_DEVICES (its fake CPU devices). Process i logs to
# LOGDIR/process_i.log; process 0 is also shown here.
# When one process fails, the others are stopped (a dead peer would otherwise leave
# them waiting in a collective); -t bounds the whole run. SIGTERM or Ctrl-C to this
# script is passed to every process: training saves a checkpoint and exits with 75,
# as on a preempted pod (75 is not a failure: the others are left to finish their
# save). Exit status: 0, the first failing process's status, 75 when stopped after a
# checkpoint, or 124 on timeout.

set -u

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    echo "options: -n PROCESSES (2) -d DEVICES_PER_PROCESS (2) -p PORT (free one)"
    echo "         -l LOGDIR (runs/local_cluster_logs) -t TIMEOUT_SECONDS (0 = none)"
}

processes=2
devices=2
port=""
logdir="runs/local_cluster_logs"
timeout_s=0
while getopts "n:d:p:l:t:h" opt; do
    case "$opt" in
        n) processes=$OPTARG ;;
        d) devices=$OPTARG ;;
        p) port=$OPTARG ;;
        l) logdir=$OPTARG ;;
        t) timeout_s=$OPTARG ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift

python=${PYTHON:-}
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
if (($# == 0)); then
    set -- "$python" -m hyperiqa_jax.train --config=configs/demo.py --workdir=runs/local_cluster
elif [[ "$1" == "python" || "$1" == "python3" ]]; then
    shift
    set -- "$python" "$@"
fi
if [[ -z "$port" ]]; then
    # Let the kernel pick a free loopback port.
    port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
mkdir -p "$logdir"

pids=()
for ((i = 0; i < processes; i++)); do
    log="$logdir/process_$i.log"
    if ((i == 0)); then
        JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" \
            JAX_NUM_PROCESSES="$processes" JAX_PROCESS_ID="$i" JAX_NUM_CPU_DEVICES="$devices" \
            "$@" > >(tee "$log") 2>&1 &
    else
        JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" \
            JAX_NUM_PROCESSES="$processes" JAX_PROCESS_ID="$i" JAX_NUM_CPU_DEVICES="$devices" \
            "$@" > "$log" 2>&1 &
    fi
    pids+=("$!")
done
echo "${pids[*]}" > "$logdir/pids"  # for tests and tools that signal one process
echo "[local_cluster] $processes process(es) x $devices device(s) on 127.0.0.1:$port;" \
    "pids ${pids[*]}; logs in $logdir" >&2

signal_all() {
    for pid in "${pids[@]}"; do
        [[ -n "$pid" ]] && kill "-$1" "$pid" 2>/dev/null
    done
}
trap 'echo "[local_cluster] signal received: SIGTERM to every process" >&2; signal_all TERM' \
    TERM INT

preempted=75  # train's exit status after a SIGTERM checkpoint (hyperiqa_jax.train)
status=0
stopped=0
start=$SECONDS
while :; do
    running=0
    for i in "${!pids[@]}"; do
        pid=${pids[$i]}
        [[ -z "$pid" ]] && continue
        if kill -0 "$pid" 2>/dev/null; then
            running=$((running + 1))
            continue
        fi
        wait "$pid"
        rc=$?
        pids[i]=""
        if ((rc == preempted)); then
            stopped=1
        elif ((rc != 0 && status == 0)); then
            status=$rc
            echo "[local_cluster] process $i exited with status $rc: stopping the others" \
                "(see $logdir/process_$i.log)" >&2
            signal_all TERM
            sleep 5
            signal_all KILL
        fi
    done
    ((running == 0)) && break
    if ((timeout_s > 0 && SECONDS - start > timeout_s && status == 0)); then
        status=124
        echo "[local_cluster] timed out after ${timeout_s}s (a hung or missing peer?):" \
            "killing every process; logs in $logdir" >&2
        signal_all KILL
    fi
    sleep 0.5
done
wait  # the tee of process 0
if ((status == 0 && stopped)); then
    status=$preempted
fi
exit "$status"
