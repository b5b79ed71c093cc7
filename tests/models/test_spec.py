"""The model-spec registry and the Llama family's spec: plans as data, pipeline split, lookups."""

from __future__ import annotations

import dataclasses

import pytest

from treadle.models import get_model_spec, register_model
from treadle.models.llama import SPEC, ModelConfig


def test_unknown_family_names_the_key_and_the_choices():
    with pytest.raises(
        ValueError, match=r"model.name='gpt9' is not a registered model family; choose one of"
    ):
        get_model_spec("gpt9")


def test_plan_styles_are_checked_at_registration():
    bad = dataclasses.replace(SPEC, name="bad", tp_plan={"layers.*.mlp.up": "diagonal"})
    with pytest.raises(ValueError, match="TP plan style 'diagonal' is not one of"):
        register_model(bad)


def test_linear_names_come_from_the_plan():
    assert SPEC.linear_names() == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )


@pytest.mark.parametrize(
    ("layers", "stages", "tie"), [(4, 1, True), (5, 2, False), (7, 3, True), (8, 8, False)]
)
def test_pipeline_split_keeps_every_module_once_in_order(layers, stages, tie):
    cfg = ModelConfig(
        dim=64, num_layers=layers, num_heads=4, num_kv_heads=2, vocab_size=96, tie_embeddings=tie
    )
    split = SPEC.pipeline_split(cfg, stages)
    flat = [name for stage in split for name in stage]
    expected = [
        "embed_tokens",
        *(f"layers.{i}" for i in range(layers)),
        "norm",
        *([] if tie else ["lm_head"]),
    ]
    assert flat == expected and len(split) == stages
    sizes = [sum(n.startswith("layers.") for n in stage) for stage in split]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_pipeline_split_refuses_more_stages_than_layers():
    cfg = ModelConfig(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=96)
    with pytest.raises(ValueError, match=r"parallel.pp=3 must be between 1 and model.num_layers=2"):
        SPEC.pipeline_split(cfg, 3)
