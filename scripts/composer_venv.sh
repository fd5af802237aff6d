#!/usr/bin/env bash
# Build .venv-composer: Composer (PyPI mosaicml) on this project's torch, for
# tests/test_integration_composer.py. mosaicml 0.32.1 pins torch<2.7.1 but imports
# and trains with torch 2.13, so it is installed with --no-deps and then only the
# runtime dependencies its imports need (found by trying; versions in
# docs/integrations.md).
#
#   scripts/composer_venv.sh [VENV]      default VENV=.venv-composer
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-composer}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.composer-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt "$0" ] && [ "$STAMP" -nt constraints.txt ]; then
    exit 0
fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" --no-deps mosaicml==0.32.1
"${PIP[@]}" numpy requests tqdm py-cpuinfo importlib-metadata psutil pyyaml coolname mosaicml-cli==0.8.3 \
    "torchmetrics==1.9.0" "torchvision==0.28.0" pillow pytest
"${PIP[@]}" --no-deps -e .

# PyPI's torchvision wheels are CUDA builds: their C++ ops cannot load against the
# CPU torch, and torchvision 0.28 then fails at import registering fake kernels for
# two ops that were never defined. Composer needs only torchvision's Python parts
# (transforms, dataset base classes), so define those two op schemas (no kernels)
# before torchvision imports; calling torchvision.ops.nms would still raise.
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat > "$SITE/_layerfreeze_torchvision_schemas.py" <<'PY'
import torch

_lib = torch.library.Library("torchvision", "FRAGMENT")
for _op in ("nms", "qnms"):
    _lib.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
PY
echo "import _layerfreeze_torchvision_schemas" > "$SITE/_layerfreeze_torchvision_schemas.pth"

"$VENV/bin/python" -c "import composer, composer.algorithms, layerfreeze; print('composer', composer.__version__)"
touch "$STAMP"
