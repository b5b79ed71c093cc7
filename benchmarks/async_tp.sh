#!/usr/bin/env bash
# Async TP vs plain TP on 2 GPUs, 1B recipe, seq 4096, compiled blocks, TP=2 + SP: each variant of $VARIANTS
# runs plain and async TP in the same invocation (one global batch of $MB sequences), with the profiler's
# exposed communication and per-kernel breakdown. Variants:
#   base      the recipe as is
#   reorder   + Inductor's compute/communication reordering (reorder_for_compute_comm_overlap)
#   mb8       micro-batch 8 instead of 4 (larger GEMM chunks for the micro-pipeline)
# Writes $OUT/summary_<variant>.jsonl (raw records) and $OUT/async_tp.jsonl (async against plain TP, per
# variant, through step.py --combine).
#   OUT=/tmp/atp VARIANTS="base reorder" bash benchmarks/async_tp.sh
set -u
OUT=${OUT:-/tmp/treadle_async_tp}
mkdir -p "$OUT"
for variant in ${VARIANTS:-base reorder mb8}; do
  summary=$OUT/summary_$variant.jsonl
  rm -f "$summary"
  mb=4 extra=()
  case $variant in
    reorder) extra=(--inductor reorder_for_compute_comm_overlap=True) ;;
    mb8) mb=8 ;;
  esac
  for mode in plain async; do
    async=$([ $mode = async ] && echo true || echo false)
    timeout "${LIMIT:-170}" python3 -m torch.distributed.run --nproc_per_node=2 benchmarks/step.py \
      --summary "$summary" --steps "${STEPS:-20}" --warmup 3 --profile --name "tp2_${mode}_$variant" \
      "${extra[@]}" parallel.tp=2 parallel.dp_shard=1 parallel.async_tp=$async \
      trainer.micro_batch_size=$mb trainer.global_batch_size=$mb 2>&1 | grep -E "^# |Error|error:" | tail -3
  done
  grep -q "\"tp2_plain_$variant\"" "$summary" 2>/dev/null &&
    python3 benchmarks/step.py --combine "$summary" --baseline "tp2_plain_$variant" --case llama3_1b_S4096 \
      --out "$OUT/async_tp.jsonl"
done
cat "$OUT/async_tp.jsonl" 2>/dev/null
