#!/usr/bin/env bash
# TP communication overlap on 2 GPUs, 1B recipe, seq 4096, compiled blocks, TP=2: each variant of $VARIANTS
# runs its modes in the same invocation (one global batch of $MB sequences), with the profiler's exposed
# communication and per-kernel breakdown, every mode against plain TP + SP. Modes:
#   plain          TP + sequence parallelism, no overlap (the baseline)
#   async          + torch's micro-pipelined async TP (parallel.async_tp, symmetric memory)
#   no_sp          TP without sequence parallelism (all-reduces instead of all-gather/reduce-scatter pairs)
#   no_sp_reorder  no_sp + Inductor's compute/communication reordering (parallel.tp_comm_reorder; what
#                  batch_overlap turns on itself)
#   batch_overlap  no_sp + each block's batch in two halves interleaved (parallel.tp_batch_overlap)
#   plain_reorder  plain + Inductor's compute/communication reordering (parallel.tp_comm_reorder)
#   async_reorder  async + the reordering
#   plain_tn, no_sp_reorder_tn, batch_overlap_tn, async_tn
#                  the mode with the Triton RMSNorm (kernels.rmsnorm=triton; under TP it runs on local rows)
#   *_ctasN        the mode with the TP group's NCCL collectives on at most N CTAs (parallel.tp_comm_max_ctas=N:
#                  fewer SMs taken from the GEMMs they overlap), e.g. batch_overlap_ctas8, plain_tn_ctas8
# Variants (modes "plain async" unless noted):
#   base      the recipe as is
#   reorder   + Inductor's compute/communication reordering (parallel.tp_comm_reorder)
#   mb8       micro-batch 8 instead of 4 (larger GEMM chunks for the micro-pipeline)
#   cudagraphs  + Inductor's CUDA graphs for the compiled blocks (triton.cudagraphs), to cut host time per
#             step; measured 5x slower steps on every mode (2 H200s, torch 2.11): not usable as is
#   overlap   modes "plain async no_sp batch_overlap"
#   overlap_mb8  the same at micro-batch 8 (batch_overlap's GEMMs then run on 4 sequences, as plain's at mb 4)
# $MODES, where set, replaces every variant's mode list (plain must stay in it: it is the baseline).
# TRACE=1 also writes rank 0's Chrome trace of the profiled steps, $OUT/trace_<mode>_<variant>.json.
# Writes $OUT/summary_<variant>.jsonl (raw records) and $OUT/async_tp.jsonl (each mode against plain TP, per
# variant, through step.py --combine).
#   OUT=/tmp/atp VARIANTS="base overlap" bash benchmarks/async_tp.sh
set -u
reorder=(parallel.tp_comm_reorder=true)
OUT=${OUT:-/tmp/treadle_async_tp}
mkdir -p "$OUT"
for variant in ${VARIANTS:-base reorder mb8}; do
  summary=$OUT/summary_$variant.jsonl
  rm -f "$summary"
  mb=4 extra=() opts=() modes="plain async"
  case $variant in
    reorder) extra=("${reorder[@]}") ;;
    mb8) mb=8 ;;
    cudagraphs) opts=(--inductor triton.cudagraphs=True) ;;
    overlap) modes="plain async no_sp batch_overlap" ;;
    overlap_mb8) mb=8 modes="plain async no_sp batch_overlap" ;;
  esac
  for mode in ${MODES:-$modes}; do
    base=$mode ctas=()
    case $base in *_ctas*) ctas=(parallel.tp_comm_max_ctas=${base##*_ctas}) base=${base%_ctas*} ;; esac
    case $base in *_tn) base=${base%_tn} ;; esac
    case $base in
      plain) flags=(parallel.async_tp=false) ;;
      async) flags=(parallel.async_tp=true) ;;
      no_sp) flags=(parallel.sequence_parallel=false) ;;
      no_sp_reorder) flags=("${reorder[@]}" parallel.sequence_parallel=false) ;;
      batch_overlap) flags=(parallel.sequence_parallel=false parallel.tp_batch_overlap=true) ;;
      plain_reorder) flags=("${reorder[@]}" parallel.async_tp=false) ;;
      async_reorder) flags=("${reorder[@]}" parallel.async_tp=true) ;;
    esac
    case $mode in *_tn|*_tn_ctas*) flags+=(kernels.rmsnorm=triton) ;; esac
    flags+=("${ctas[@]}")
    trace=()
    [ -n "${TRACE:-}" ] && trace=(--trace "$OUT/trace_${mode}_$variant.json")
    timeout "${LIMIT:-170}" python3 -m torch.distributed.run --nproc_per_node=2 benchmarks/step.py \
      --summary "$summary" --steps "${STEPS:-20}" --warmup 3 --profile --name "tp2_${mode}_$variant" \
      "${opts[@]}" "${trace[@]}" "${extra[@]}" "${flags[@]}" parallel.tp=2 parallel.dp_shard=1 \
      trainer.micro_batch_size=$mb trainer.global_batch_size=$mb 2>&1 | grep -E "^# |Error|error:" | tail -3
  done
  grep -q "\"tp2_plain_$variant\"" "$summary" 2>/dev/null &&
    python3 benchmarks/step.py --combine "$summary" --baseline "tp2_plain_$variant" --case llama3_1b_S4096 \
      --out "$OUT/async_tp.jsonl"
done
cat "$OUT/async_tp.jsonl" 2>/dev/null
