"""Pipeline parallelism: the model split into stages on the meta device, run by a `torch.distributed.pipelining`
schedule (GPipe, Huang et al. 2019; 1F1B and interleaved 1F1B, Narayanan et al. 2021 §2.2; zero-bubble, Qi et al.
2024). This file names no module of any model: which modules a stage keeps comes from the family's
`ModelSpec.pipeline_split`; the blocks are the model's `layers` ModuleDict.

Split: every stage is a copy of the meta model with the modules it does not keep removed (set to None, or deleted
from `layers`), so parameter names are those of the whole model and DCP checkpoints reshard between pipeline
layouts. The model passes through what a stage lacks (hidden states in, hidden states out).

Placement of stages on the `pp` ranks: `loop` (stage s on rank s mod pp: GPipe, 1F1B, the interleaved schedules)
or `v` (rank r holds stages r and 2·pp−1−r: ZBVZeroBubble, DualPipeV).

Communication: between neighbouring stages the schedule sends each micro-batch's activations forward and their
gradients backward (point-to-point over `pp`, the plain local tensors of the residual stream: under TP with
sequence parallelism each TP rank sends its own sequence shard to the same TP rank of the next stage). With tied
embeddings the last stage holds a copy of the embedding as its output weight; after backward the two copies'
gradients are all-reduced (sum) over the pair of ranks holding the first and the last stage (or added on one
rank under a V placement), so both copies take the same update. The loss and its token count are summed over
`pp` (only the last stage has them) for logging; the gradient norm is summed (as squares) over `pp`.

Keyword inputs of `step` (positions, document ids, a model's per-row auxiliary-loss weights) reach every stage,
cut into micro-batches with the rows: a stage's auxiliary loss is weighted by its own micro-batch's rows and joins
the gradient through the stage's output (models/moe/model.py `AddAuxiliaryLoss`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.torch_version import TorchVersion

from treadle.models.spec import ModelSpec
from treadle.parallel.config import ParallelConfig
from treadle.parallel.dims import ParallelDims

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleRule:
    stages_per_rank: int | None  # None: any number (the looped/interleaved schedules)
    placement: str  # loop | v
    min_microbatches: str  # "pp" (at least pp), "stages" (at least the number of stages) or "" (none)


# Schedule names as `torch.distributed.pipelining.schedules.get_schedule_class` spells them.
SCHEDULES: dict[str, ScheduleRule] = {
    "GPipe": ScheduleRule(1, "loop", ""),
    "1F1B": ScheduleRule(1, "loop", "pp"),
    "Interleaved1F1B": ScheduleRule(None, "loop", ""),
    "LoopedBFS": ScheduleRule(None, "loop", ""),
    "InterleavedZeroBubble": ScheduleRule(None, "loop", ""),
    "ZBVZeroBubble": ScheduleRule(2, "v", ""),
    "DualPipeV": ScheduleRule(2, "v", "stages"),
}


# The zero-bubble and V-shaped schedules train to parity on gloo with torch 2.13 (tests/distributed/
# test_pipeline.py); a first try with torch 2.11 on gloo failed, so CPU runs on an older torch are refused.
GLOO_MIN_TORCH = {"InterleavedZeroBubble": "2.13", "ZBVZeroBubble": "2.13", "DualPipeV": "2.13"}


def check_schedule_backend(schedule: str, gloo: bool) -> None:
    """Refuse a schedule the installed torch is not known to run on gloo (raises ValueError)."""
    need = GLOO_MIN_TORCH.get(schedule)
    if gloo and need is not None and TorchVersion(torch.__version__) < need:
        raise ValueError(
            f"parallel.pp_schedule={schedule} is not known to run on gloo (CPU) with torch {torch.__version__} "
            f"(it does from torch {need}); fix: parallel.pp_schedule=1F1B or Interleaved1F1B, run on GPUs "
            f"(NCCL), or upgrade torch"
        )


def _installed_schedules() -> dict[str, type]:
    from torch.distributed.pipelining import schedules

    found = {}
    for name in SCHEDULES:
        with contextlib.suppress(ValueError):  # this torch lacks it
            found[name] = schedules.get_schedule_class(name)
    return found


@dataclass(frozen=True)
class StageLayout:
    """How the blocks are cut into stages and where the stages run."""

    pp: int
    schedule: str
    layers_per_stage: tuple[int, ...]
    num_microbatches: int

    @property
    def num_stages(self) -> int:
        return len(self.layers_per_stage)

    @property
    def stages_per_rank(self) -> int:
        return self.num_stages // self.pp

    def rank_of(self, stage: int) -> int:
        if SCHEDULES[self.schedule].placement == "v":
            return stage if stage < self.pp else 2 * self.pp - 1 - stage
        return stage % self.pp

    def stages_of(self, pp_rank: int) -> list[int]:
        return [s for s in range(self.num_stages) if self.rank_of(s) == pp_rank]

    def bubble_fraction(self) -> float:
        """Idle fraction of each rank's time with forward and backward of one micro-batch on one stage taken as
        equal: (pp−1)/(v·m + pp−1) for the 1F1B family with v stages per rank and m micro-batches (Narayanan
        et al. 2021 §2.2). Zero-bubble schedules split backward into input and weight gradients to fill
        that idle time; their figure is the idle share of the schedule's own action table with every action (F, B,
        I, W, or DualPipeV's overlapped F+B) as one time unit (`_action_table_bubble`), a lower bound."""
        v, m = self.stages_per_rank, self.num_microbatches
        return (self.pp - 1) / (v * m + self.pp - 1)


def _layer_counts(cfg: ParallelConfig, pp: int, num_layers: int) -> tuple[tuple[int, ...], str]:
    """Blocks per stage from `parallel.pp_split`, `pp_layers_per_stage` or `pp_virtual_stages` (the first set
    wins), and the key that set them (for the caller's messages)."""
    if cfg.pp_split:
        layers = tuple(cfg.pp_split)
        key = f"parallel.pp_split={list(layers)}"
        if sum(layers) != num_layers or min(layers) < 1:
            raise ValueError(
                f"{key}: each stage needs at least one layer and the counts must add up to model.num_layers="
                f"{num_layers}; fix: list one positive layer count per stage summing to {num_layers}"
            )
        if len(layers) % pp:
            raise ValueError(
                f"{key} has {len(layers)} stages, not a multiple of parallel.pp={pp} (each rank runs the same "
                f"number of stages); fix: list {pp}·k layer counts"
            )
    elif cfg.pp_layers_per_stage > 0:
        per = cfg.pp_layers_per_stage
        key = f"parallel.pp_layers_per_stage={per}"
        if num_layers % per or (num_layers // per) % pp:
            raise ValueError(
                f"{key} must cut model.num_layers={num_layers} into a multiple of parallel.pp={pp} stages; fix: "
                f"a layers-per-stage count that divides {num_layers} into pp·k stages, or parallel.pp_split for "
                f"uneven stages"
            )
        layers = (per,) * (num_layers // per)
    else:
        num_stages = pp * cfg.pp_virtual_stages
        key = f"parallel.pp={pp} × parallel.pp_virtual_stages={cfg.pp_virtual_stages}"
        if cfg.pp_virtual_stages < 1 or num_stages > num_layers:
            raise ValueError(
                f"{key} = {num_stages} stages, but model.num_layers={num_layers} and every stage needs a layer; "
                f"fix: parallel.pp × parallel.pp_virtual_stages <= {num_layers}"
            )
        per, extra = divmod(num_layers, num_stages)
        layers = tuple(per + (s < extra) for s in range(num_stages))
    return layers, key


def plan_stages(cfg: ParallelConfig, pp: int, num_layers: int, num_microbatches: int) -> StageLayout:
    """The stage layout `parallel.pp*` asks for; raises ValueError naming the key and the fix."""
    installed = _installed_schedules()
    if cfg.pp_schedule not in SCHEDULES:
        raise ValueError(
            f"parallel.pp_schedule={cfg.pp_schedule!r} is not a known pipeline schedule; fix: choose one of "
            f"{list(SCHEDULES)}"
        )
    if cfg.pp_schedule not in installed:
        raise ValueError(
            f"parallel.pp_schedule={cfg.pp_schedule!r} is not in the installed torch {torch.__version__}; fix: "
            f"choose one of {list(installed)} or upgrade torch"
        )
    rule = SCHEDULES[cfg.pp_schedule]
    layers, key = _layer_counts(cfg, pp, num_layers)
    stages_per_rank = len(layers) // pp
    if rule.stages_per_rank is not None and stages_per_rank != rule.stages_per_rank:
        raise ValueError(
            f"parallel.pp_schedule={cfg.pp_schedule} runs {rule.stages_per_rank} stage(s) per rank, but {key} "
            f"gives {stages_per_rank}; fix: set parallel.pp_virtual_stages={rule.stages_per_rank} (and no "
            f"pp_layers_per_stage/pp_split giving another count), or choose a schedule for "
            f"{stages_per_rank} stages per rank (Interleaved1F1B)"
        )
    need = {"pp": pp, "stages": len(layers), "": 1}[rule.min_microbatches]
    if num_microbatches < need:
        raise ValueError(
            f"parallel.pp_schedule={cfg.pp_schedule} needs at least {need} micro-batches per step, but there are "
            f"{num_microbatches} (parallel.pp_microbatches, or the step's trainer micro-batches); fix: raise "
            f"parallel.pp_microbatches or trainer.global_batch_size to at least {need} micro-batches"
        )
    if cfg.pp_schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, num_microbatches // pp)
        if num_microbatches % rounds:
            raise ValueError(
                f"parallel.pp_schedule={cfg.pp_schedule} runs micro-batches in rounds of parallel.pp={pp}: "
                f"{num_microbatches} micro-batches is not a whole number of rounds; fix: a multiple of {pp}"
            )
    return StageLayout(
        pp=pp, schedule=cfg.pp_schedule, layers_per_stage=layers, num_microbatches=num_microbatches
    )


def count_microbatches(cfg: ParallelConfig, micro_batch_size: int, grad_accum: int) -> int:
    """Pipeline micro-batches per step: `parallel.pp_microbatches`, or (0) the trainer's micro-batches."""
    rows = micro_batch_size * grad_accum
    if cfg.pp_microbatches <= 0:
        return grad_accum
    if rows % cfg.pp_microbatches:
        raise ValueError(
            f"parallel.pp_microbatches={cfg.pp_microbatches} must divide the {rows} sequences each data-parallel "
            f"rank runs per step (trainer.micro_batch_size × grad accumulation = {micro_batch_size}×{grad_accum}); "
            f"fix: a divisor of {rows}, or 0 for one pipeline micro-batch per trainer micro-batch"
        )
    return cfg.pp_microbatches


def _is_block(fqn: str) -> bool:
    return fqn.startswith("layers.")


def stage_modules(spec: ModelSpec, model_cfg: Any, layout: StageLayout) -> list[list[str]]:
    """Per stage, the FQNs of the modules it keeps: the spec's split, with the blocks re-cut by the layout's
    layer counts when they differ from the spec's own cut."""
    if spec.pipeline_split is None:
        raise ValueError(
            f"parallel.pp={layout.pp}: model.name={spec.name} has no pipeline split; fix: parallel.pp=1"
        )
    split = spec.pipeline_split(model_cfg, layout.num_stages)
    if [sum(map(_is_block, s)) for s in split] == list(layout.layers_per_stage):
        return split
    assert all(_is_block(f) for s in split[1:-1] for f in s), "middle stages hold blocks only"
    blocks = [f for s in split for f in s if _is_block(f)]
    head = [f for f in split[0] if not _is_block(f)]
    tail = [f for f in split[-1] if not _is_block(f)]
    stages, start = [], 0
    for count in layout.layers_per_stage:
        stages.append(blocks[start : start + count])
        start += count
    stages[0] = head + stages[0]
    stages[-1] = stages[-1] + tail
    return stages


@dataclass
class StageSplit:
    """This rank's stages (index and module, meta device) and the tied output weight, if any."""

    indices: list[int]
    modules: list[nn.Module]
    # FQN of the output weight when the last stage holds a copy of a first-stage parameter (tied embeddings)
    tied_fqn: str | None = None
    hidden_size: int = 0


def split_model(
    model: nn.Module, spec: ModelSpec, model_cfg: Any, layout: StageLayout, pp_rank: int
) -> StageSplit:
    """The stages of `layout` that `pp_rank` runs, as copies of the meta `model` with what they lack removed."""
    kept = stage_modules(spec, model_cfg, layout)
    listed = {f for s in kept for f in s}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out_fqn = names[id(model.output_weight)]
    out_module = out_fqn.rpartition(".")[0]
    tied_fqn = None
    if out_module not in kept[-1]:
        # The output weight belongs to a module of another stage (tied embeddings): the last stage keeps a copy.
        kept[-1] = [*kept[-1], out_module]
        tied_fqn = out_fqn
    hidden_size = model.output_weight.shape[-1]
    indices = layout.stages_of(pp_rank)
    modules = []
    for index in indices:
        stage = copy.deepcopy(model)
        for fqn in listed - set(kept[index]):
            parent, _, name = fqn.rpartition(".")
            owner = stage.get_submodule(parent) if parent else stage
            if isinstance(owner, nn.ModuleDict):
                del owner[name]
            else:
                setattr(owner, name, None)
        modules.append(stage)
    return StageSplit(indices=indices, modules=modules, tied_fqn=tied_fqn, hidden_size=hidden_size)


@dataclass
class Pipeline:
    """This rank's stages run by the layout's schedule (built per batch shape), and the tied-weight sync."""

    layout: StageLayout
    split: StageSplit
    dims: ParallelDims
    device: torch.device
    dtype: torch.dtype  # of the activations between stages (FSDP's parameter dtype)
    sequence_parallel: bool
    # (last stage module, hidden, labels) -> (summed loss, counted tokens)
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    _schedules: dict[tuple[int, int], Any] = field(default_factory=dict)
    _tied_group: dist.ProcessGroup | None = None
    _scale: torch.Tensor | None = None
    _losses: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.group = self.dims.mesh("pp").get_group()
        self.pp_rank = self.dims.mesh("pp").get_local_rank()
        if self.split.tied_fqn is not None and self.layout.rank_of(self.layout.num_stages - 1) != 0:
            self._tied_group = _pair_groups(self.dims, self.layout.rank_of(self.layout.num_stages - 1))

    @property
    def modules(self) -> list[nn.Module]:
        return self.split.modules

    def _is_last(self, index: int) -> bool:
        return index == self.layout.num_stages - 1

    def _shapes(self, rows: int, seq_len: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta tensors of a stage's input and output for micro-batches of `rows` × `seq_len` (this CP rank's
        tokens): token ids into the first stage, the residual stream between stages (this TP rank's sequence
        shard under sequence parallelism), the final hidden states out of the last."""
        tp_shard = self.dims.tp if self.sequence_parallel and self.dims.tp > 1 else 1
        hidden, meta = self.split.hidden_size, {"dtype": self.dtype, "device": "meta"}
        # requires_grad: torch's static stage metadata decides from it whether activations take gradients.
        stream = torch.empty(rows, seq_len // tp_shard, hidden, **meta, requires_grad=True)
        tokens = torch.empty(rows, seq_len, dtype=torch.long, device="meta")
        final = torch.empty(rows, seq_len, hidden, **meta, requires_grad=True)
        return (tokens if index == 0 else stream), (final if self._is_last(index) else stream)

    def build_schedule(self, rows: int, seq_len: int) -> Any:
        """The schedule (and its stages) for steps of `rows` × `seq_len` tokens on this rank, built once."""
        key = (rows, seq_len)
        if key not in self._schedules:
            from torch.distributed.pipelining import PipelineStage

            mb_rows = rows // self.layout.num_microbatches
            stages = []
            for index, module in zip(self.split.indices, self.split.modules, strict=True):
                inputs, outputs = self._shapes(mb_rows, seq_len, index)
                stage = PipelineStage(
                    module,
                    index,
                    self.layout.num_stages,
                    self.device,
                    input_args=inputs,
                    output_args=outputs,
                    group=self.group,
                )
                stages.append(stage)
            cls = _installed_schedules()[self.layout.schedule]
            single = SCHEDULES[self.layout.schedule].stages_per_rank == 1
            # Summed losses scaled by the trainer's global normalisation: the schedule must not rescale.
            self._schedules[key] = cls(
                stages[0] if single else stages,
                n_microbatches=self.layout.num_microbatches,
                loss_fn=self._loss_fn,
                scale_grads=False,
            )
        return self._schedules[key]

    def _last_module(self) -> nn.Module:
        return self.split.modules[self.split.indices.index(self.layout.num_stages - 1)]

    def _loss_fn(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        summed, _ = self.loss(self._last_module(), hidden, labels)
        self._losses.append(summed.detach().double())
        assert self._scale is not None
        return summed * self._scale.to(summed.dtype)

    def step(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        kwargs: dict[str, torch.Tensor],
        loss_scale: torch.Tensor,
    ) -> torch.Tensor:
        """Forward and backward of the step's rows in `num_microbatches` micro-batches; returns the summed loss
        over `pp` (every rank), fp64."""
        schedule = self.build_schedule(tokens.shape[0], tokens.shape[1])
        self._scale, self._losses = loss_scale, []
        schedule.step(tokens, target=labels, **kwargs)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for loss in self._losses:
            loss_sum += loss
        self._losses = []
        dist.all_reduce(loss_sum, group=self.group)
        return loss_sum

    @torch.no_grad()
    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor, kwargs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, counted tokens) of one batch through every stage in order, without a schedule:
        stage s receives from the rank of stage s−1 and sends to that of s+1 (point-to-point over `pp`)."""
        layout, previous = self.layout, None
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for index in range(layout.num_stages):
            owner = layout.rank_of(index)
            if owner != self.pp_rank:
                continue
            module = self.split.modules[self.split.indices.index(index)]
            if index == 0:
                x = tokens
            elif layout.rank_of(index - 1) == self.pp_rank:
                x = previous
            else:
                like = self._shapes(tokens.shape[0], tokens.shape[1], index)[0]
                x = torch.empty(like.shape, dtype=like.dtype, device=self.device)
                dist.recv(x, group=self.group, group_src=layout.rank_of(index - 1))
            out = module(x, **kwargs)
            if self._is_last(index):
                summed, counted = self.loss(module, out, labels)
                loss, count = summed.double(), counted.double()
            elif layout.rank_of(index + 1) != self.pp_rank:
                dist.send(out.contiguous(), group=self.group, group_dst=layout.rank_of(index + 1))
            previous = out
        totals = torch.stack([loss, count])
        dist.all_reduce(totals, group=self.group)
        return totals[0], totals[1]

    @torch.no_grad()
    def sync_tied_grads(self) -> None:
        """Sum the gradients of the first stage's output weight and the last stage's copy of it (see the module
        docstring): the whole gradient of the one tied weight, on both copies."""
        fqn = self.split.tied_fqn
        if fqn is None:
            return
        local = dict(zip(self.split.indices, self.split.modules, strict=True))
        copies = [local[i].get_parameter(fqn) for i in (0, self.layout.num_stages - 1) if i in local]
        copies = [p for p in copies if p.requires_grad]  # a frozen base (LoRA) has nothing to sum
        grads = [_local(p.grad) for p in copies if p.grad is not None]
        if self._tied_group is None:  # both copies on this rank (V placement), or none
            if len(grads) == 2:
                grads[0].add_(grads[1])
                grads[1].copy_(grads[0])
            return
        if copies:
            assert len(grads) == 1, "a tied weight without a gradient"
            dist.all_reduce(grads[0], group=self._tied_group)

    def norm_shared(self) -> list[nn.Parameter]:
        """Parameters whose gradient another stage also holds (the last stage's tied copy): clipping counts
        them once, on the first stage."""
        if self.split.tied_fqn is None or self.layout.num_stages - 1 not in self.split.indices:
            return []
        last = self.split.indices.index(self.layout.num_stages - 1)
        return [self.split.modules[last].get_parameter(self.split.tied_fqn)]

    def describe(self) -> str:
        layout = self.layout
        bubble = layout.bubble_fraction()
        table = self._action_table_bubble()
        figure = (
            f"{bubble:.1%}"
            if table is None
            else f"{table:.1%} (idle share of the action table, unit-time actions)"
        )
        return (
            f"pipeline {layout.schedule}: {layout.num_stages} stages of {list(layout.layers_per_stage)} layers "
            f"over pp={layout.pp}, {layout.num_microbatches} micro-batches per step, bubble {figure}"
        )

    def _action_table_bubble(self) -> float | None:
        """Idle share of the multi-stage schedules' action tables (every action one time unit), when built."""
        if "ZeroBubble" not in self.layout.schedule and self.layout.schedule != "DualPipeV":
            return None
        for schedule in self._schedules.values():
            order = getattr(schedule, "pipeline_order", None)
            if order:
                slots = [a for actions in order.values() for a in actions]
                return sum(a is None for a in slots) / max(1, len(slots))
        return None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _pair_groups(dims: ParallelDims, last_rank: int) -> dist.ProcessGroup | None:
    """The group of the ranks holding the first and the last stage at this rank's position on the other axes
    (every rank creates every pair's group, in the same order: `new_group` is collective)."""
    world = dims.mesh().mesh  # [pp, dp_replicate, dp_shard, cp, tp] of global ranks
    rows = world.movedim(0, -1).reshape(-1, dims.pp)
    mine = None
    for row in rows.tolist():
        ranks = [row[0], row[last_rank]]
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


class OptimizerGroup(torch.optim.Optimizer):
    """One optimizer per local pipeline stage (each over one stage's parameters, so DCP's state-dict helpers map
    every parameter to its name within its stage) behind the one optimizer the LR schedule and the engine's
    step use. `param_groups` are the inner optimizers' own group dicts, so the schedule's learning rates reach
    them."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        super().__init__([p for o in optimizers for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        assert closure is None, "closures are not supported over several optimizers"
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def num_blocks(spec: ModelSpec, model_cfg: Any) -> int:
    """The model's number of blocks, from its spec's split into one stage."""
    if spec.pipeline_split is None:
        raise ValueError(f"parallel.pp > 1: model.name={spec.name} has no pipeline split; fix: parallel.pp=1")
    return sum(map(_is_block, spec.pipeline_split(model_cfg, 1)[0]))


def build_pipeline(
    model: nn.Module,
    spec: ModelSpec,
    model_cfg: Any,
    *,
    cfg: ParallelConfig,
    dims: ParallelDims,
    device: torch.device,
    micro_batch_size: int,
    grad_accum: int,
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> Pipeline:
    """This rank's stages of the meta `model` (plans not applied yet) and the schedule that will run them."""
    from treadle.parallel.fsdp import resolve_dtype

    layout = plan_stages(
        cfg, dims.pp, len(model.layers), count_microbatches(cfg, micro_batch_size, grad_accum)
    )
    split = split_model(model, spec, model_cfg, layout, dims.mesh("pp").get_local_rank())
    return Pipeline(
        layout=layout,
        split=split,
        dims=dims,
        device=device,
        dtype=resolve_dtype(cfg.param_dtype, device, "parallel.param_dtype"),
        sequence_parallel=cfg.sequence_parallel,
        loss=loss,
    )
