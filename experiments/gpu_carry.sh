#!/usr/bin/env bash
# Prepares what experiments/gpu_check.sh needs on the GPU machine and cannot fetch there (no network):
#   .whl/        wheels of our dependencies that its image lacks (CPython 3.12, manylinux x86-64)
#   .gpu_data/   the Fashion-MNIST IDX files and the python_docs corpus (Debian's python3-doc _sources, ~11 MB)
# Both are git-ignored; name them in the device call's `carry` (together 45 MiB measured, of the 64 MiB a call takes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p .whl .gpu_data/fashion-mnist
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  grain==0.2.18 array-record portpicker ml-collections tensorboardX simplejpeg
SRC=${TTQ_DATA_DIR:-/usr/share/datasets/fashion-mnist}
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  [ -f "$SRC/$f" ] || { echo "gpu_carry.sh: $SRC/$f is missing: install dataset-fashion-mnist or set TTQ_DATA_DIR" >&2; exit 2; }
  cp "$SRC/$f" .gpu_data/fashion-mnist/
done
DOCS=${TTQ_TEXT_DIR:-/usr/share/doc/python3/html/_sources}
if [ -d "$DOCS" ]; then
  rm -rf .gpu_data/python_docs && mkdir -p .gpu_data/python_docs && cp -r "$DOCS"/. .gpu_data/python_docs/
else
  echo "gpu_carry.sh: $DOCS is missing (apt-get install python3-doc): gpu_check.sh lm will have no corpus" >&2
fi
du -sh .whl .gpu_data
