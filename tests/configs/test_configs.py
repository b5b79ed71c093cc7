"""Every recipe composes and builds on the meta device; bad input fails at start with the key and the fix."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from treadle.models import get_model_spec
from treadle.models.lora import apply_lora
from treadle.train.config import CONFIG_DIR, load_config, validate

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(
    str(p.relative_to(CONFIG_DIR / "config").with_suffix("")) for p in (CONFIG_DIR / "config").rglob("*.yaml")
)


def test_the_required_recipes_exist():
    assert {"debug/tiny", "pretrain/llama3_1b", "pretrain/llama3_8b"} <= set(RECIPES)


# config.json of the real models the fine-tuning recipes name (shapes only: nothing is loaded on meta).
HF_SHAPES = {
    "llama3_8b": {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                  "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 36,
              "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288,
              "vocab_size": 151936, "rope_theta": 1000000.0, "max_position_embeddings": 40960},
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 48,
                  "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
                  "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                  "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "router_aux_loss_coef": 0.001, "vocab_size": 151936, "rope_theta": 1000000.0,
                  "max_position_embeddings": 40960},
}  # fmt: skip


def finetune_overrides(recipe: str, tmp_path) -> list[str]:
    """A model directory with the recipe's model shape, a tokenizer and a chat file, for recipes that need them."""
    if not recipe.startswith("finetune/"):
        return []
    from treadle.models.debug import chat_examples, write_chats, write_tokenizer

    model_dir = tmp_path / "model"
    write_tokenizer(model_dir, ["hello world"])
    shape = HF_SHAPES[next((k for k in ("qwen3_moe", "qwen3") if k in recipe), "llama3_8b")]
    if recipe.endswith("debug_lora"):
        shape = {
            **shape,
            "hidden_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 256,
            "vocab_size": 320,
        }
        shape.pop("head_dim", None)
    (model_dir / "config.json").write_text(__import__("json").dumps(shape))
    write_chats(tmp_path / "chats.jsonl", chat_examples(2))
    return [f"model.pretrained={model_dir}", f"data.path={tmp_path / 'chats.jsonl'}"]


def test_the_finetuning_recipes_exist():
    expected = {
        "finetune/llama3_8b_lora",
        "finetune/llama3_8b_qlora",
        "finetune/qwen3_full",
        "finetune/debug_lora",
        "finetune/qwen3_moe_lora",
    }
    assert expected <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_validates_and_builds_on_meta(recipe, tmp_path):
    cfg = load_config([f"+config={recipe}", *finetune_overrides(recipe, tmp_path)])
    world = (
        cfg.parallel.pp
        * cfg.parallel.dp_replicate
        * max(cfg.parallel.dp_shard, 1)
        * cfg.parallel.cp
        * cfg.parallel.tp
    )
    validate(cfg, world_size=world * 8 if recipe.startswith("pretrain") else world)
    spec = get_model_spec(cfg.model.name)
    with torch.device("meta"):
        model = spec.build(cfg.model, cfg.kernels)
    if cfg.peft.method == "lora":
        apply_lora(model, cfg.peft, spec.linear_names())
        assert (
            0 < sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.02 * cfg.model.dim**2 * 1e3
        )
    assert sum(p.numel() for p in model.parameters()) > 0
    assert spec.flops_per_token(cfg.model, cfg.data.seq_len) > 0


@pytest.mark.parametrize(
    ("recipe", "count", "rel"),
    [
        ("pretrain/llama3_1b", 1.236e9, 0.01),
        ("pretrain/llama3_8b", 8.03e9, 0.01),
        ("pretrain/llama3_70b", 70.55e9, 0.01),
        ("pretrain/llama3_405b", 405.85e9, 0.01),
        # MoE: Qwen3-30B-A3B's published 30.5B; the one-GPU MoE's 4.5B (the MoE issue's shape).
        ("pretrain/moe_1gpu", 4.474e9, 0.005),
        ("pretrain/qwen3_moe_30b_a3b", 30.53e9, 0.005),
        ("pretrain/deepseek_v3_16b", 15.79e9, 0.005),
    ],
)
def test_recipe_parameter_counts_match_the_published_shapes(recipe, count, rel):
    cfg = load_config([f"+config={recipe}"])
    with torch.device("meta"):
        model = get_model_spec(cfg.model.name).build(cfg.model, cfg.kernels)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(count, rel=rel)


@pytest.mark.parametrize(
    ("recipe", "pp", "stages"), [("pretrain/llama3_70b_pp", 4, 8), ("pretrain/llama3_405b", 8, 16)]
)
def test_pipeline_recipes_split_into_stages_on_meta(recipe, pp, stages):
    """The PP recipes' layouts (multi-node: `world` is 2 model copies), split on the meta device: every stage
    rank's parts together hold each parameter of the model exactly once, under the model's own names."""
    from treadle.parallel.pipeline import count_microbatches, plan_stages, split_model

    cfg = load_config([f"+config={recipe}"])
    world = 2 * pp * cfg.parallel.tp
    dims = validate(cfg, world_size=world)
    spec = get_model_spec(cfg.model.name)
    with torch.device("meta"):
        model = spec.build(cfg.model, cfg.kernels)
    grad_accum = cfg.trainer.grad_accum(dims.dp_size)
    layout = plan_stages(
        cfg.parallel, pp, cfg.model.num_layers, count_microbatches(cfg.parallel, 1, grad_accum)
    )
    assert (dims.pp, layout.num_stages, layout.stages_per_rank) == (pp, stages, 2)
    whole = {n: p.shape for n, p in model.named_parameters()}
    seen: dict[str, torch.Size] = {}
    for rank in range(pp):
        for part in split_model(model, spec, cfg.model, layout, rank).modules:
            names = {n: p.shape for n, p in part.named_parameters()}
            assert not names.keys() & seen.keys()
            seen.update(names)
    assert seen == whole
    assert layout.bubble_fraction() < 0.05


def test_command_line_overrides_win_over_the_recipe():
    cfg = load_config(["+config=debug/tiny", "trainer.max_steps=7", "parallel=zero2"])
    assert cfg.trainer.max_steps == 7 and cfg.parallel.reshard_after_forward is False
    assert cfg.model.dim == 128


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_unknown_key_names_the_nearest_keys(prefix):
    """However it is spelled, a typo fails and names the nearest keys (Hydra alone accepts `+key` and suggests
    `+` for `key`)."""
    with pytest.raises(
        ValueError, match=r"trainer\.max_stepz .*is not a config key; did you mean trainer\.max_steps\?"
    ):
        load_config([f"{prefix}trainer.max_stepz=3"])
    with pytest.raises(ValueError, match=r"did you mean model\.dim\?"):
        load_config([f"{prefix}modle.dim=3"])


def test_known_keys_and_open_dicts_pass_the_key_check():
    cfg = load_config(["+config=debug/tiny", "model=tiny", "+parallel.deepspeed.overrides.foo=1"])
    assert cfg.parallel.deepspeed.overrides == {"foo": 1}


def test_wrong_type_names_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        load_config(["trainer.max_steps=many"])
    assert "trainer.max_steps" in str(err.value.__cause__ or err.value)


def test_unknown_key_in_a_recipe_file_is_refused(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "bad.yaml").write_text("# @package _global_\nmodel:\n  dimm: 3\n")
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        load_config([f"hydra.searchpath=[file://{tmp_path}]", "+config=bad"])
    message = str(err.value) + str(err.value.__cause__)
    assert "dimm" in message and "model" in message


def test_non_dividing_degrees_are_refused_before_start():
    cfg = load_config(["parallel.dp_shard=3"])
    with pytest.raises(ValueError, match=r"parallel.dp_replicate × dp_shard × cp × tp .* world size is 4"):
        validate(cfg, world_size=4)


def test_tp_that_does_not_divide_heads_is_refused():
    cfg = load_config(["parallel.tp=3"])
    with pytest.raises(ValueError, match="parallel.tp=3 must divide model.num_heads=4"):
        validate(cfg, world_size=3)


def test_indivisible_batch_is_refused():
    cfg = load_config(["trainer.micro_batch_size=3", "trainer.global_batch_size=16"])
    with pytest.raises(ValueError, match="trainer.global_batch_size=16 must be a positive multiple of"):
        validate(cfg, world_size=2)


def test_sequence_longer_than_the_model_is_refused():
    cfg = load_config(["data.seq_len=1024"])
    with pytest.raises(ValueError, match="data.seq_len=1024 exceeds model.max_seq_len=512"):
        validate(cfg, world_size=1)


def test_unknown_kernel_is_refused():
    cfg = load_config(["kernels.attention=flash9"])
    with pytest.raises(ValueError, match="kernels.attention='flash9'"):
        validate(cfg, world_size=1)


@pytest.mark.parametrize("lr", ["0.0", "-0.001", "nan"])
def test_non_positive_learning_rate_is_refused(lr):
    cfg = load_config([f"optim.lr={lr}"])
    with pytest.raises(ValueError, match=f"optim.lr={lr}.* must be a positive number"):
        validate(cfg, world_size=1)


def test_run_and_checkpoint_dirs_are_checked_before_any_work(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    cfg = load_config([f"run.dir={tmp_path}/run", f"checkpoint.dir={a_file}"])
    with pytest.raises(ValueError, match=r"checkpoint.dir=.*file is a file, not a directory"):
        validate(cfg, world_size=1)
    cfg = load_config([f"run.dir={a_file}/run"])
    with pytest.raises(ValueError, match=r"run.dir=.*file is a file, not a directory"):
        validate(cfg, world_size=1)
    # A read-only directory: simulated, since this test may run as root (who may write anywhere).
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))
    cfg = load_config([f"run.dir={read_only}/run"])
    with pytest.raises(ValueError, match=r"run.dir=.*read_only is not writable by this user; fix:"):
        validate(cfg, world_size=1)
    validate(load_config([f"run.dir={tmp_path}/run"]), world_size=1)


def _launch(*overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), f"run.dir={tmp_path}/run", *overrides],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


def test_launcher_reports_config_errors_without_a_traceback(tmp_path):
    result = _launch("trainer.global_batch_size=12", "trainer.micro_batch_size=8", tmp_path=tmp_path)
    assert result.returncode != 0
    assert "config error: trainer.global_batch_size=12" in result.stderr
    assert "Traceback" not in result.stderr
    result = _launch("+trainer.max_stepz=3", tmp_path=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        "config error: trainer.max_stepz" in result.stderr
        and "did you mean trainer.max_steps?" in result.stderr
    )


def test_launcher_reports_a_missing_data_path(tmp_path):
    result = _launch("data=tokens", f"data.path={tmp_path}/nope.bin", "data.seq_len=256", tmp_path=tmp_path)
    assert result.returncode != 0
    assert "config error: data.path=" in result.stderr and "nope.bin does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    result = _launch("data=tokens", "data.seq_len=256", tmp_path=tmp_path)
    assert result.returncode != 0 and "data.path" in result.stderr and "Traceback" not in result.stderr


def test_tp_that_does_not_divide_kv_heads_is_refused():
    cfg = load_config(["parallel.tp=4", "model.num_heads=8", "model.num_kv_heads=2"])
    with pytest.raises(
        ValueError, match="parallel.tp=4 must divide model.num_heads=8 and model.num_kv_heads=2"
    ):
        validate(cfg, world_size=4)


def test_ulysses_needs_heads_divisible_by_cp():
    cfg = load_config(["parallel.cp=4", "parallel.cp_variant=ulysses", "data.seq_len=256"])
    with pytest.raises(ValueError, match="parallel.cp_variant=ulysses splits heads over parallel.cp=4"):
        validate(cfg, world_size=4)


def test_async_tp_says_why_it_cannot_run_on_cpu():
    cfg = load_config(["parallel.tp=2", "parallel.async_tp=true", "parallel.compile=true", "run.device=cpu"])
    with pytest.raises(ValueError, match="parallel.async_tp=true needs CUDA GPUs"):
        validate(cfg, world_size=2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.tp=2"], "fix: set parallel.sequence_parallel=false"),
        (
            ["parallel.tp=2", "parallel.sequence_parallel=false", "trainer.micro_batch_size=1"],
            "splits each micro-batch in two, but trainer.micro_batch_size=1",
        ),
    ],
)
def test_tp_batch_overlap_refuses_what_it_cannot_overlap(overrides, message):
    cfg = load_config([*overrides, "parallel.tp_batch_overlap=true"])
    with pytest.raises(ValueError, match=message):
        validate(cfg, world_size=2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.tp_comm_max_ctas=-1", "run.device=cuda"], "needs a positive count and NCCL"),
        (["parallel.tp_comm_max_ctas=8", "run.device=cpu"], "needs a positive count and NCCL"),
        (["parallel.tp_comm_max_ctas=8", "run.device=cuda", "parallel.backend=gloo"], "fix: set"),
    ],
)
def test_tp_comm_max_ctas_needs_nccl(overrides, message):
    cfg = load_config(["parallel.tp=2", *overrides])
    with pytest.raises(ValueError, match=message):
        validate(cfg, world_size=2)


def test_async_tp_needs_compile():
    cfg = load_config(["parallel.tp=2", "parallel.async_tp=true", "run.device=cuda"])
    with pytest.raises(ValueError, match="needs parallel.compile=true"):
        validate(cfg, world_size=2)


@pytest.mark.parametrize("overrides", [["parallel.tp=2"], ["parallel.compile=true"]])
def test_tp_comm_reorder_says_when_it_has_no_effect(overrides):
    cfg = load_config([*overrides, "parallel.tp_comm_reorder=true"])
    with pytest.warns(UserWarning, match="parallel.tp_comm_reorder=true reorders compiled TP blocks"):
        validate(cfg, world_size=2 if "parallel.tp=2" in overrides else 1)


def test_qwen3_moe_lora_recipe_adapts_the_attention_of_an_moe_checkpoint(tmp_path):
    recipe = "finetune/qwen3_moe_lora"
    cfg = load_config([f"+config={recipe}", *finetune_overrides(recipe, tmp_path)])
    dims = validate(cfg, world_size=8)
    assert (
        cfg.model.name == "moe" and cfg.model.num_experts == 128 and cfg.model.norm_topk_prob and dims.ep == 8
    )
    spec = get_model_spec(cfg.model.name)
    with torch.device("meta"):
        model = spec.build(cfg.model, cfg.kernels)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(30.5e9, rel=0.01)  # Qwen3-30B-A3B
    adapted = apply_lora(model, cfg.peft, spec.linear_names())
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj"}
