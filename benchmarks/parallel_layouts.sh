#!/usr/bin/env bash
# Issue-3 measurements on 2 GPUs with the 1B recipe (seq 4096, bf16, compiled blocks), same global batch:
#   FSDP=2 vs TP=2 (+SP) vs TP=2 (+SP) with async TP: tokens/s, MFU, exposed communication per step;
#   the longest sequence that trains at cp=2 (Ulysses) vs cp=1 (FSDP=2), no activation checkpointing.
# Writes $OUT/summary.jsonl (raw records) and $OUT/step_parallel.jsonl (DESIGN.md result lines).
set -u
OUT=${OUT:-/tmp/treadle_layouts}
mkdir -p "$OUT"
summary=$OUT/summary.jsonl
rm -f "$summary"
run() { timeout "${LIMIT:-150}" python3 -m torch.distributed.run --nproc_per_node=2 benchmarks/step.py --summary "$summary" "$@" 2>&1 | grep -E "^# |Error|error:" | tail -3; }

timed="--steps ${STEPS:-20} --warmup 2 --profile"
# ONLY_FIT=1: just the longest-sequence runs (their records land in summary.jsonl, not combined).
if [ "${ONLY_FIT:-0}" != 1 ]; then
run --name fsdp2 $timed parallel.dp_shard=2 trainer.micro_batch_size=2 trainer.global_batch_size=4
run --name tp2_sp $timed parallel.tp=2 trainer.micro_batch_size=4 trainer.global_batch_size=4
run --name tp2_sp_async $timed parallel.tp=2 parallel.async_tp=true trainer.micro_batch_size=4 trainer.global_batch_size=4
fi

[ "${SKIP_FIT:-0}" = 1 ] && { python3 benchmarks/step.py --combine "$summary" --baseline fsdp2 --case llama3_1b_S4096 --out "$OUT/step_parallel.jsonl"; exit; }
fit="--steps 1 --warmup 1 parallel.compile=false kernels.loss=triton model.max_seq_len=1048576 trainer.micro_batch_size=1"
for seq in 65536 131072; do
  run --name "fit:cp1:S$seq" $fit data.seq_len=$seq parallel.dp_shard=2 trainer.global_batch_size=2
done
for seq in 131072 262144; do
  run --name "fit:cp2:S$seq" $fit data.seq_len=$seq parallel.cp=2 parallel.cp_variant=ulysses trainer.global_batch_size=1
done
[ "${ONLY_FIT:-0}" = 1 ] || python3 benchmarks/step.py --combine "$summary" --baseline fsdp2 --case llama3_1b_S4096 --out "$OUT/step_parallel.jsonl"
