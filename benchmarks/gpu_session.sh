#!/usr/bin/env bash
# The prepared run for a lent GPU machine: JAX vs PyTorch on the same card (gpu_vs_torch.py) and
# the GPU measurements of benchmarks/RESULTS.md, in one command that ends within the device tool's
# 10-minute command limit (15 minutes of device time with the machine's start). Every part has a
# time limit (seconds, below) and writes as it goes, so a part cut short keeps what it measured.
#
#   part        limit   what
#   vs_torch     380 s  gpu_vs_torch.py --budget-s 300 (no group starts after 300 s; groups in
#                       priority order: cifar20-euler, resnet50, cifar20-lm, ensemble8, cifar56-*)
#                       and a profile of cifar20-euler; with PARTS=vs_torch alone: 570 s / 490 s
#   gpu           75 s  gpu.py: ResNet-50 batch 256 MFU + profile, CIFAR ResNet-20 epochs with the
#                       host pipeline (the 1.46 s baseline of RESULTS.md)
#   train_step    70 s  train_step.py: scan vs unrolled per step, turns of 50 steps
#   memory        35 s  memory.py: remat on the GPU backend
#
# Output: $OUT (default runs/gpu_session) gets 7 files, within the device tool's 8: session.log,
# records.tar.gz (every record, .json and .md, repacked after each part), and copies of
# gpu_vs_torch.json, gpu_vs_torch.md, gpu.md, train_step.md, memory.md.
#
#   here, once (the GPU image lacks ml_collections and nothing can be fetched there; .whl/ is ignored):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0
#   on the device (carry [".whl"], timeout_s 600):  bash benchmarks/gpu_session.sh
#   gpu_vs_torch alone, every group (~8 min):       PARTS=vs_torch bash benchmarks/gpu_session.sh
#   some groups (a second call):                    PARTS=vs_torch VS_TORCH_GROUPS="cifar56-euler cifar56-lm" bash ...
#   a CPU rehearsal at tiny sizes:                  QUICK=1 OUT=/tmp/gpu_session bash benchmarks/gpu_session.sh
#   (PYTHON picks the interpreter, default python3; RECORDS the working folder, default a new temp dir)
set -u
out=${OUT:-runs/gpu_session}
mkdir -p "$out"
records=${RECORDS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX")}
mkdir -p "$records"
log="$out/session.log"
parts=${PARTS:-vs_torch gpu train_step memory}
python=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! "$python" -c "import ml_collections" 2> /dev/null && ls .whl/*.whl > /dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
quick=()
if [ "${QUICK:-0}" = 1 ]; then quick=(--quick); fi
echo "parts: $parts; quick: ${QUICK:-0}; records: $records" | tee "$log"
"$python" -c "import jax, flax, optax, ml_collections; print('devices:', jax.devices())" 2>&1 | tee -a "$log" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$log" 2>&1 || true

pack() {  # the latest records into $out: a tarball of everything plus the tables at top level
  for name in gpu_vs_torch gpu train_step memory; do
    [ -f "$records/$name.md" ] && cp "$records/$name.md" "$out/"
  done
  [ -f "$records/gpu_vs_torch.json" ] && cp "$records/gpu_vs_torch.json" "$out/"
  tar -czf "$out/records.tar.gz" -C "$records" . 2>> "$log"
}

step() {  # step LIMIT_SECONDS NAME COMMAND...: run with a time limit, log, repack
  local limit=$1 name=$2
  shift 2
  [ "${QUICK:-0}" = 1 ] && limit=900  # the rehearsal on a loaded CPU: limits are the GPU's
  echo "=== $name (limit ${limit} s): $*" | tee -a "$log"
  local started=$SECONDS
  timeout --kill-after=20 "$limit" "$@" >> "$log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - started)) s" | tee -a "$log"
  pack
}

has() { case " $parts " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# 1. JAX vs PyTorch: ResNet-50 steps, CIFAR ResNet-20/56 epochs, the ensemble; profile of ResNet-20 Euler.
if has vs_torch; then
  if [ "$parts" = vs_torch ]; then limit=570 budget=490; else limit=380 budget=300; fi
  groups=()  # (bash's own GROUPS variable is the user's group ids)
  if [ -n "${VS_TORCH_GROUPS:-}" ]; then read -r -a groups <<< "$VS_TORCH_GROUPS"; groups=(--groups "${groups[@]}"); fi
  profiled=cifar20-euler
  [ ${#quick[@]} -gt 0 ] && profiled=cifar8-euler
  step "$limit" vs_torch "$python" benchmarks/gpu_vs_torch.py "${quick[@]}" --out "$records" --budget-s "$budget" \
    --reply-timeout-s 300 --profile "$profiled" "${groups[@]}"
fi
# 2. ResNet-50 MFU at batch 256 with a profile; CIFAR ResNet-20 epochs (Euler, LM) with the host pipeline.
if has gpu; then
  if [ ${#quick[@]} -eq 0 ]; then batches=(--batch-sizes 256); else batches=(); fi
  step 75 gpu "$python" benchmarks/gpu.py "${quick[@]}" --out "$records" "${batches[@]}" --option-sets package --profile
fi
# 3. scan vs unrolled per step (turns of 50 steps: these steps take 3-9 ms).
if has train_step; then
  if [ ${#quick[@]} -eq 0 ]; then turns=(--steps 50 --repeats 3); else turns=(); fi
  step 70 train_step "$python" benchmarks/train_step.py "${quick[@]}" --no-torch --out "$records" \
    --variants scan unrolled "${turns[@]}"
fi
# 4. remat memory on the GPU backend (ResNet-56, both layouts).
if has memory; then
  if [ ${#quick[@]} -eq 0 ]; then memory_steps=(--steps 10); else memory_steps=(); fi
  step 35 memory "$python" benchmarks/memory.py "${quick[@]}" --out "$records" --repeats 3 "${memory_steps[@]}"
fi
pack
sed -n '/^## Targets/,/^## Measurements/p' "$out/gpu_vs_torch.md" 2> /dev/null
ls -l "$out"
