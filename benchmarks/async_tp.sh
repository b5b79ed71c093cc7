#!/usr/bin/env bash
# Async TP vs plain TP on 2 GPUs, 1B recipe, seq 4096, compiled blocks, TP=2 + SP: each variant of $VARIANTS
# runs plain and async TP in the same invocation (one global batch of $MB sequences), with the profiler's
# exposed communication and per-kernel breakdown. Variants:
#   base      the recipe as is
#   reorder   + Inductor's compute/communication reordering (reorder_for_compute_comm_overlap)
#   mb8       micro-batch 8 instead of 4 (larger GEMM chunks for the micro-pipeline)
# Writes $OUT/summary.jsonl (raw records) and $OUT/async_tp.jsonl (async against plain TP, per variant).
#   OUT=/tmp/atp VARIANTS="base reorder" bash benchmarks/async_tp.sh
set -u
OUT=${OUT:-/tmp/treadle_async_tp}
mkdir -p "$OUT"
summary=$OUT/summary.jsonl
run() {
  timeout "${LIMIT:-170}" python3 -m torch.distributed.run --nproc_per_node=2 benchmarks/step.py \
    --summary "$summary" --steps "${STEPS:-20}" --warmup 3 --profile "$@" 2>&1 |
    grep -E "^# |Error|error:" | tail -3
}
for variant in ${VARIANTS:-base reorder mb8}; do
  mb=4 extra=()
  case $variant in
    reorder) extra=(--inductor reorder_for_compute_comm_overlap=True) ;;
    mb8) mb=8 ;;
  esac
  for mode in plain async; do
    async=$([ $mode = async ] && echo true || echo false)
    run --name "tp2_${mode}_$variant" "${extra[@]}" parallel.tp=2 parallel.dp_shard=1 \
      parallel.async_tp=$async trainer.micro_batch_size=$mb trainer.global_batch_size=$mb
  done
  grep -q "\"tp2_async_$variant\"" "$summary" && grep -q "\"tp2_plain_$variant\"" "$summary" &&
    python3 - "$summary" "$variant" >>"$OUT/async_tp.jsonl" <<'PY'
import datetime, json, sys
import torch, triton
records = {json.loads(l)["name"]: json.loads(l) for l in open(sys.argv[1]) if l.strip()}
v = sys.argv[2]
a, p = records[f"tp2_async_{v}"], records[f"tp2_plain_{v}"]
for metric, higher in (("tokens_per_s", True), ("exposed_comm_ms_per_step", False), ("step_ms", False)):
    print(json.dumps({"bench": "step", "case": f"llama3_1b_S{a['seq_len']}_tp2_sp_async_{v}", "metric": metric,
                      "value": a[metric], "peer": f"tp2_sp_{v}", "peer_value": p[metric],
                      "ratio": a[metric] / p[metric] if p[metric] else None, "higher_is_better": higher,
                      "device": a["device"], "world_size": a["world_size"], "torch": torch.__version__,
                      "triton": triton.__version__, "date": datetime.date.today().isoformat()}))
PY
done
cat "$OUT/async_tp.jsonl" 2>/dev/null
