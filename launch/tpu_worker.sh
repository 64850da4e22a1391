#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh: runs on every TPU VM of the slice (through
# `gcloud compute tpus tpu-vm ssh --worker=all`), from the shipped checkout in
# ~/hyperiqa_jax.
#
#   tpu_worker.sh setup                  install Python 3.11 (uv) and the project with
#                                        jax[tpu] pinned to constraints.txt, in ~/hyperiqa_venv
#   tpu_worker.sh start WORKDIR -- ARGS  stop a previous run and any process holding the
#                                        TPU, remove libtpu's lock file, then start
#                                        `python -m hyperiqa_jax.train ARGS` detached
#                                        (setsid nohup): it survives the ssh session
#   tpu_worker.sh follow                 print the log until the run ends; last line
#                                        "[tpu_worker] exit STATUS"
#   tpu_worker.sh status                 running / exit STATUS / not started
#   tpu_worker.sh stop [SECONDS]         SIGTERM to train (it checkpoints at the next step
#                                        boundary and exits 75), wait for it (600 s), else SIGKILL
#
# The run writes ~/hyperiqa_run/train.log and copies it to WORKDIR/logs/worker-N.log
# every minute and at the end (gcloud storage cp for gs://, cp otherwise), and its exit
# status to ~/hyperiqa_run/status. JAX_PLATFORMS=tpu: a TPU that cannot start is an
# error, never a silent run on the CPU.
#
# TPU devices and lock file (overridable for tests): HYPERIQA_TPU_DEVICES (default
# /dev/accel* /dev/vfio/[0-9]*), HYPERIQA_TPU_LOCKFILE (/tmp/libtpu_lockfile).

set -euo pipefail

code="$HOME/hyperiqa_jax"
venv="$HOME/hyperiqa_venv"
rundir="$HOME/hyperiqa_run"
log="$rundir/train.log"
uv_version=0.13.8
python_version=3.11
upload_every_s=${HYPERIQA_UPLOAD_EVERY_S:-60}

say() { echo "[tpu_worker $(hostname)] $*" >&2; }

worker_id() {
    # The worker's index in the slice (TPU metadata), else its host name.
    if [[ -n "${TPU_WORKER_ID:-}" ]]; then
        echo "$TPU_WORKER_ID"
    elif ! curl -sf -H Metadata-Flavor:Google \
            http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number; then
        hostname
    fi
}

find_uv() {
    if command -v uv >/dev/null; then command -v uv; return; fi
    if [[ -x "$HOME/.local/bin/uv" ]]; then echo "$HOME/.local/bin/uv"; return; fi
    return 1
}

setup() {
    # The images ship Python 3.10 (and may lack python3-venv); the project needs 3.11+.
    local uv
    if ! uv=$(find_uv); then
        say "installing uv $uv_version"
        python3 -m pip install -q --user "uv==$uv_version" \
            || curl -LsSf "https://astral.sh/uv/$uv_version/install.sh" | sh
        uv=$(find_uv)
    fi
    "$uv" python install "$python_version"
    if [[ ! -x "$venv/bin/python" ]]; then
        "$uv" venv --python "$python_version" "$venv"
    fi
    local jax_version
    jax_version=$(sed -n 's/^jax==//p' "$code/constraints.txt")
    if [[ -z "$jax_version" ]]; then
        say "error: constraints.txt pins no jax version"
        exit 2
    fi
    # constraints.txt: the versions the test suite passes with; gcsfs and
    # google-cloud-storage read and write gs:// (metrics, TensorBoard events).
    "$uv" pip install --python "$venv/bin/python" -c "$code/constraints.txt" \
        -e "$code" "jax[tpu]==$jax_version" gcsfs google-cloud-storage
    say "ready: $("$venv/bin/python" --version), jax $jax_version"
}

holders() {
    # Processes holding a TPU device file.
    local devices=()
    if [[ -n "${HYPERIQA_TPU_DEVICES:-}" ]]; then
        read -ra devices <<<"$HYPERIQA_TPU_DEVICES"
    else
        shopt -s nullglob
        devices=(/dev/accel* /dev/vfio/[0-9]*)
        shopt -u nullglob
    fi
    ((${#devices[@]})) || return 0
    sudo lsof -t "${devices[@]}" 2>/dev/null | sort -u || true
}

wait_gone() {  # PID SECONDS: 0 once the process is gone, 1 if still there
    local pid=$1 deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
}

free_tpu() {
    # A run of ours still going (a rerun after a lost connection, or -r on a busy
    # slice): SIGTERM first, so that it checkpoints.
    if [[ -f "$rundir/train.pid" ]] && kill -0 "$(cat "$rundir/train.pid")" 2>/dev/null; then
        stop 600
    fi
    local pid
    for pid in $(holders); do
        say "stopping process $pid, which holds the TPU: $(ps -o args= -p "$pid" || true)"
        sudo kill -TERM "$pid" 2>/dev/null || true
        wait_gone "$pid" 30 || sudo kill -KILL "$pid" 2>/dev/null || true
    done
    # libtpu leaves its lock behind when a process is killed; the next start then fails.
    sudo rm -f "${HYPERIQA_TPU_LOCKFILE:-/tmp/libtpu_lockfile}"
}

upload_log() {  # WORKDIR
    local dest
    dest="$1/logs/worker-$(worker_id).log"
    if [[ "$1" == gs://* ]]; then
        gcloud storage cp -q "$log" "$dest" >/dev/null 2>&1 \
            || say "could not copy the log to $dest"
    else
        mkdir -p "$1/logs" && cp "$log" "$dest"
    fi
}

start() {  # WORKDIR -- ARGS
    local workdir=$1
    shift
    [[ "${1:-}" == "--" ]] && shift
    free_tpu
    mkdir -p "$rundir"
    rm -f "$rundir/status" "$rundir/run.pid" "$rundir/train.pid"
    : >"$log"
    # A new session without a terminal: a dropped ssh connection (SIGHUP) cannot reach it.
    setsid nohup bash "$0" run "$workdir" -- "$@" </dev/null >>"$log" 2>&1 &
    echo "$!" >"$rundir/run.pid"
    say "started (pid $!); log $log, copied to $workdir/logs/"
}

run() {  # WORKDIR -- ARGS: the detached run itself
    local workdir=$1
    shift
    [[ "${1:-}" == "--" ]] && shift
    cd "$code"
    export JAX_PLATFORMS=tpu
    "$venv/bin/python" -m hyperiqa_jax.train "$@" >>"$log" 2>&1 &
    local train=$!
    echo "$train" >"$rundir/train.pid"
    (while sleep "$upload_every_s"; do upload_log "$workdir"; done) &
    local uploader=$!
    trap 'kill -TERM "$train" 2>/dev/null' TERM INT
    local rc=0
    while :; do
        rc=0
        wait "$train" || rc=$?
        kill -0 "$train" 2>/dev/null || break  # else a signal cut the wait short
    done
    kill "$uploader" 2>/dev/null || true
    echo "[tpu_worker] train exited with status $rc" >>"$log"
    upload_log "$workdir"
    echo "$rc" >"$rundir/status"
}

follow() {
    if [[ ! -f "$rundir/run.pid" ]]; then
        say "no run started here"
        exit 1
    fi
    tail -n +1 -F --pid="$(cat "$rundir/run.pid")" "$log" 2>/dev/null
    echo "[tpu_worker] exit $(cat "$rundir/status" 2>/dev/null || echo unknown)"
}

show_status() {
    if [[ -f "$rundir/status" ]]; then
        echo "[tpu_worker $(worker_id)] exit $(cat "$rundir/status")"
    elif [[ -f "$rundir/run.pid" ]] && kill -0 "$(cat "$rundir/run.pid")" 2>/dev/null; then
        echo "[tpu_worker $(worker_id)] running"
    else
        echo "[tpu_worker $(worker_id)] not started"
    fi
}

stop() {  # [SECONDS to wait for the checkpoint]
    local wait_s=${1:-600} pid
    if [[ ! -f "$rundir/train.pid" ]] || ! kill -0 "$(cat "$rundir/train.pid")" 2>/dev/null; then
        say "no run going"
        return 0
    fi
    pid=$(cat "$rundir/train.pid")
    say "SIGTERM to train (pid $pid): it checkpoints at the next step boundary"
    kill -TERM "$pid"
    if ! wait_gone "$pid" "$wait_s"; then
        say "still running after ${wait_s}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    if [[ -f "$rundir/run.pid" ]]; then
        wait_gone "$(cat "$rundir/run.pid")" 60 || true
    fi
    show_status
}

command=${1:-}
shift || true
case "$command" in
    setup | start | run | follow | stop) "$command" "$@" ;;
    status) show_status ;;
    *)
        sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
