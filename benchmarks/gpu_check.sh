#!/usr/bin/env bash
# The GPU checks, on one CUDA device, in under 10 minutes (an H200 or any GPU with
# >= 16 GB): the tests marked `gpu`, the EK-FAC factor benchmark at setting b with
# excise and kronfluence on the GPU, and `excise forget` end to end on the large world
# (a model of GPT-2 small's shape, trained on the GPU first), with stage timings.
#
#   bash benchmarks/gpu_check.sh [OUT]        # OUT: default benchmarks/results/gpu
#
# Needs the project installed with its bench extra (kronfluence); writes OUT/gpu_tests.txt,
# OUT/factors.{json,md}, OUT/pipeline.{json,md}, OUT/forget.txt and OUT/timings.txt.
set -euo pipefail
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 EXCISE_HOME=${EXCISE_HOME:-$OUT/home}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/timings.txt"

stage() {  # stage NAME COMMAND...: run it, append its wall time to timings.txt
  local name=$1; shift
  local start=$SECONDS
  "$@"
  echo "$name: $((SECONDS - start)) s" | tee -a "$OUT/timings.txt"
}

stage "gpu tests" bash -c "python -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee '$OUT/gpu_tests.txt'"
stage "factors b (excise vs kronfluence, cuda)" env EXCISE_BENCH_DEVICE=cuda \
  python -m benchmarks.factors --settings b --results "$OUT"
stage "factors + pairwise at b (excise vs kronfluence, cuda)" env EXCISE_BENCH_DEVICE=cuda \
  python -m benchmarks.pipeline --variants ekfac,bf16 --results "$OUT"
stage "world large (training on cuda)" python -m excise world --size large --device cuda --quiet
stage "excise forget, large world, bf16 attribution" bash -c \
  "python -m excise forget --size large --device cuda --out '$OUT/forget-run' 2>&1 | tee '$OUT/forget.txt'"
stage "excise attribute, large world, bf16 autocast" bash -c \
  "W=\$(python -m excise world --size large --quiet) && head -200 \$W/retain.jsonl > '$OUT/train.jsonl' \
   && head -20 \$W/forget.jsonl > '$OUT/query.jsonl' && python -m excise attribute --model \$W/base \
   --train '$OUT/train.jsonl' --query '$OUT/query.jsonl' --out '$OUT/attribute-run' --device cuda \
   --autocast bfloat16 --quiet"
cat "$OUT/timings.txt"
