"""Mixture-of-Experts on one GPU: the MoE layer alone, and whole training steps against torchtitan and transformers.

    python benchmarks/moe.py --out benchmarks/results/moe.jsonl            # both parts
    python benchmarks/moe.py --part layer --tokens 16384 --experts 128      # the layer alone

`--part layer`: one MoE layer's forward + backward in bf16 (weights and activations), the Qwen3-30B-A3B layer
shape by default (dim 2048, 128 experts, top-8, expert width 768, 16k tokens): treadle's `MoE` (eager and
compiled) against torchtitan 0.2.2's `MoE` (eager and compiled; its own grouped-GEMM path) and transformers'
`Qwen3MoeSparseMoeBlock`, and the expert grouped GEMMs alone on the same row counts (the op table's `moe` entry on
evenly spread rows) — the ceiling the layer's routing, gather and combine eat into. TFLOP/s counts the expert
matmuls only: 6 · T · k · 3 · D · F per forward + backward.

`--part step`: whole optimizer steps of `--recipe` (default `pretrain/moe_1gpu`: 4.5B parameters, 64 experts)
on uniformly random tokens, the same batches for every side: treadle's trainer (FSDP2 mixed precision: fp32
weights and AdamW state, bf16 compute; the recipe's compile setting) against (a) torchtitan 0.2.2's own Qwen3
model at the same shape, parallelised by its own `apply_compile` and `apply_fsdp` on a one-GPU mesh (bf16
parameters, fp32 reduce; the loss compiled as torchtitan does), fused AdamW, and (b) transformers'
`Qwen3MoeForCausalLM` in fp32 under bf16 autocast. Both peers train without load balancing terms (treadle's
recipe adds the Switch auxiliary loss, a few small reductions). FLOPs per token are treadle's active-parameter
count (`flops_per_token`) for every side, so TFLOP/s and MFU compare.

One JSON line per (case, metric, peer), as DESIGN.md gives. A peer that fails (not installed, out of memory)
is reported on stdout and left out.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from _results import emit, triton_version
from step import hf_step, run_treadle, summarize, time_peer

from treadle.models import get_model_spec
from treadle.models.hf import hf_config_from_model
from treadle.models.moe import MoEConfig
from treadle.models.moe.layer import MoE
from treadle.models.ops import KernelsConfig, build_ops
from treadle.train.config import load_config
from treadle.train.metrics import peak_flops


def _common(**extra) -> dict:
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "date": datetime.date.today().isoformat(),
        "world_size": 1,
        **extra,
    }


def _lines(case: str, summary: dict[str, dict], metrics, mine: str, common: dict) -> list[dict]:
    lines = []
    for metric, higher in metrics:
        for peer in [p for p in summary if p != mine] or [None]:
            value, peer_value = summary[mine][metric], summary[peer][metric] if peer else None
            lines.append(
                {
                    "bench": "moe",
                    "case": case,
                    "metric": metric,
                    "value": value,
                    "peer": peer,
                    "peer_value": peer_value,
                    "ratio": value / peer_value if value is not None and peer_value else None,
                    "higher_is_better": higher,
                    **common,
                }
            )
    return lines


def _try(name: str, fn):
    gc.collect()
    torch.cuda.empty_cache()
    try:
        return fn()
    except Exception as exc:  # a missing peer or an OOM is reported, not fatal
        print(f"# {name} failed: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
        traceback.print_exc(limit=3)
        return None


# ---------------------------------------------------------------------------------------------- the layer alone


def _time_fwd_bwd(fn, x: torch.Tensor, iters: int, warmup: int = 3) -> float:
    """Milliseconds per forward + backward of `fn(x)` (summed output against a fixed random gradient)."""
    grad = torch.randn_like(x)
    for _ in range(warmup):
        fn(x).backward(grad)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn(x).backward(grad)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def _treadle_layer(args, compiled: bool):
    # The defaults are the Qwen3-MoE router: softmax, renormalised top-k, no balancing terms, dropless.
    cfg = MoEConfig(num_experts=args.experts, num_experts_per_tok=args.top_k)
    layer = MoE(args.dim, cfg, args.width, None, build_ops(KernelsConfig(moe=args.moe_op))).cuda()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    layer = layer.to(torch.bfloat16)
    # One graph, as the layer compiles inside a treadle block (`compile_fullgraph`).
    forward = torch.compile(layer, fullgraph=True) if compiled else layer
    return lambda x: forward(x)[0]


def _titan_layer(args, compiled: bool):
    from torchtitan.models.moe import MoE as TitanMoE
    from torchtitan.models.moe import MoEArgs

    moe_args = MoEArgs(
        num_experts=args.experts,
        num_shared_experts=0,
        top_k=args.top_k,
        score_func="softmax",
        route_norm=True,
        score_before_experts=False,
        load_balance_coeff=None,
    )
    layer = TitanMoE(moe_args, dim=args.dim, hidden_dim=args.width).cuda()
    with torch.no_grad():
        layer.init_weights(0.02, torch.device("cuda"))
    layer = layer.to(torch.bfloat16)
    forward = torch.compile(layer) if compiled else layer
    return forward


def _hf_layer(args):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(
        hidden_size=args.dim, num_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.width, norm_topk_prob=True,
    )  # fmt: skip
    layer = Qwen3MoeSparseMoeBlock(config).cuda().to(torch.bfloat16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)

    def forward(x):
        out = layer(x)
        return out[0] if isinstance(out, tuple) else out

    return forward


def _grouped_gemm_alone(args):
    """The three expert matmuls (+ SwiGLU) on evenly spread rows: what the op table's
    `moe` entry costs by itself."""
    n, e, f = args.experts, args.dim, args.width
    ws = [(torch.randn(n, f, e, device="cuda") * 0.02).bfloat16().requires_grad_() for _ in range(2)] + [
        (torch.randn(n, e, f, device="cuda") * 0.02).bfloat16().requires_grad_()
    ]
    rows = args.tokens * args.top_k
    counts = torch.full((n,), rows // n, device="cuda", dtype=torch.int64)
    counts[: rows % n] += 1
    ops = build_ops(KernelsConfig(moe=args.moe_op))
    return lambda x: ops.moe(x, *ws, counts, swiglu=ops.swiglu)


def run_layer(args) -> list[dict]:
    x = (torch.randn(1, args.tokens, args.dim, device="cuda") * 0.5).bfloat16().requires_grad_()
    rows_x = (
        (torch.randn(args.tokens * args.top_k, args.dim, device="cuda") * 0.5).bfloat16().requires_grad_()
    )
    flops = 6 * args.tokens * args.top_k * 3 * args.dim * args.width
    sides = {
        "treadle": lambda: _time_fwd_bwd(_treadle_layer(args, False), x, args.iters),
        "treadle_compile": lambda: _time_fwd_bwd(_treadle_layer(args, True), x, args.iters),
        "torchtitan": lambda: _time_fwd_bwd(_titan_layer(args, False), x, args.iters),
        "torchtitan_compile": lambda: _time_fwd_bwd(_titan_layer(args, True), x, args.iters),
        "transformers": lambda: _time_fwd_bwd(_hf_layer(args), x, max(2, args.iters // 5)),
        "grouped_gemm_alone": lambda: _time_fwd_bwd(_grouped_gemm_alone(args), rows_x, args.iters),
    }
    summary = {}
    for name, fn in sides.items():
        ms = _try(name, fn)
        if ms is not None:
            summary[name] = {"ms": ms, "tflops": flops / ms / 1e9}
            print(f"# layer {name}: {ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
    case = f"moe_layer_T{args.tokens}_D{args.dim}_E{args.experts}_k{args.top_k}_F{args.width}_bf16_fwdbwd"
    lines = []
    for mine in [m for m in ("treadle", "treadle_compile") if m in summary]:
        others = {k: v for k, v in summary.items() if not k.startswith("treadle") or k == mine}
        lines += _lines(
            f"{case}_{mine}", others, (("tflops", True), ("ms", False)), mine, _common(moe_op=args.moe_op)
        )
    return lines


# ------------------------------------------------------------------------------------------ whole training steps


def _random_tokens(vocab: int, count: int, directory: str) -> str:
    """A uniformly random uint32 token file (no sidecar: `data.token_dtype=uint32`), seeded."""
    path = os.path.join(directory, "random_tokens.bin")
    np.random.default_rng(0).integers(0, vocab, size=count, dtype=np.uint32).tofile(path)
    return path


def _titan_args(m, seq_len: int):
    from torchtitan.models.moe import MoEArgs
    from torchtitan.models.qwen3.model.args import Qwen3ModelArgs

    return Qwen3ModelArgs(
        dim=m.dim, n_layers=m.num_layers, n_heads=m.num_heads, n_kv_heads=m.num_kv_heads,
        vocab_size=m.vocab_size, head_dim=m.head_dim, hidden_dim=m.hidden_dim, norm_eps=m.norm_eps,
        rope_theta=m.rope_theta, qk_norm=m.qk_norm, max_seq_len=seq_len, enable_weight_tying=m.tie_embeddings,
        moe_enabled=True, moe_inter_dim=m.moe_ffn_dim,
        moe_args=MoEArgs(
            num_experts=m.num_experts, num_shared_experts=m.num_shared_experts, top_k=m.num_experts_per_tok,
            score_func="softmax", route_norm=m.norm_topk_prob, score_before_experts=False,
            load_balance_coeff=None,
        ),
    )  # fmt: skip


def run_titan(cfg, batches: list, steps: int, warmup: int) -> dict:
    """torchtitan's Qwen3-MoE with its own compile and FSDP functions on a one-GPU mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.models.llama4.infra.parallelize import apply_compile, apply_fsdp
    from torchtitan.models.qwen3.model.model import Qwen3Model

    args = _titan_args(cfg.model, cfg.data.seq_len)
    with torch.device("meta"):
        model = Qwen3Model(args)
    if cfg.parallel.compile:
        apply_compile(model, SimpleNamespace(backend="inductor"), False)
    mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("fsdp",))
    apply_fsdp(model, mesh, param_dtype=torch.bfloat16, reduce_dtype=torch.float32, pp_enabled=False)
    model.to_empty(device="cuda")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cuda"))
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, fused=True,
    )  # fmt: skip

    def ce(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum")

    loss_fn = torch.compile(ce) if cfg.parallel.compile else ce
    state = {"i": 0}

    def step() -> float:
        micro_batches = batches[state["i"] % len(batches)]
        state["i"] += 1
        count = sum(int((b.labels >= 0).sum()) for b in micro_batches)
        total = 0.0
        for b in micro_batches:
            loss = loss_fn(model(b.tokens.cuda(non_blocking=True)), b.labels.cuda(non_blocking=True)) / count
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)

    return time_peer(step, steps, warmup)


def run_hf_moe(cfg, batches: list, steps: int, warmup: int) -> dict:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    hf_cfg = hf_config_from_model(cfg.model, "Qwen3MoeForCausalLM", torch.float32)
    hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**hf_cfg, attn_implementation="sdpa")).cuda()
    model.config.output_router_logits = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=True)
    step = hf_step(model, batches, optimizer, list(model.parameters()), cfg.optim.clip_grad_norm)
    return time_peer(step, steps, warmup)


def run_steps(args) -> list[dict]:
    run_dir = tempfile.mkdtemp(prefix="treadle_moe_bench_")
    probe = load_config([f"+config={args.recipe}", *args.overrides])
    tokens_per_step = probe.trainer.micro_batch_size * probe.data.seq_len * args.accum
    data = _random_tokens(probe.model.vocab_size, tokens_per_step * 8 + probe.data.seq_len + 1, run_dir)
    base = [
        f"+config={args.recipe}",
        f"run.dir={run_dir}",
        "data=tokens",
        f"data.path={data}",
        "data.token_dtype=uint32",
        "data.document_mask=false",
        f"data.seq_len={probe.data.seq_len}",
        f"trainer.global_batch_size={probe.trainer.micro_batch_size * args.accum}",
        "logging.wandb.mode=disabled",
        "logging.progress_bar=false",
        "checkpoint.every=0",
        "checkpoint.save_final=false",
        "checkpoint.resume=none",
        *args.overrides,
    ]
    cfg = load_config(base)
    flops_per_token = get_model_spec(cfg.model.name).flops_per_token(cfg.model, cfg.data.seq_len)
    results = {"treadle": run_treadle(cfg, args.steps, args.warmup)}
    batches = results["treadle"]["batches"]
    for peer in filter(None, args.peers.split(",")):
        fn = {"titan": run_titan, "hf": run_hf_moe}[peer]
        result = _try(peer, lambda fn=fn: fn(cfg, batches, args.steps, args.warmup))
        if result is not None:
            results[{"titan": "torchtitan_0.2.2", "hf": "transformers"}[peer]] = result
    summary = summarize(
        results, args.steps, tokens_per_step, flops_per_token, peak_flops(torch.device("cuda"))
    )
    case = (
        f"{args.recipe.split('/')[-1]}_S{cfg.data.seq_len}_mb{cfg.trainer.micro_batch_size}_gb"
        f"{cfg.trainer.global_batch_size}_bf16{'_compile' if cfg.parallel.compile else ''}"
        f"_{cfg.memory.activation_checkpoint}AC_moe-{cfg.kernels.moe}"
    )
    metrics = (("tokens_per_s", True), ("tflops_per_device", True), ("mfu", True), ("peak_memory_gib", False))
    return _lines(case, summary, metrics, "treadle", _common(steps=args.steps))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("layer", "step", "all"), default="all")
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here as well as stdout")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--moe-op", default="torch", help="treadle's kernels.moe for the layer part")
    parser.add_argument("--recipe", default="pretrain/moe_1gpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--peers", default="titan,hf", help="comma list of titan, hf, or empty")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for treadle's run, e.g. memory=selective_ac"
    )
    args = parser.parse_args()
    lines = []
    if args.part in ("layer", "all"):
        lines += run_layer(args)
    if args.part in ("step", "all"):
        lines += run_steps(args)
    emit(lines, args.out, append=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
