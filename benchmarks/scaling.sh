#!/usr/bin/env bash
# Issue-9 scaling runs: the 8B recipe (seq 8192, full activation checkpointing, compiled blocks, SDPA) at every
# GPU count N = 1, 2, 4, 8 up to what the machine has, one sequence per GPU per step (weak scaling):
#   fsdp            FSDP over N              fp8    the same with FP8 linears (tensorwise)
#   tp2, tp4        FSDP over N/tp x TP (+SP), each also with async TP (tp2_async, ...)
#   cp2_ulysses/ring  FSDP over N/2 x CP=2
# Every layout has global batch N sequences, so tokens per GPU per step are equal and tokens/s/GPU compare.
# Then benchmarks/scaling.py turns the records into result lines: per-GPU throughput and MFU against
# torchtitan's Llama3-8B figures, scaling efficiency against the smallest N measured, and the scaling model
# for the N this machine does not have.
#   OUT=/tmp/scaling bash benchmarks/scaling.sh          # then: python benchmarks/scaling.py --summary ...
# N=1 uses bf16 Adam moments (optim=adamw_bf16): the fp32 ones (8B x 16 B = 128 GB of state) leave no room
# for activations on one H200; the optimizer step is <1% of the step, so the per-GPU rate compares.
set -u
OUT=${OUT:-/tmp/treadle_scaling}
mkdir -p "$OUT"
summary=$OUT/summary.jsonl
gpus=$(nvidia-smi -L | wc -l)
# LAYOUTS="fsdp tp2" runs only those layouts (names as above, without :N); empty runs all.
run() {
  local n=$1; shift
  local layout=${2%%:*}
  [ -z "${LAYOUTS:-}" ] || [[ " $LAYOUTS " == *" $layout "* ]] || return 0
  timeout "${LIMIT:-240}" python3 -m torch.distributed.run --nproc_per_node="$n" benchmarks/step.py \
    --summary "$summary" --steps "${STEPS:-8}" --warmup 2 --profile --recipe pretrain/llama3_8b \
    "$@" logging.wandb.mode=disabled trainer.global_batch_size="$n" 2>&1 | grep -E "^# |Error|error:" | tail -3
}
for n in ${COUNTS:-1 2 4 8}; do
  [ "$n" -le "$gpus" ] || break
  if [ "$n" = 1 ]; then
    run 1 --name "fsdp:N1" optim=adamw_bf16 trainer.micro_batch_size=1
    continue
  fi
  run "$n" --name "fsdp:N$n" parallel.dp_shard="$n" trainer.micro_batch_size=1
  [ "${SKIP_FP8:-0}" = 1 ] || run "$n" --name "fp8:N$n" fp8=tensorwise parallel.dp_shard="$n" trainer.micro_batch_size=1
  for tp in 2 4; do
    [ "$tp" -le "$n" ] || continue
    run "$n" --name "tp$tp:N$n" parallel.tp="$tp" parallel.dp_shard=$((n / tp)) trainer.micro_batch_size="$tp"
    [ "${ASYNC_TP:-1}" = 0 ] || run "$n" --name "tp${tp}_async:N$n" parallel.tp="$tp" parallel.async_tp=true \
      parallel.dp_shard=$((n / tp)) trainer.micro_batch_size="$tp"
  done
  # Ring attention runs its blocks through the Triton FlashAttention kernels (SDPA returns no log-sum-exp).
  run "$n" --name "cp2_ulysses:N$n" parallel.cp=2 parallel.cp_variant=ulysses parallel.dp_shard=$((n / 2)) \
    trainer.micro_batch_size=2
  [ "${SKIP_RING:-0}" = 1 ] || run "$n" --name "cp2_ring:N$n" parallel.cp=2 parallel.cp_variant=ring \
    kernels.attention=triton parallel.dp_shard=$((n / 2)) trainer.micro_batch_size=2
done
