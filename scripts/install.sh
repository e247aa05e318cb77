#!/usr/bin/env bash
# Sets up everything vqmoe-ds needs on a fresh Debian/Ubuntu machine: apt packages, a virtualenv in
# .venv with the pinned stack, and the package itself (editable). Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

need_apt=0
command -v mpirun >/dev/null 2>&1 || need_apt=1
command -v numactl >/dev/null 2>&1 || need_apt=1
[ -e /usr/include/x86_64-linux-gnu/mpi/mpi.h ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] || need_apt=1
if [ "$need_apt" = 1 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenmpi-dev openmpi-bin numactl >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first, pinned, so nothing later drags in a CUDA build.
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements.txt -r requirements-dev.txt
python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import torch, deepspeed, megatron.core, vqmoe_ds; print('vqmoe-ds environment ready: torch', torch.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | grep -v WARNING
