#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create it, install the project on every worker,
# run the same `train` command on all workers, stream the logs, delete the slice.
#
#   launch/tpu_pod.sh -n hyperiqa-v4-32 -z us-central2-b -t v4-32 \
#       -w gs://BUCKET/runs/swin_base -d gs://BUCKET/koniq10k -c configs/base.py
#
# Options:
#   -n NAME      TPU (or queued resource) name            (required)
#   -z ZONE      zone                                     (required)
#   -t TYPE      accelerator type, e.g. v4-32, v5litepod-64 (required)
#   -w WORKDIR   gs:// workdir for checkpoints and logs   (required)
#   -d DATA      data root (gs:// or a path on every worker) (required)
#   -c CONFIG    config file                              (configs/base.py)
#   -v VERSION   TPU software version                     (tpu-ubuntu2204-base)
#   -q           queued resource (waits for capacity; spot unless -s is omitted)
#   -s           spot capacity (preemptible: training resumes from the workdir)
#   -k           keep the slice afterwards (default: delete it)
#   -r           reuse an existing slice (skip creation)
#   Extra arguments after -- go to `train`, e.g. -- --config.train.batch_size=256
#
# On TPU VMs hyperiqa_jax.distributed.initialize() finds the pod layout itself
# (jax.distributed.initialize() with no arguments); nothing else is set here.
# Preemption: the workers get SIGTERM, train saves a checkpoint at the next step
# boundary and exits; rerun this script with -r (or after recreating the slice)
# and the same -w to resume.

set -euo pipefail

name="" zone="" type="" workdir="" data="" config="configs/base.py"
version="tpu-ubuntu2204-base" queued=0 spot=0 keep=0 reuse=0
while getopts "n:z:t:w:d:c:v:qskrh" opt; do
    case "$opt" in
        n) name=$OPTARG ;;
        z) zone=$OPTARG ;;
        t) type=$OPTARG ;;
        w) workdir=$OPTARG ;;
        d) data=$OPTARG ;;
        c) config=$OPTARG ;;
        v) version=$OPTARG ;;
        q) queued=1 ;;
        s) spot=1 ;;
        k) keep=1 ;;
        r) reuse=1 ;;
        h) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
for var in name zone type workdir data; do
    if [[ -z "${!var}" ]]; then
        echo "missing -${var:0:1} (${var}); see $0 -h" >&2
        exit 2
    fi
done

repo_root=$(cd "$(dirname "$0")/.." && pwd)
tpu=(gcloud compute tpus tpu-vm)
on_all() {
    "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="$1"
}

cleanup() {
    if ((keep == 0)); then
        echo "[tpu_pod] deleting $name" >&2
        if ((queued)); then
            gcloud compute tpus queued-resources delete "$name" --zone="$zone" --force --quiet \
                || true
        else
            "${tpu[@]}" delete "$name" --zone="$zone" --quiet || true
        fi
    fi
}

if ((reuse == 0)); then
    if ((queued)); then
        extra=()
        ((spot)) && extra+=(--spot)
        gcloud compute tpus queued-resources create "$name" --node-id="$name" --zone="$zone" \
            --accelerator-type="$type" --runtime-version="$version" "${extra[@]}"
        echo "[tpu_pod] waiting for the queued resource to become ACTIVE" >&2
        until gcloud compute tpus queued-resources describe "$name" --zone="$zone" \
                --format='value(state.state)' | grep -q ACTIVE; do
            sleep 30
        done
    else
        extra=()
        ((spot)) && extra+=(--spot)
        "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$type" \
            --version="$version" "${extra[@]}"
    fi
fi
trap cleanup EXIT

# Install: copy this checkout to every worker and install it with the TPU JAX wheels.
tarball=$(mktemp --suffix=.tar.gz)
git -C "$repo_root" archive --format=tar.gz -o "$tarball" HEAD
"${tpu[@]}" scp "$tarball" "$name:~/hyperiqa_jax.tar.gz" --zone="$zone" --worker=all
rm -f "$tarball"
on_all 'set -e; mkdir -p ~/hyperiqa_jax && tar -xzf ~/hyperiqa_jax.tar.gz -C ~/hyperiqa_jax
  cd ~/hyperiqa_jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip
  .venv/bin/pip install -q "jax[tpu]" -e . gcsfs'

# Run the same command on every worker; ssh streams every worker's output here,
# each line prefixed by the worker. process 0 writes metrics, TensorBoard and
# summary.json into the workdir; Orbax writes each checkpoint from all workers.
args=("--config=$config" "--workdir=$workdir" "--config.data.root=$data" "$@")
printf -v quoted '%q ' "${args[@]}"
on_all "cd ~/hyperiqa_jax && .venv/bin/python -m hyperiqa_jax.train $quoted 2>&1"
