"""The pipeline's stage plan without processes: layer cuts, stage placement, the split on the meta device keeping
parameter names, the bubble figure, and bad `parallel.pp*` input refused at start with the key and the fix."""

from __future__ import annotations

import pytest
import torch

from treadle.models import get_model_spec
from treadle.parallel.config import ParallelConfig
from treadle.parallel.pipeline import plan_stages, split_model, stage_modules
from treadle.train.config import load_config, validate

TINY = ["model.num_layers=4", "trainer.micro_batch_size=2", "trainer.global_batch_size=8"]


def layout(num_layers: int = 4, pp: int = 2, microbatches: int = 4, **fields):
    return plan_stages(ParallelConfig(pp=pp, **fields), pp, num_layers, microbatches)


def test_layer_cuts_and_placements():
    assert layout().layers_per_stage == (2, 2)
    assert layout(num_layers=5).layers_per_stage == (
        3,
        2,
    )  # the spec's rule: earlier stages take the remainder
    interleaved = layout(num_layers=8, pp_schedule="Interleaved1F1B", pp_virtual_stages=2)
    assert interleaved.layers_per_stage == (2, 2, 2, 2)
    assert [interleaved.rank_of(s) for s in range(4)] == [0, 1, 0, 1]
    assert layout(num_layers=8, pp_layers_per_stage=2, pp_schedule="Interleaved1F1B").num_stages == 4
    assert layout(num_layers=8, pp_split=[1, 3, 3, 1], pp_schedule="LoopedBFS").layers_per_stage == (
        1,
        3,
        3,
        1,
    )
    v_shape = layout(num_layers=8, pp_schedule="ZBVZeroBubble", pp_virtual_stages=2)
    assert [v_shape.rank_of(s) for s in range(4)] == [0, 1, 1, 0] and v_shape.stages_of(0) == [0, 3]


def test_bubble_fraction_is_the_1f1b_formula():
    assert layout(pp=4, microbatches=8).bubble_fraction() == pytest.approx(3 / 11)
    interleaved = layout(
        num_layers=8, pp=2, microbatches=4, pp_schedule="Interleaved1F1B", pp_virtual_stages=2
    )
    assert interleaved.bubble_fraction() == pytest.approx(1 / 9)


@pytest.mark.parametrize("tied", [True, False])
def test_split_keeps_parameter_names_and_the_tied_output_weight(tied):
    cfg = load_config([*TINY, f"model.tie_embeddings={str(tied).lower()}"])
    spec = get_model_spec(cfg.model.name)
    with torch.device("meta"):
        model = spec.build(cfg.model, cfg.kernels)
    plan = layout(pp_split=[1, 3])
    whole = {n: p.shape for n, p in model.named_parameters()}
    first = split_model(model, spec, cfg.model, plan, pp_rank=0)
    last = split_model(model, spec, cfg.model, plan, pp_rank=1)
    names = [{n: p.shape for n, p in s.named_parameters()} for s in (*first.modules, *last.modules)]
    assert all(n.items() <= whole.items() for n in names)
    assert {k.split(".")[1] for k in names[0] if k.startswith("layers.")} == {"0"}
    assert {k.split(".")[1] for k in names[1] if k.startswith("layers.")} == {"1", "2", "3"}
    assert "norm.weight" in names[1] and "norm.weight" not in names[0]
    if tied:  # the last stage keeps a copy of the embedding as its output weight
        assert last.tied_fqn == "embed_tokens.weight" and "embed_tokens.weight" in names[1]
        assert set(names[0]) | set(names[1]) == set(whole)
    else:
        assert last.tied_fqn is None and "embed_tokens.weight" not in names[1]
        assert set(names[0]).isdisjoint(names[1]) and set(names[0]) | set(names[1]) == set(whole)
    assert stage_modules(spec, cfg.model, plan)[0][0] == "embed_tokens"


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (
            ["parallel.pp_layers_per_stage=3"],
            2,
            r"parallel\.pp_layers_per_stage=3 must cut model\.num_layers=4",
        ),
        (["parallel.pp_split=[1,2]"], 2, r"parallel\.pp_split=\[1, 2\]: .*add up to model\.num_layers=4"),
        (["parallel.pp_split=[1,1,2]"], 2, r"3 stages, not a multiple of parallel\.pp=2"),
        (["parallel.pp_virtual_stages=3"], 2, r"6 stages, but model\.num_layers=4"),
        (
            ["parallel.pp_schedule=Zigzag"],
            2,
            r"parallel\.pp_schedule='Zigzag' is not a known pipeline schedule",
        ),
        (["parallel.pp_schedule=ZBVZeroBubble"], 2, r"runs 2 stage\(s\) per rank.*pp_virtual_stages=2"),
        (["parallel.pp_virtual_stages=2"], 2, r"1F1B runs 1 stage\(s\) per rank.*Interleaved1F1B"),
        (
            ["trainer.global_batch_size=2"],
            2,
            r"1F1B needs at least 2 micro-batches per step, but there are 1",
        ),
        (["parallel.pp_microbatches=3"], 2, r"parallel\.pp_microbatches=3 must divide the 8 sequences"),
        (["parallel.engine=deepspeed"], 2, r"parallel\.pp=2: pipeline parallelism is a native-engine plan"),
        (["parallel.pp=8"], 8, r"parallel\.pp=8 exceeds model\.num_layers=4"),
    ],
)
def test_bad_pipeline_input_names_the_key_and_the_fix(overrides, world, message):
    cfg = load_config([*TINY, "parallel.pp=2", *overrides])
    with pytest.raises(ValueError, match=message) as err:
        validate(cfg, world_size=world)
    assert "fix:" in str(err.value)


def test_a_good_pipeline_config_validates():
    cfg = load_config(
        [*TINY, "parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_virtual_stages=2"]
    )
    dims = validate(cfg, world_size=4)
    assert (dims.pp, dims.dp_shard) == (2, 2)
