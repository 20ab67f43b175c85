#!/usr/bin/env bash
# One prepared GPU session (the device tool), in named parts; each fits in 6 minutes on one H200, installs
# included, and writes its results under $OUT:
#
#   bash experiments/gpu_check.sh bench      # train / eval step times, TTQ / FP, PyTorch, scaling, memory
#   bash experiments/gpu_check.sh protocol   # reproduce.py --table fashion_mnist_protocol --budget gpu
#   bash experiments/gpu_check.sh lm         # reproduce.py --table lm --budget gpu: a larger byte-level LM, 2 seeds
#   bash experiments/gpu_check.sh lm_study   # reproduce.py --table lm_study --budget gpu: the fine-tuning study, 1 seed
#
# GPU_CHECK_NO_WHEELS=1 leaves .whl/ alone (the suite runs `lm` in its tiny mode with its own environment).
# `lm` reads LM_BUDGET (gpu; tiny: the suite's CPU check of this entry point), LM_SEEDS, LM_ROWS, LM_WORKDIR;
# `lm_study` reads LM_BUDGET, LM_SEEDS (default 0) and LM_WORKDIR.
#
# The GPU image lacks some of our dependencies and has no data: prepare both here first with
# `bash experiments/gpu_carry.sh` (wheels into .whl/, Fashion-MNIST into .gpu_data/; both git-ignored,
# ~35 MiB) and name `.whl` and `.gpu_data` in the device call's `carry`.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PART=${1:-bench}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
case "$PART" in bench|protocol|lm|lm_study) ;; *) echo "gpu_check.sh: part '$PART' is unknown: allowed are bench, protocol, lm, lm_study" >&2; exit 2;; esac
if [ -z "${GPU_CHECK_NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then  # (the suite's CPU check: its own Python)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check.sh: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi -L 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
run() { local limit=$1; shift; echo "+ $*"; timeout "$limit" python3 "$@" 2>&1 | grep -vE '^(W|I)[0-9]{4} ' ; }

if [ "$PART" = bench ]; then
  run 90 experiments/benchmark.py --model resnet20 --batch_size 128 --compare-torch --steps 30 --json "$OUT/resnet20_f32.json" | tee "$OUT/log.txt"
  run 70 experiments/benchmark.py --model resnet20 --batch_size 128 --dtype bfloat16 --steps 30 --json "$OUT/resnet20_bf16.json" | tee -a "$OUT/log.txt"
  run 90 experiments/benchmark_scaling.py --steps 15 --json "$OUT/scaling.json" | tee -a "$OUT/log.txt"
  run 150 experiments/benchmark.py --model resnet20 --methods ttq --memory --steps 2 --json "$OUT/memory.json" | tee -a "$OUT/log.txt"
  timeout 40 python3 -m pytest -q -p no:cacheprovider tests/quant 2>&1 | tail -3 | tee -a "$OUT/log.txt"
fi

if [ "$PART" = protocol ]; then
  # 3 seeds: the FP checkpoints in parallel, then 15 fine-tunes in parallel (ResNet-20 steps are launch-bound,
  # so processes sharing the GPU overlap their launches). Workdirs on the machine's disk; the JSON to $OUT.
  [ -f .gpu_data/fashion-mnist/train-images-idx3-ubyte.gz ] && export TTQ_DATA_DIR=$PWD/.gpu_data/fashion-mnist
  timeout 330 python3 experiments/reproduce.py --table fashion_mnist_protocol --budget gpu --seeds 0,1,2 \
    --parallel 15 --workdir_root /tmp/protocol --results "$OUT/fashion_mnist_protocol_gpu.json" 2>&1 | tee "$OUT/log.txt"
  tail -n 40 /tmp/protocol/fashion_mnist_protocol/gpu/seed_0/ttq_max/run.log > "$OUT/ttq_max_seed0.log" 2>/dev/null
fi

if [ "$PART" = lm ]; then
  # FP, TTQ, BitNet from scratch and TTQ / BitNet fine-tuned from FP, 2 seeds, one learning rate (the CPU table's
  # choice, experiments/lm_table.py LEARNING_RATES['gpu']); the JSON is rewritten after every run, so a timeout
  # still leaves the finished runs under $OUT.
  [ -d .gpu_data/python_docs ] && export TTQ_TEXT_DIR=$PWD/.gpu_data/python_docs
  timeout 330 python3 experiments/reproduce.py --table lm --budget "${LM_BUDGET:-gpu}" --seeds "${LM_SEEDS:-0,1}" \
    --only "${LM_ROWS:-fp,ttq,bitnet,ttq_ft,bitnet_ft}" --workdir_root "${LM_WORKDIR:-/tmp/lm}" \
    --results "$OUT/lm_gpu.json" 2>&1 | grep -vE '^(W|I)[0-9]{4} |^step ' | tee "$OUT/log.txt"
  exit "${PIPESTATUS[0]}"
fi

if [ "$PART" = lm_study ]; then
  # One seed: its FP run (N = 600 steps) and six fine-tunes (M = 300) of lm_table's gpu model, each family at
  # configs/lm.py's rate (no choice). Sizing rule: 7 runs in 300 s, so ~40 s a run with compile and evaluations;
  # N = 2M as on the CPU budget. Measured on one H200: the 7 runs' own wall times 5.0 minutes, the part 315 s with
  # installs (experiments/results/h200/lm_study_gpu.json): at the limit, so N and M stay. The JSON is rewritten
  # after every run.
  [ -d .gpu_data/python_docs ] && export TTQ_TEXT_DIR=$PWD/.gpu_data/python_docs
  timeout 330 python3 experiments/reproduce.py --table lm_study --budget "${LM_BUDGET:-gpu}" --seeds "${LM_SEEDS:-0}" \
    --workdir_root "${LM_WORKDIR:-/tmp/lm}" --results "$OUT/lm_study_gpu.json" 2>&1 | grep -vE '^(W|I)[0-9]{4} |^step ' \
    | tee "$OUT/log.txt"
  exit "${PIPESTATUS[0]}"
fi
