#!/usr/bin/env bash
# Downloads the py3.12 wheels that a lent GPU machine's image lacked (2026-11-30: Python 3.12,
# jax 0.11.2 + CUDA 13, flax, optax, orbax already installed) into benchmarks/gpu_wheels/, a
# git-ignored folder carried to the device (`run` tool: carry=["benchmarks/gpu_wheels"], at most
# 64 MiB with the rest of what is carried). run_gpu.sh installs them there with
# `pip install --no-index --no-deps --target /tmp/site` when `import ml_collections, grain,
# tensorboardX` fails. Versions: those of this project's development venv. matplotlib and its
# dependencies (only for the results plots; the tables need none of them) are left out unless
# PLOTS=1.
#   bash benchmarks/gpu_wheels.sh            # 4.5 MiB (2026-12-02)
#   PLOTS=1 bash benchmarks/gpu_wheels.sh    # + matplotlib stack, ~30 MiB
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=benchmarks/gpu_wheels
PYTHON="${PYTHON:-python3}"
mkdir -p "$DEST"
PKGS=(ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
      tensorboardX==2.6.5)
if [[ "${PLOTS:-0}" == "1" ]]; then
  PKGS+=(matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0
         kiwisolver==1.5.1 pyparsing==3.3.3 python-dateutil==4.0.0 pillow==12.3.0)
fi
"$PYTHON" -m pip download --python-version 3.12 --only-binary=:all: --no-deps \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d "$DEST" "${PKGS[@]}"
du -sh "$DEST"
