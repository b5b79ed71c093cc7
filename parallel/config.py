"""`ParallelConfig`: the `parallel` group of the config tree (degrees, engine, overlap switches)."""

from __future__ import annotations

from dataclasses import dataclass, field

from treadle.parallel.deepspeed_config import DeepSpeedConfig


@dataclass(kw_only=True)
class ParallelConfig:
    engine: str = "native"  # a name in the engine registry (parallel/engine.py: native | deepspeed)
    pp: int = 1  # pipeline-parallel degree: ranks the model's stages are spread over (parallel/pipeline.py)
    # GPipe | 1F1B | Interleaved1F1B | LoopedBFS | InterleavedZeroBubble | ZBVZeroBubble | DualPipeV (torch's names)
    pp_schedule: str = "1F1B"
    # pipeline micro-batches per step on each data-parallel rank; 0 = one per trainer micro-batch (the step's
    # trainer.micro_batch_size × grad-accumulation sequences are split into this many)
    pp_microbatches: int = 0
    pp_virtual_stages: int = 1  # stages per pp rank (2 for the V schedules, >= 2 to interleave)
    pp_layers_per_stage: int = 0  # > 0: cut the blocks into stages of this many (overrides pp_virtual_stages)
    # explicit layer count per stage (e.g. [7, 9, 9, 7] for lighter first and last stages); overrides the above
    pp_split: list[int] = field(default_factory=list)
    dp_replicate: int = 1  # HSDP replicas (each replica is an FSDP group)
    dp_shard: int = -1  # FSDP shard degree; -1 = whatever the other degrees leave of the world
    cp: int = 1
    tp: int = 1
    ep: int = (
        1  # expert parallelism: experts sharded over ep ranks of dp_shard·cp·tp (not implemented beyond 1)
    )
    # true: ZeRO-3 (parameters resharded after forward); false: ZeRO-2 (kept unsharded until backward ends).
    reshard_after_forward: bool = True
    param_dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    reduce_dtype: str = "fp32"  # gradient reduce-scatter / all-reduce dtype
    sequence_parallel: bool = True  # with tp > 1: shard activations on the sequence between blocks
    # with tp > 1 on GPUs: torch's micro-pipelined (async) TP, which splits the all-gather/reduce-scatter around
    # each TP matmul into chunks overlapped with the matmul through symmetric memory; needs parallel.compile.
    async_tp: bool = False
    # with tp > 1, sequence_parallel=false: each block runs its micro-batch as two halves interleaved sublayer by
    # sublayer (attention of both, then MLP of both), so one half's TP all-reduce can run while the other half's
    # GEMMs do (DeepSpeed Domino's batch split); plain collectives, eager or compiled (then with tp_comm_reorder's
    # reordering, whatever that key says, and the halves' kernels kept apart). 1B, TP=2 on 2 H200s: 1.03-1.06x
    # TP+SP, level with tp_comm_reorder alone: README.
    tp_batch_overlap: bool = False
    # with tp > 1 and compile: Inductor reorders each compiled block so a TP collective runs beside compute that
    # does not need it (e.g. without SP, in backward, the activation gradient's all-reduce beside the weight-
    # gradient GEMMs). Sets Inductor's reordering for the whole process. 1B, TP=2 on 2 H200s: TP+SP 1.02-1.03x, no SP
    # 1.02-1.08x against TP+SP without it (README).
    tp_comm_reorder: bool = False
    # with tp > 1 on GPUs: the most CTAs (thread blocks, one per channel, each on an SM) NCCL runs the TP group's
    # collectives on; 0 leaves it to NCCL. Fewer leave more SMs to the GEMMs that overlapped collectives run
    # beside (tp_batch_overlap, tp_comm_reorder), at some bandwidth. 1B, TP=2, 2 H200s: no consistent gain (README).
    tp_comm_max_ctas: int = 0
    cp_variant: str = "ring"  # with cp > 1: ring (p2p key/value rotation) | ulysses (all-to-all over heads)
    compile: bool = False  # torch.compile each transformer block
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    fsdp_prefetch_forward: int = 1  # blocks all-gathered ahead in forward (FSDP2 explicit prefetch)
    fsdp_prefetch_backward: int = 1  # blocks all-gathered ahead in backward
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)  # with engine=deepspeed
