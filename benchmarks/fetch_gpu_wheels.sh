#!/usr/bin/env bash
# Downloads benchmarks/gpu_wheels.txt as wheels for the GPU machine (CPython 3.12, manylinux
# x86-64) into .whl/ (git-ignored), then checks the set: one version each, every Requires-Dist
# listed or preinstalled there, the size, and (where a Python 3.12 pip is at hand, or through
# pip's cross-version --target install) that they install.
#
#   bash benchmarks/fetch_gpu_wheels.sh          # PYTHON=python3, DEST=.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=${DEST:-.whl}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
TARGET=(--python-version 3.12 --implementation cp "${PLATFORMS[@]}")

# A fresh folder, so no stale second version of a package survives.
new="$DEST.new"
rm -rf "$new"
mkdir -p "$new"
while read -r line; do
  req=${line%%#*}
  req=${req//[[:space:]]/}
  [[ -z $req ]] && continue
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$new" "$req"
done < benchmarks/gpu_wheels.txt
rm -rf "$DEST"
mv "$new" "$DEST"

"$PYTHON" -m benchmarks.gpu_check --check_wheels "$DEST"

# The install line gpu_check.sh runs there, for CPython 3.12, into a throw-away target.
site=$(mktemp -d)
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --only-binary=:all: "${TARGET[@]}" --target "$site" "$DEST"/*.whl
echo "installed into a temporary --target: $(ls "$site" | grep -vc dist-info) packages"
rm -rf "$site"
