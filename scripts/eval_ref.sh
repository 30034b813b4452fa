#!/usr/bin/env bash
# The long-context eval tables of docs/EVALS.md: passkey, MQAR and facts through the engine, with
# the memory system on (embedded nats-server, consolidation settled before each question) and
# off (--no-memory, the ablation), on the CPU with one thread.
#   scripts/eval_ref.sh [MODEL] [OUT_DIR] [LENGTHS] [N]
#   (defaults: checkpoints/eval-ref benchmarks/results 1k,4k,16k 10)
# Writes OUT_DIR/evals_cpu_eval_ref_{passkey,mqar,facts}_{memory,no_memory}.json.
set -euo pipefail
model=${1:-checkpoints/eval-ref}
out=${2:-benchmarks/results}
lengths=${3:-1k,4k,16k}
n=${4:-10}
bwr=(python -m gateway.cli)
[ -x .venv/bin/python ] && bwr=(.venv/bin/python -m gateway.cli)
export OMP_NUM_THREADS=1
for task in passkey mqar facts; do
  for mode in memory no_memory; do
    flag=(); [ "$mode" = no_memory ] && flag=(--no-memory)
    "${bwr[@]}" eval "$task" --model "$model" --lengths "$lengths" --depths 0.1,0.5,0.9 \
      --n "$n" --memory-workers 1 "${flag[@]}" --json "$out/evals_cpu_eval_ref_${task}_${mode}.json"
  done
done
