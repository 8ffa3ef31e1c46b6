#!/usr/bin/env bash
# Install detectron2 into the given Python environment.
#
# - If `import detectron2` already works (for instance a user's own CUDA source build), keep it.
# - Otherwise install the pinned upstream snapshot wheel `sal-detectron2==0.7.2` (pure Python
#   detectron2 at upstream commit a59f0563), after checking its sha256, plus the runtime
#   requirements it fails to declare (requirements-detectron2.txt).
#
# Usage: scripts/install_detectron2.sh PYTHON [WHEEL]
#   PYTHON  the interpreter of the target environment (e.g. .venv/bin/python)
#   WHEEL   optional path to an already downloaded wheel file (skips the download); also read
#           from $NFDET_DETECTRON2_WHEEL. Its sha256 is checked before anything is installed.
set -euo pipefail

PY=${1:?usage: install_detectron2.sh PYTHON [WHEEL]}
WHEEL=${2:-${NFDET_DETECTRON2_WHEEL:-}}
HERE=$(cd "$(dirname "$0")/.." && pwd)
D2_VERSION=0.7.2
D2_SHA256=491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561

if "$PY" -c "import detectron2, detectron2.modeling" >/dev/null 2>&1; then
  echo "detectron2 already importable ($("$PY" -c 'import detectron2; print(detectron2.__version__, detectron2.__file__)')): keeping it."
  exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if [ -z "$WHEEL" ]; then
  echo "Downloading sal-detectron2==$D2_VERSION (upstream detectron2 snapshot) ..."
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
    -d "$TMP" "sal-detectron2==$D2_VERSION"
  WHEEL=$(ls "$TMP"/sal_detectron2-*.whl 2>/dev/null | head -n 1 || true)
fi
if [ -z "$WHEEL" ] || [ ! -f "$WHEEL" ]; then
  echo "ERROR: detectron2 wheel not found (${WHEEL:-download produced no sal_detectron2-*.whl})." >&2
  echo "       Setup stops here; nothing was installed for detectron2." >&2
  exit 1
fi
GOT=$(sha256sum "$WHEEL" | cut -d' ' -f1)
if [ "$GOT" != "$D2_SHA256" ]; then
  echo "ERROR: sha256 mismatch for detectron2 wheel $WHEEL" >&2
  echo "       expected $D2_SHA256" >&2
  echo "       got      $GOT" >&2
  echo "       The file is corrupted or not the pinned sal-detectron2==$D2_VERSION; refusing to install it." >&2
  exit 1
fi

echo "Installing detectron2's runtime requirements ..."
"$PY" -m pip install -q -r "$HERE/requirements-detectron2.txt"

SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "Installing $(basename "$WHEEL") (sha256 ok) into $SITE ..."
# The wheel is tagged cp310 but is pure Python apart from a _C extension that 3.11 never loads.
# pip only accepts --python-version together with --target.
"$PY" -m pip install -q --no-deps --target "$TMP/site" --python-version 3.10 \
  --only-binary=:all: "$WHEEL"
# Copy detectron2 only: the wheel's top-level `tools` package would shadow our tools/ folder,
# and its compiled _C (cp310) can never load on this Python.
rm -f "$TMP"/site/detectron2/_C*.so
cp -r "$TMP/site/detectron2" "$SITE/"
cp -r "$TMP"/site/sal_detectron2-*.dist-info "$SITE/"
"$PY" -c "import detectron2, detectron2.modeling; print('detectron2', detectron2.__version__, 'installed')"
