"""`ModelSpec`: everything generic code needs to know about a model family, registered once per family.

A family is one folder, `models/<family>/`, whose `__init__.py` builds one `ModelSpec` and registers it. The
trainer, the engines and the plan appliers in `parallel/` ask the spec and never name a model's modules.

What a family's module (each model part) offers the generic code:

- `forward(tokens_BS, *, positions_BS=None, doc_ids_BS=None)` returns the final hidden states [B, S, E]; the loss
  (`models.loss`) is a separate component that the engine applies to the last part with its `output_weight`;
- `layers`: an `nn.ModuleDict` of the repeated blocks, keyed by index (activation checkpointing, compile, FSDP
  and activation-memory hooks act per block, and keys keep parameter names stable when a block is wrapped);
- `ops`: the op table (`models.ops.Ops`) every block calls, so a plan can swap an op for the whole model;
- `init_weights(seed)`: fills every parameter from the per-name streams of `models.init`, after `to_empty`;
- `output_weight`: the [V, E] output projection the loss multiplies by (the last part only);
- optionally `weight_std(name)`: the init std of a weight by name, for bases created quantized (QLoRA);
- optionally `pop_auxiliary_loss()`: after a training forward, an auxiliary loss (a per-token mean, e.g. MoE
  load balancing) that the engine adds to the LM loss, weighted by the micro-batch's counted tokens; such a
  model's `forward` then also takes `aux_loss_weight_B` (per row: counted tokens × the step's loss scale), which
  the engine passes to every pipeline stage, so that each stage adds its share to the gradient itself (the
  schedule only backpropagates from the last stage's loss);
- optionally `compile_fullgraph`: False when a block cannot trace as one graph (MoE layers that read row counts
  on the host).

TP and EP plans are data: FQN patterns (`*` matches one name component, e.g. `layers.*.mlp.down_proj`) mapped to
the style names that `parallel/tp.py` (and the expert-parallel applier) understand; see `TP_STYLES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch.nn as nn

from treadle.models.ops import KernelsConfig

# Tensor-parallel styles a plan may name (their communication is documented in parallel/tp.py):
#   colwise        linear sharded on output features; input Replicate, output local and sharded on the last dim
#   rowwise        linear sharded on input features; partial outputs reduced (to Shard(seq) with SP)
#   embedding      vocabulary-sharded embedding; partial outputs reduced to the residual stream's placement
#   output         vocabulary-sharded output projection; logits stay Shard(vocab) (loss parallel)
#   norm           a norm on the residual stream (runs on the sequence shard with SP; nothing without SP)
#   final_norm     `norm`, then its output made Replicate for the loss
#   sublayer_input the module's first positional input (the residual stream) made Replicate; other inputs kept
TP_STYLES = ("colwise", "rowwise", "embedding", "output", "norm", "final_norm", "sublayer_input")


class Dims(Protocol):
    """What a family's validation reads of `parallel.dims.ParallelDims` (models/ does not import parallel/)."""

    tp: int
    cp: int
    ep: int
    pp: int


@dataclass(frozen=True)
class HFPart:
    """A checkpoint tensor, or a region of one, that holds one of our parameters or one row of its dim 0.

    Stacked parameters (MoE experts [N, F, E]) are stored by Hugging Face as one tensor per expert (transformers
    4 layout, and what transformers 5 writes by default) or fused across experts and projections (transformers
    5's `gate_up_proj` [N, 2F, E] holds `gate_proj` at rows 0..F-1 of dim 1 and `up_proj` at rows F..2F-1).
    """

    key: str
    shape: tuple[int, ...]  # the stored tensor's full shape, checked before any read
    # None: the part is the whole parameter (stored with the parameter's rank); i: it is row i of the
    # parameter's dim 0, stored with one dim fewer.
    row: int | None = None
    # Where the parameter (or row) starts in each dim of the stored tensor; None: at 0 in every dim. Only reads
    # use offsets: exports write whole tensors (parts without offsets).
    offsets: tuple[int, ...] | None = None


# What `HFAdapter.hf_parts` may ask of a checkpoint while choosing a layout: a key's stored shape, None if absent.
StoredShape = Callable[[str], "tuple[int, ...] | None"]


class HFAdapter(Protocol):
    """Hugging Face checkpoints <-> one family: config.json fields and parameter names (models/hf.py does the
    file I/O, sharded reads and shard writing for every family)."""

    architectures: Sequence[str]

    def config_from_hf(self, base: Any, hf_config: dict[str, Any], path: Any) -> Any: ...
    def config_to_hf(self, cfg: Any, architecture: str, dtype: Any) -> dict[str, Any]: ...
    def architecture_of(self, cfg: Any) -> str: ...
    def for_architecture(self, architecture: str) -> HFAdapter:
        """The adapter whose names are those of `architecture` (a family whose architectures name their
        tensors differently, e.g. Mixtral's `block_sparse_moe`, has one per architecture)."""
        ...

    def hf_name(self, name: str) -> str: ...
    def hf_parts(self, name: str, shape: tuple[int, ...], stored: StoredShape | None) -> list[HFPart]:
        """Where our (canonical) parameter `name` of full `shape` lives in a checkpoint: its parts. `stored`
        answers for the checkpoint being read (the adapter picks the layout it finds and may raise a
        ValueError naming the key and the fix); None asks for the layout to export."""
        ...

    def ignored_keys(self, key: str) -> bool: ...


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the value of `model.name` that selects this family
    # The dataclass `model=` selects (registered in the ConfigStore as model/<name>_schema). Generic code reads
    # its `name`, `vocab_size` and `pretrained` (a Hugging Face directory, or None) fields.
    config_cls: type
    build: Callable[[Any, KernelsConfig], nn.Module]  # (model config, kernels) -> module; call under meta
    flops_per_token: Callable[[Any, int], float]  # (model config, seq_len) -> training FLOPs per token
    # (model config, dims, seq_len=, cp_variant=) -> None; raises ValueError naming the key and the fix
    validate: Callable[..., None]
    tp_plan: dict[str, str] = field(default_factory=dict)  # FQN pattern -> TP style (TP_STYLES)
    ep_plan: dict[str, str] = field(
        default_factory=dict
    )  # FQN pattern -> EP style (parallel/ep.py: moe, experts)
    # (model config, num_stages) -> per stage, the FQNs of the modules that stage keeps
    pipeline_split: Callable[[Any, int], list[list[str]]] | None = None
    hf_adapter: HFAdapter | None = None
    # Module names that `peft.target_modules` may not name, each with the reason given to the user (e.g. MoE
    # routed experts: stacked parameters, not linear layers).
    lora_refused: dict[str, str] = field(default_factory=dict)
    # (model parts, ParallelDims) -> metrics: run after each optimizer step (not after a skipped one) on every
    # rank; each may return metrics to log (device tensors, read only on logged steps), e.g. MoE expert load.
    post_step: tuple[Callable[[list[nn.Module], Any], dict[str, Any] | None], ...] = ()

    def linear_names(self) -> tuple[str, ...]:
        """Names (last FQN component) of the blocks' linear layers: the TP plan's column/row-parallel entries,
        what `peft.target_modules=all-linear` adapts."""
        names = [
            pattern.rsplit(".", 1)[-1]
            for pattern, style in self.tp_plan.items()
            if style in ("colwise", "rowwise") and pattern.startswith("layers.")
        ]
        return tuple(dict.fromkeys(names))


# Built-in families, imported when first asked for (a run imports only the family it trains).
_BUILTIN = {"llama": "treadle.models.llama", "moe": "treadle.models.moe"}
_MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> None:
    """Make `spec` selectable as `model.name=<spec.name>`; a family's `__init__` calls it on import."""
    for style in spec.tp_plan.values():
        if style not in TP_STYLES:
            raise ValueError(f"model {spec.name!r}: TP plan style {style!r} is not one of {TP_STYLES}")
    _MODELS[spec.name] = spec


def load_builtin_families() -> list[ModelSpec]:
    """Import every built-in family (registering its spec); returns every registered spec."""
    for module in _BUILTIN.values():
        importlib.import_module(module)
    return list(_MODELS.values())


def get_model_spec(name: str) -> ModelSpec:
    if name not in _MODELS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _MODELS:
        known = sorted({*_MODELS, *_BUILTIN})
        raise ValueError(f"model.name={name!r} is not a registered model family; choose one of {known}")
    return _MODELS[name]
