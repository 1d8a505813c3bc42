#!/usr/bin/env bash
# Simulation speed on a GPU, one command (under 10 minutes on one H100 or H200):
#   bash scripts/bench_gpu.sh [OUT]            # default OUT runs/bench_gpu
# Full-width zoo resnet18 at 32x32 (10 classes) and torchvision's resnet18 at 224x224 (1,000
# classes), random seeded weights and random images (timing only: the accuracy column is
# agreement with the ANN), T = 64, batch 256 and 2,048; every neuron type (IF, ASN at m_f 0.1 and VSN, each also with --compile,
# TTFS to its answer step) against T ANN forward passes and SpikingJelly's IF
# (pip install -e '.[bench]'). Each bench_simulation.py run writes its JSON under OUT; the
# README's GPU table is printed from them at the end (scripts/bench_gpu_table.py).
# DEVICE=cpu QUICK=1 runs a small version of the same on a CPU (a check of the script only).
set -euo pipefail
OUT=${1:-runs/bench_gpu}
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
if [ "${QUICK:-0}" = 1 ]; then
  NETS="resnet18:3,32,32:10:4"; BATCHES="16"; T=4; IMAGES_PER_BATCH=2
else
  NETS="resnet18:3,32,32:10:64 torchvision.models:resnet18:3,224,224:1000:"; BATCHES="256 2048"; T=64
  IMAGES_PER_BATCH=2
fi
for net in $NETS; do
  IFS=: read -r model shape classes width <<<"$(echo "$net" | sed 's/^torchvision.models:/torchvision.models%/')"
  model=${model/\%/:}
  tag=$(echo "${model}_${shape}" | tr ':.,' '___')
  args=(--model "$model" --model-arg "num_classes=$classes")
  wargs=()
  if [ -n "$width" ]; then args+=(--model-arg "width=$width"); wargs=(--width "$width"); fi
  for B in $BATCHES; do
    images=$((B * IMAGES_PER_BATCH))
    $PY scripts/make_random_inputs.py --model "$model" --shape "$shape" --classes "$classes" "${wargs[@]}" \
      --images "$images" --out "$OUT/$tag"
    $PY scripts/bench_simulation.py "${args[@]}" --checkpoint "$OUT/$tag.safetensors" \
      --dataset "$OUT/$tag.data.safetensors" --param asn:m_f=0.1 --samples "$((B < 512 ? B : 512))" \
      --timesteps "$T" --images "$images" --batch-size "$B" --device "$DEVICE" --compile --out "$OUT/${tag}_b$B"
  done
done
$PY scripts/bench_gpu_table.py "$OUT"
