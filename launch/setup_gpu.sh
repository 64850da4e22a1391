#!/usr/bin/env bash
# Installs the project with the CUDA build of JAX for launch/gpu_slurm.sbatch: a virtual
# environment with `jax[cuda12]` at the jax version constraints.txt pins, and every other
# dependency at its pinned version.
#
#   launch/setup_gpu.sh [VENV]        # default .venv-gpu, in this checkout
#
# Run it once from the checkout on a file system the GPU nodes see (a login node is
# fine: the CUDA libraries come as wheels, no GPU is needed to install). The Makefile's
# .venv has the CPU-only jaxlib; a GPU job started with it would fail at start-up
# (the job script sets JAX_PLATFORMS=cuda), not train on the CPU.
#   PYTHON=python3.12 launch/setup_gpu.sh   interpreter (Python 3.11 or newer; default python3)
#   JAX_CUDA=cuda13 launch/setup_gpu.sh     the CUDA 13 build instead (jax[cuda13])
# Check on a GPU node afterwards:
#   srun -N1 --gpus=1 .venv-gpu/bin/python -c 'import jax; print(jax.devices())'

set -euo pipefail

cd "$(dirname "$0")/.."
venv=${1:-.venv-gpu}
python=${PYTHON:-python3}
cuda=${JAX_CUDA:-cuda12}

jax_version=$(sed -n 's/^jax==//p' constraints.txt)
if [[ -z "$jax_version" ]]; then
    echo "error: constraints.txt pins no jax version (make lock writes it)" >&2
    exit 2
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: $python is not Python 3.11 or newer (the project needs 3.11+): give one" \
        "with PYTHON=..., e.g. from \`module load python/3.11\`, or \`uv python install" \
        "3.11\` and PYTHON=\$(uv python find 3.11)" >&2
    exit 2
fi

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -c constraints.txt -e . "jax[$cuda]==$jax_version"
echo "installed jax[$cuda]==$jax_version into $venv; the job script uses it:" \
    "sbatch launch/gpu_slurm.sbatch CONFIG WORKDIR DATA_ROOT (PYTHON=$venv/bin/python" \
    "for another folder)"
