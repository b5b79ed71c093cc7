"""`ParallelDims`: the one topology object. It checks the degrees and owns every `DeviceMesh` of a run.

The world is laid out as `pp × dp_replicate × dp_shard × cp × tp` (outermost to innermost, so that TP, the most
communication-heavy axis, gets the closest ranks). Derived meshes are flattened views of it:

- `dp`          = dp_replicate × dp_shard      ranks that see different data
- `dp_shard_cp` = dp_shard × cp                ranks that FSDP shards parameters over (CP ranks hold the
                                                same parameters, so they join the shard group)
- `dp_cp`       = dp_replicate × dp_shard × cp  ranks over which the loss and token counts are reduced

Experts see the same ranks as a second view, `pp × dp_replicate × efsdp × ep` with efsdp = dp_shard·cp·tp / ep:
experts are sharded over `ep` and their parameters FSDP-sharded over `efsdp` (built when first asked for); its
flattened `experts_stage` = dp_replicate × efsdp × ep is every rank of one pipeline stage (MoE load counts are
summed over it).

Meshes are looked up by axis names: `dims.mesh()` is the whole world, `dims.mesh("tp")` one axis,
`dims.mesh("dp_replicate", "dp_shard")` a slice, `dims.mesh("dp_cp")` a flattened view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
FLAT = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
}
EXPERT_AXES = ("pp", "dp_replicate", "efsdp", "ep")


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    world_size: int
    pp: int = 1
    ep: int = 1
    _mesh: DeviceMesh | None = field(default=None, repr=False)
    _flat: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)
    _expert_mesh: DeviceMesh | None = field(default=None, repr=False)
    _expert_stage: DeviceMesh | None = field(default=None, repr=False)
    _device_type: str = field(default="cpu", repr=False)

    @classmethod
    def from_config(cls, cfg, world_size: int) -> ParallelDims:
        """From a `parallel.config.ParallelConfig` (or anything with its degree fields)."""
        return cls(
            pp=cfg.pp,
            dp_replicate=cfg.dp_replicate,
            dp_shard=cfg.dp_shard,
            cp=cfg.cp,
            tp=cfg.tp,
            ep=cfg.ep,
            world_size=world_size,
        )

    def __post_init__(self) -> None:
        for axis in ("pp", "dp_replicate", "cp", "tp", "ep"):
            if getattr(self, axis) < 1:
                raise ValueError(f"parallel.{axis}={getattr(self, axis)} must be >= 1")
        others = self.pp * self.dp_replicate * self.cp * self.tp
        # pp is named only when it is set, so the common messages read as the degrees the user sets.
        pp_names, pp_values = ("pp × ", f"{self.pp}×") if self.pp > 1 else ("", "")
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ValueError(
                    f"world size {self.world_size} is not divisible by parallel.{pp_names}dp_replicate × cp × tp = "
                    f"{pp_values}{self.dp_replicate}×{self.cp}×{self.tp} = {others}; fix: choose degrees whose "
                    f"product divides the number of processes"
                )
            self.dp_shard = self.world_size // others
        if self.dp_shard < 1:
            raise ValueError(f"parallel.dp_shard={self.dp_shard} must be >= 1 or -1 (infer)")
        product = others * self.dp_shard
        if product != self.world_size:
            raise ValueError(
                f"parallel.{pp_names}dp_replicate × dp_shard × cp × tp = {pp_values}{self.dp_replicate}×"
                f"{self.dp_shard}×{self.cp}×{self.tp} = {product} but the world size is {self.world_size}; fix: make "
                f"the product equal the number of processes (or set parallel.dp_shard=-1 to infer it)"
            )
        non_expert = self.dp_shard * self.cp * self.tp
        if non_expert % self.ep:
            raise ValueError(
                f"parallel.ep={self.ep} must divide parallel.dp_shard × cp × tp = {self.dp_shard}×{self.cp}×"
                f"{self.tp} = {non_expert} (experts are sharded over ranks of those axes); fix: choose an ep "
                f"that divides {non_expert}"
            )

    @property
    def dp_size(self) -> int:
        """Data-parallel degree: how many different micro-batches one step sees side by side."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_size(self) -> int:
        return self.dp_shard * self.cp

    @property
    def efsdp(self) -> int:
        """The degree experts' parameters are FSDP-sharded over: dp_shard·cp·tp / ep."""
        return self.dp_shard * self.cp * self.tp // self.ep

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
        self._flat = {name: mesh[axes]._flatten(name) for name, axes in FLAT.items()}
        self._mesh, self._device_type = mesh, device_type
        return mesh

    def mesh(self, *names: str) -> DeviceMesh:
        """The world mesh (no names), one axis or flattened view, or a slice of several axes (see the module
        docstring). Expert axes (`efsdp`, `ep`) come from the experts' view."""
        assert self._mesh is not None, "build_mesh() has not been called"
        if not names:
            return self._mesh
        if names == ("experts_stage",):
            self._experts()
            assert self._expert_stage is not None
            return self._expert_stage
        if set(names) & {"efsdp", "ep"}:
            return self._experts()[names]
        if len(names) == 1 and names[0] in self._flat:
            return self._flat[names[0]]
        unknown = [n for n in names if n not in AXES and n not in FLAT]
        assert not unknown, f"unknown mesh axes {unknown}; axes are {AXES}, views {tuple(FLAT)}"
        return self._mesh[names]

    def _experts(self) -> DeviceMesh:
        """`pp × dp_replicate × efsdp × ep` over the same ranks in the same order (collective on first call)."""
        if self._expert_mesh is None:
            shape = (self.pp, self.dp_replicate, self.efsdp, self.ep)
            self._expert_mesh = init_device_mesh(self._device_type, shape, mesh_dim_names=EXPERT_AXES)
            self._expert_stage = self._expert_mesh[EXPERT_AXES[1:]]._flatten("experts_stage")
        return self._expert_mesh

    def fsdp_mesh(self) -> DeviceMesh:
        """1-D (dp_shard_cp) for FSDP, 2-D (dp_replicate, dp_shard_cp) for HSDP."""
        if self.dp_replicate > 1:
            if self.cp == 1:  # dp_shard_cp is dp_shard: slice the root's own axes
                return self.mesh("dp_replicate", "dp_shard")
            return self.mesh("dp_replicate", "dp_shard_cp")
        return self.mesh("dp_shard_cp")

    def expert_fsdp_mesh(self) -> DeviceMesh:
        """What expert weights are FSDP-sharded over: `efsdp`, 2-D (dp_replicate, efsdp) with HSDP."""
        return self.mesh("dp_replicate", "efsdp") if self.dp_replicate > 1 else self.mesh("efsdp")

    def dp_rank(self) -> int:
        return self.mesh("dp").get_local_rank()
