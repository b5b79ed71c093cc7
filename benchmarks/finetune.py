"""LoRA fine-tuning steps on one GPU: treadle vs Hugging Face transformers + peft, same settings, same run.

    python benchmarks/finetune.py --steps 8 --out benchmarks/results/finetune.jsonl

Both sides adapt every projection of an 8B-shaped Llama (random weights; `--model` picks another shape) with
LoRA r=16, alpha=32, train on the same token batches (seq 4096, micro-batch × accumulation from the flags),
with activation checkpointing of every block, bf16 compute and AdamW over the adapters only:

- treadle: its `finetune/llama3_8b_lora` settings: FSDP2 (one rank) with the frozen base stored in bf16, fp32
  adapters, compiled blocks, full activation checkpointing, the compiled loss.
- transformers + peft: `LlamaForCausalLM` in bf16 with SDPA attention, `get_peft_model(LoraConfig(...))` (peft
  keeps the adapters in fp32), `gradient_checkpointing_enable(use_reentrant=False)`, autocast bf16, fused
  AdamW — the standard peft recipe.

`--qlora` adds treadle with the base in NF4 (same peer). FLOPs per token are the model's full training count
(6·N + attention), the convention MFU uses, for both sides, so TFLOP/s compare like for like; LoRA skips the
base weights' gradient matmuls, so the useful work is lower than that count.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
from pathlib import Path

import torch
from _results import emit, triton_version
from step import hf_llama_config, hf_step, run_treadle, summarize, time_peer

from treadle.models import get_model_spec
from treadle.train.config import TrainConfig, load_config
from treadle.train.metrics import peak_flops


def run_hf_peft(cfg: TrainConfig, batches: list, steps: int, warmup: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    hf_cfg = hf_llama_config(cfg.model)
    with torch.device("cuda"):
        model = LlamaForCausalLM(hf_cfg).to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.peft.rank, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, weight_decay=0.0, fused=True)
    return time_peer(hf_step(model, batches, optimizer, trainable, cfg.optim.clip_grad_norm), steps, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama3_8b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--qlora", action="store_true", help="also time treadle with an NF4 base")
    parser.add_argument(
        "--vs", action="append", default=[], metavar="NAME=OVERRIDES",
        help="also time treadle with these Hydra overrides, e.g. qlora_eager='peft=qlora parallel.compile=false'",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    overrides = [
        f"model={args.model}", "peft=lora", "peft.rank=16", "peft.alpha=32", "memory=full_ac", "parallel.compile=true",
        f"data.seq_len={args.seq}", "data.document_mask=false", f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.global_batch_size={args.global_batch}", "trainer.max_steps=1000", "optim.lr=2e-4",
        "optim.weight_decay=0.0", "logging.wandb.mode=disabled", "logging.progress_bar=false", "checkpoint.every=0",
        "checkpoint.save_final=false", "run.dir=/tmp/treadle_finetune_bench",
    ]  # fmt: skip
    cfg = load_config(overrides)
    tokens_per_step = args.global_batch * args.seq
    flops_per_token = get_model_spec(cfg.model.name).flops_per_token(cfg.model, args.seq)
    peak = peak_flops(torch.device("cuda"))

    results = {"treadle": run_treadle(cfg, args.steps, args.warmup)}
    batches = results["treadle"]["batches"]
    variants = dict(v.split("=", 1) for v in args.vs)
    if args.qlora:
        variants = {"qlora": "peft=qlora", **variants}
    for name, extra in variants.items():
        gc.collect()
        torch.cuda.empty_cache()
        results[f"treadle_{name}"] = run_treadle(
            load_config([*overrides, *extra.split()]), args.steps, args.warmup
        )
    gc.collect()
    torch.cuda.empty_cache()
    results["hf_peft"] = run_hf_peft(cfg, batches, args.steps, args.warmup)

    summary = summarize(results, args.steps, tokens_per_step, flops_per_token, peak)
    common = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "date": datetime.date.today().isoformat(),
        "steps": args.steps,
    }
    lines = []
    peer = summary["hf_peft"]
    for name in [n for n in summary if n != "hf_peft"]:
        variant = name.removeprefix("treadle").removeprefix("_") or "lora"
        case = f"{args.model}_{variant}_r16_all_linear_S{args.seq}_mb{args.micro_batch}_gb{args.global_batch}_fullAC"
        for metric, higher in (
            ("tokens_per_s", True),
            ("tflops_per_device", True),
            ("peak_memory_gib", False),
        ):
            value = summary[name][metric]
            lines.append({
                "bench": "finetune", "case": case, "metric": metric, "value": value,
                "peer": "transformers_peft_lora_gradckpt", "peer_value": peer[metric],
                "ratio": value / peer[metric], "higher_is_better": higher, **common,
            })  # fmt: skip
    emit(lines, args.out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
