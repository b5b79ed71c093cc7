"""`ParallelDims`: the one topology object. It checks the degrees and owns every `DeviceMesh` of a run.

The world is laid out as `dp_replicate × dp_shard × cp × tp` (outermost to innermost, so that TP, the most
communication-heavy axis, gets the closest ranks). Derived meshes are flattened views of it:

- `dp`          = dp_replicate × dp_shard      ranks that see different data
- `dp_shard_cp` = dp_shard × cp                ranks that FSDP shards parameters over (CP ranks hold the
                                                same parameters, so they join the shard group)
- `dp_cp`       = dp_replicate × dp_shard × cp  ranks over which the loss and token counts are reduced
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from treadle.parallel.deepspeed_config import DeepSpeedConfig

AXES = ("dp_replicate", "dp_shard", "cp", "tp")


@dataclass(kw_only=True)
class ParallelConfig:
    engine: str = "native"  # native | deepspeed | megatron
    dp_replicate: int = 1  # HSDP replicas (each replica is an FSDP group)
    dp_shard: int = -1  # FSDP shard degree; -1 = whatever the other degrees leave of the world
    cp: int = 1
    tp: int = 1
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


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    world_size: int
    _mesh: DeviceMesh | None = field(default=None, repr=False)
    _flat: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        return cls(
            dp_replicate=cfg.dp_replicate, dp_shard=cfg.dp_shard, cp=cfg.cp, tp=cfg.tp, world_size=world_size
        )

    def __post_init__(self) -> None:
        for axis in ("dp_replicate", "cp", "tp"):
            if getattr(self, axis) < 1:
                raise ValueError(f"parallel.{axis}={getattr(self, axis)} must be >= 1")
        others = self.dp_replicate * self.cp * self.tp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ValueError(
                    f"world size {self.world_size} is not divisible by parallel.dp_replicate × cp × tp = "
                    f"{self.dp_replicate}×{self.cp}×{self.tp} = {others}; fix: choose degrees whose product "
                    f"divides the number of processes"
                )
            self.dp_shard = self.world_size // others
        if self.dp_shard < 1:
            raise ValueError(f"parallel.dp_shard={self.dp_shard} must be >= 1 or -1 (infer)")
        product = others * self.dp_shard
        if product != self.world_size:
            raise ValueError(
                f"parallel.dp_replicate × dp_shard × cp × tp = {self.dp_replicate}×{self.dp_shard}×{self.cp}×"
                f"{self.tp} = {product} but the world size is {self.world_size}; fix: make the product equal "
                f"the number of processes (or set parallel.dp_shard=-1 to infer it)"
            )

    @property
    def dp_size(self) -> int:
        """Data-parallel degree: how many different micro-batches one step sees side by side."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_size(self) -> int:
        return self.dp_shard * self.cp

    def build_mesh(self, device_type: str, *, tp_comm_max_ctas: int = 0) -> DeviceMesh:
        """Create the world mesh and its flattened views (collective: every rank must call it).
        `tp_comm_max_ctas` > 0 (NCCL only): the TP group's communicator runs on at most that many CTAs."""
        shape = tuple(getattr(self, axis) for axis in AXES)
        kwargs = {}
        if tp_comm_max_ctas > 0 and self.tp > 1:
            options = torch.distributed.ProcessGroupNCCL.Options()
            options.config.max_ctas = tp_comm_max_ctas
            kwargs["backend_override"] = {"tp": ("nccl", options)}
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=AXES, **kwargs)
        # Flattened views are kept here rather than sliced from the root later (torch deprecates that).
        self._flat = {
            "dp": mesh["dp_replicate", "dp_shard"]._flatten("dp"),
            "dp_shard_cp": mesh["dp_shard", "cp"]._flatten("dp_shard_cp"),
            "dp_cp": mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp"),
        }
        self._mesh = mesh
        return mesh

    @property
    def mesh(self) -> DeviceMesh:
        assert self._mesh is not None, "build_mesh() has not been called"
        return self._mesh

    def flat(self, name: str) -> DeviceMesh:
        """A flattened view: `dp`, `dp_shard_cp` or `dp_cp` (see the module docstring)."""
        assert name in self._flat, f"build_mesh() has not been called or {name!r} is unknown"
        return self._flat[name]

    def fsdp_mesh(self) -> DeviceMesh:
        """1-D (dp_shard_cp) for FSDP, 2-D (dp_replicate, dp_shard_cp) for HSDP."""
        if self.dp_replicate > 1:
            if self.cp == 1:  # dp_shard_cp is dp_shard: slice the root's own axes
                return self.mesh["dp_replicate", "dp_shard"]
            return self.mesh["dp_replicate", "dp_shard_cp"]
        return self.flat("dp_shard_cp")

    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    def cp_mesh(self) -> DeviceMesh:
        return self.mesh["cp"]

    def dp_rank(self) -> int:
        return self.flat("dp").get_local_rank()


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
