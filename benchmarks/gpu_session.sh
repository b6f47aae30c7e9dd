#!/usr/bin/env bash
# The prepared run for a lent GPU machine: the GPU measurements of benchmarks/RESULTS.md in one
# command whose step limits add up to 9 minutes (on an H200 on 2026-11-26: gpu.py 2.5 min,
# memory.py 25 s, train_step.py 49 s, plus a minute or two to start the machine). Records (JSON +
# Markdown) and one log go to $OUT (default runs/gpu_session): 7 files, within the device tool's 8.
#
#   here, once (the GPU image lacks ml_collections and nothing can be fetched there; .whl/ is ignored):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0
#   on the device (carry [".whl"], timeout_s 600):  bash benchmarks/gpu_session.sh
#   a CPU rehearsal of the same steps at tiny sizes:  QUICK=1 OUT=/tmp/gpu_session bash benchmarks/gpu_session.sh
set -u
out=${OUT:-runs/gpu_session}
mkdir -p "$out"
log="$out/session.log"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
quick=()
if [ "${QUICK:-0}" = 1 ]; then quick=(--quick); fi
"$python" -c "import jax, flax, optax, ml_collections; print('devices:', jax.devices())" 2>&1 | tee "$log" || exit 1

step() {  # step LIMIT_SECONDS NAME COMMAND...: run, log, print the end of the output
  local limit=$1 name=$2
  shift 2
  echo "=== $name (limit ${limit} s): $*" | tee -a "$log"
  local started=$SECONDS
  timeout "$limit" "$@" >> "$log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - started)) s" | tee -a "$log"
}

# 1. ResNet-50 MFU: batch size, XLA options, layout changes in the optimized HLO, a profile;
#    CIFAR ResNet-20 epochs (Euler, LM) after an untimed warm-up epoch.
if [ ${#quick[@]} -eq 0 ]; then batches=(--batch-sizes 256 512 1024); gpu_steps=(--steps 10); long_turns=(--steps 50 --repeats 5)
else batches=(); gpu_steps=(); long_turns=(); fi
step 240 gpu "$python" benchmarks/gpu.py "${quick[@]}" --out "$out" "${batches[@]}" \
  --option-sets package latency-hiding --profile
# 2. remat memory on the GPU backend (ResNet-56, both layouts).
step 120 memory "$python" benchmarks/memory.py "${quick[@]}" --out "$out" --repeats 3 "${gpu_steps[@]}"
# 3. scan vs unrolled, and JAX's own convolution gradients, on the GPU backend (turns of 50 steps:
#    these steps take 3-9 ms, and 10-step turns left the depth-56 gap within their spread).
step 180 train_step "$python" benchmarks/train_step.py "${quick[@]}" --no-torch --out "$out" \
  --variants scan unrolled scan+lax-grad "${long_turns[@]}"
tail -n 60 "$out/gpu.md" 2> /dev/null
ls -l "$out"
