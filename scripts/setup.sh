#!/usr/bin/env bash
# Create .venv and install secateurs with its test extras and the model zoos the tests prune
# (timm, segmentation_models_pytorch, ultralytics). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test,zoo]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import secateurs, torch, torchvision; print('secateurs', secateurs.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__)"
