"""The engine registry: `parallel.engine=<name>` → the engine's factory, its config class and its validation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from treadle.parallel.config import ParallelConfig
from treadle.parallel.deepspeed_config import DeepSpeedConfig, validate_deepspeed
from treadle.parallel.deepspeed_engine import DeepSpeedEngine
from treadle.parallel.dims import ParallelDims
from treadle.parallel.engine import Engine, EngineSetup, NativeEngine


@dataclass(frozen=True)
class EngineEntry:
    name: str
    factory: Callable[[EngineSetup], Engine]
    # The engine's own config dataclass (a field of ParallelConfig, e.g. `parallel.deepspeed`), if it has one.
    config_cls: type | None = None
    # (parallel config, dims) -> None: raises ValueError naming the key and the fix.
    validate: Callable[[ParallelConfig, ParallelDims], None] | None = None


_ENGINES: dict[str, EngineEntry] = {}


def register_engine(entry: EngineEntry) -> None:
    _ENGINES[entry.name] = entry


def engine_names() -> tuple[str, ...]:
    return tuple(_ENGINES)


def get_engine(name: str) -> EngineEntry:
    if name not in _ENGINES:
        raise ValueError(f"parallel.engine={name!r} is not one of {engine_names()}")
    return _ENGINES[name]


def build_engine(setup: EngineSetup) -> Engine:
    """The engine named by `parallel.engine`."""
    return get_engine(setup.parallel.engine).factory(setup)


def _validate_deepspeed(cfg: ParallelConfig, dims: ParallelDims) -> None:
    if dims.pp > 1:
        raise ValueError(
            f"parallel.pp={dims.pp}: pipeline parallelism is a native-engine plan (torch.distributed.pipelining); "
            "fix: parallel.engine=native, or parallel.pp=1 with parallel.engine=deepspeed"
        )
    validate_deepspeed(cfg.deepspeed, tp=dims.tp, cp=dims.cp, dp_replicate=dims.dp_replicate)


register_engine(EngineEntry(name="native", factory=NativeEngine))
# DeepSpeedEngine imports the deepspeed package only when it prepares a model.
register_engine(
    EngineEntry(
        name="deepspeed", factory=DeepSpeedEngine, config_cls=DeepSpeedConfig, validate=_validate_deepspeed
    )
)
