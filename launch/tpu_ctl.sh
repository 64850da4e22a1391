#!/usr/bin/env bash
# Follow, stop or delete a run that launch/tpu_pod.sh started, from any terminal.
#
#   launch/tpu_ctl.sh -n NAME -z ZONE logs [WORKER]   follow a worker's log (0) until the
#                                                     run ends (Ctrl-C only stops following)
#   launch/tpu_ctl.sh -n NAME -z ZONE status          each worker: running / exit STATUS
#   launch/tpu_ctl.sh -n NAME -z ZONE stop            SIGTERM on every worker: train saves a
#                                                     checkpoint and exits 75; waits for it
#   launch/tpu_ctl.sh -n NAME -z ZONE [-q] delete     delete the slice (-q: the queued
#                                                     resource with it)
#
# The logs are also copied to WORKDIR/logs/worker-N.log every minute
# (gcloud storage cat gs://BUCKET/runs/NAME/logs/worker-0.log).

set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

name="" zone="" queued=0
while getopts "n:z:qh" opt; do
    case "$opt" in
        n) name=$OPTARG ;;
        z) zone=$OPTARG ;;
        q) queued=1 ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [[ -z "$name" || -z "$zone" || $# -eq 0 ]]; then
    usage >&2
    exit 2
fi

tpu=(gcloud compute tpus tpu-vm)
worker_script="bash ~/hyperiqa_jax/launch/tpu_worker.sh"
case "$1" in
    logs)
        worker=${2:-0}
        [[ "$worker" =~ ^[0-9]+$ ]] || { echo "logs takes a worker number" >&2; exit 2; }
        "${tpu[@]}" ssh "$name" --zone="$zone" --worker="$worker" \
            --command="$worker_script follow"
        ;;
    status | stop)
        "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="$worker_script $1"
        ;;
    delete)
        if ((queued)); then
            gcloud compute tpus queued-resources delete "$name" --zone="$zone" --force --quiet
        else
            "${tpu[@]}" delete "$name" --zone="$zone" --quiet
        fi
        ;;
    *)
        usage >&2
        exit 2
        ;;
esac
