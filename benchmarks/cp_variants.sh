#!/usr/bin/env bash
# Context parallelism on 2 GPUs with the 1B recipe (bf16, kernels=triton, compiled blocks), no activation
# checkpointing, two sequences per optimizer step in every layout:
#   cp=1 (FSDP over the 2 GPUs, one sequence each) vs cp=2 ring (Triton FlashAttention-2 blocks) vs cp=2 Ulysses
# at each sequence length of $SEQS: tokens/s, MFU, exposed communication and peak memory (rank 0's GPU).
# Writes $OUT/summary_S<seq>.jsonl (raw records) and $OUT/step_cp.jsonl (DESIGN.md result lines against cp=1,
# or against Ulysses where cp=1 did not fit).
#   OUT=/tmp/cp SEQS="16384 32768 65536" bash benchmarks/cp_variants.sh
# DOCS=1 packs documents (data.document_mask=true): ring's cross blocks then mask by document id without
# skipping tiles. EXTRA adds overrides to every run (e.g. EXTRA=memory=full_ac).
set -u
OUT=${OUT:-/tmp/treadle_cp}
mkdir -p "$OUT"
rm -f "$OUT/step_cp.jsonl"
docs=$([ "${DOCS:-0}" = 1 ] && echo true || echo false)
overrides="kernels=triton trainer.micro_batch_size=1 trainer.global_batch_size=2 data.document_mask=$docs ${EXTRA:-}"
for seq in ${SEQS:-16384 32768 65536}; do
  summary=$OUT/summary_S$seq.jsonl
  rm -f "$summary"
  run() {
    timeout "${LIMIT:-900}" python3 -m torch.distributed.run --nproc_per_node=2 benchmarks/step.py \
      --summary "$summary" --steps "${STEPS:-10}" --warmup 3 --profile "$@" $overrides data.seq_len="$seq" 2>&1 |
      grep -E "^# |Error|error:" | tail -3
  }
  run --name cp1 parallel.dp_shard=2
  run --name cp2_ring parallel.cp=2 parallel.cp_variant=ring
  run --name cp2_ulysses parallel.cp=2 parallel.cp_variant=ulysses
  baseline=cp1
  grep -q '"name": "cp1"' "$summary" 2>/dev/null || baseline=cp2_ulysses
  grep -q "\"name\": \"$baseline\"" "$summary" 2>/dev/null &&
    python3 benchmarks/step.py --combine "$summary" --baseline "$baseline" --case "llama3_1b_S${seq}" \
      --out "$OUT/step_cp.jsonl"
done
