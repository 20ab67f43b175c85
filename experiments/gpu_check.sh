#!/usr/bin/env bash
# One prepared GPU session (device tool): benchmarks + the quantizer tests on the GPU; results in $OUT.
# Wheels for packages the GPU image lacks travel in .whl/ (see README, "Benchmarks").
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
run() { echo "+ $*"; timeout 150 python3 "$@" 2>&1 | grep -vE '^(W|I)[0-9]{4} ' ; }
run experiments/benchmark.py --model resnet20 --batch_size 128 --compare-torch --steps 30 --json "$OUT/resnet20_f32.json" | tee "$OUT/log.txt"
run experiments/benchmark.py --model resnet20 --batch_size 128 --dtype bfloat16 --steps 30 --json "$OUT/resnet20_bf16.json" | tee -a "$OUT/log.txt"
run experiments/benchmark.py --model vit_small --dataset fashion_mnist --batch_size 128 --steps 30 --json "$OUT/vit_f32.json" | tee -a "$OUT/log.txt"
run experiments/benchmark_scaling.py --steps 15 --json "$OUT/scaling.json" | tee -a "$OUT/log.txt"
run experiments/benchmark.py --model resnet20 --methods ttq --memory --steps 2 --json "$OUT/memory.json" | tee -a "$OUT/log.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/quant 2>&1 | tail -3 | tee -a "$OUT/log.txt"
