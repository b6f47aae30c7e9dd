#!/usr/bin/env bash
# One 15-minute GPU window of the Fashion-MNIST GPU study (experiments/configs/fashion_mnist_gpu_study.py):
# trains the next cells that fit in BUDGET_S seconds (default 570, report included), writes the
# report over every finished cell, and puts results.tar.gz, results.md, timings.json,
# windows.jsonl and gpu_study.log into $OUT (5 files: within the device tool's 8). Resumable:
# each window starts from the cells committed under experiments/results/fashion_mnist_gpu_study/.
#
#   here, once (the GPU image lacks ml_collections and tensorboardX, and nothing can be fetched
#   there; .whl/ and .device_data/ are ignored by git):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0 tensorboardX==2.6.5
#     mkdir -p .device_data && cp -r ../shared/data/fashion-mnist .device_data/   # 30 MB, the IDX files
#   on the device (carry [".whl", ".device_data"], timeout_s 600):
#     bash experiments/gpu_study.sh
#   here, after the window (files_at: the folder the tool copied $OUT to), then commit the folder:
#     python -m experiments.gpu_study merge <files_at>/results.tar.gz
#   a CPU rehearsal of the same steps at tiny sizes (embedded data, results under runs/):
#     QUICK=1 OUT=/tmp/gpu_study bash experiments/gpu_study.sh
set -u
out=${OUT:-runs/gpu_study_out}
mkdir -p "$out"
python=${PYTHON:-python3}
if ! "$python" -c "import ml_collections, tensorboardX" 2> /dev/null && ls .whl/*.whl > /dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# The raw Fashion-MNIST files: CNN_DATA_DIR if set, else a shared/ folder in the checkout (it
# travels to the device), else the carried .device_data/.
if [ -z "${CNN_DATA_DIR:-}" ]; then
  for candidate in shared/data .device_data ../shared/data; do
    if [ -d "$candidate/fashion-mnist" ]; then export CNN_DATA_DIR=$PWD/$candidate; break; fi
  done
fi
args=(run --out "$out" --budget-s "${BUDGET_S:-570}")
if [ "${QUICK:-0}" = 1 ]; then args+=(--quick); fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "$python" -m experiments.gpu_study "${args[@]}" "$@"
