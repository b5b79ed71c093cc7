"""Hugging Face MoE checkpoints in and out: tiny random Qwen3-MoE and Mixtral made with transformers give our
logits (both expert kernels, both stored layouts), exports reload in transformers with the same logits, and
checkpoints or settings we cannot serve are refused naming the key and the fix.

Tolerance: fp32 on the CPU, max |Δlogit| <= 1e-5 (the routers are decisive, so no top-k choice flips)."""

from __future__ import annotations

import json

import pytest
import torch
from hf_fixtures import MOE_ARCHS, make_hf_moe_model
from lm_helpers import lm_logits

from treadle.models.hf import export_hf, export_peft, load_hf_weights, model_config_from_hf
from treadle.models.llama import ModelConfig
from treadle.models.lora import PeftConfig, apply_lora
from treadle.models.moe import SPEC, MoEConfig, MoETransformer
from treadle.models.ops import KernelsConfig

transformers = pytest.importorskip("transformers")
ATOL = 1e-5
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def load_ours(model_dir, moe: str = "torch") -> tuple[MoETransformer, MoEConfig]:
    cfg = model_config_from_hf(ModelConfig(pretrained=str(model_dir)))
    with torch.device("meta"):
        model = SPEC.build(cfg, KernelsConfig(moe=moe))
    model.to_empty(device="cpu")
    model.init_weights(seed=123)  # overwritten by the load: a loader that misses a tensor leaves noise
    load_hf_weights(model, model_dir)
    return model.eval(), cfg


def hf_logits(model_dir, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


def tokens_for(cfg: MoEConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_logits_equal_transformers_and_export_reloads(tmp_path, arch):
    model_dir = make_hf_moe_model(arch, tmp_path / "hf")
    ours, cfg = load_ours(model_dir)
    assert cfg.name == "moe" and cfg.num_experts == 8 and cfg.qk_norm == (arch == "qwen3_moe")
    assert cfg.first_k_dense == (1 if arch == "qwen3_moe" else 0)
    tokens = tokens_for(cfg)
    reference = hf_logits(model_dir, tokens)
    with torch.no_grad():
        torch.testing.assert_close(lm_logits(ours, tokens), reference, atol=ATOL, rtol=0)
        loop, _ = load_ours(model_dir, moe="loop")
        torch.testing.assert_close(lm_logits(loop, tokens), reference, atol=ATOL, rtol=0)

    out = export_hf(ours, cfg, tmp_path / "export", dtype=torch.float32, max_shard_bytes=200_000)
    keys = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert not any("expert_bias" in k for k in keys)  # the balancing bias has no HF key
    block = "mlp" if arch == "qwen3_moe" else "block_sparse_moe"
    assert f"model.layers.1.{block}.experts.7.{'down_proj' if arch == 'qwen3_moe' else 'w2'}.weight" in keys
    torch.testing.assert_close(hf_logits(out, tokens), reference, atol=ATOL, rtol=0)


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 5 writes the fused expert layout")
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_transformers_5_fused_layout_loads(tmp_path, arch):
    model_dir = make_hf_moe_model(arch, tmp_path / "hf", fused=True)
    keys = (
        set(json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"])
        if (model_dir / "model.safetensors.index.json").is_file()
        else None
    )
    if keys is None:
        from safetensors import safe_open

        with safe_open(model_dir / "model.safetensors", "pt") as f:
            keys = set(f.keys())  # noqa: SIM118 (safe_open is not iterable)
    assert "model.layers.1.mlp.experts.gate_up_proj" in keys  # the layout under test
    ours, cfg = load_ours(model_dir)
    tokens = tokens_for(cfg)
    with torch.no_grad():
        torch.testing.assert_close(lm_logits(ours, tokens), hf_logits(model_dir, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_count_other_than_config_names_the_key_and_fix(tmp_path, arch):
    model_dir = make_hf_moe_model(arch, tmp_path / "hf")
    config = json.loads((model_dir / "config.json").read_text())
    field = "num_experts" if arch == "qwen3_moe" else "num_local_experts"
    config.pop("num_experts", None), config.pop("num_local_experts", None)
    config[field] = 4
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=rf"tensor '.*\.gate\.weight'.* 8 experts .* {field}=4; fix: set {field}=8"
    ):
        load_ours(model_dir)


def test_deepseek_v3_is_refused_naming_mla(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"]}))
    with pytest.raises(
        ValueError, match=r"architectures: DeepseekV3ForCausalLM .* multi-head latent attention"
    ):
        model_config_from_hf(ModelConfig(pretrained=str(tmp_path)))


def test_interleaved_moe_layers_are_refused(tmp_path):
    model_dir = make_hf_moe_model("qwen3_moe", tmp_path / "hf")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "decoder_sparse_step": 2}))
    with pytest.raises(ValueError, match="decoder_sparse_step: 2"):
        model_config_from_hf(ModelConfig(pretrained=str(model_dir)))
    (model_dir / "config.json").write_text(json.dumps({**config, "mlp_only_layers": [1]}))
    with pytest.raises(ValueError, match=r"mlp_only_layers: \[1\] is not supported"):
        model_config_from_hf(ModelConfig(pretrained=str(model_dir)))


def test_lora_adapts_attention_not_the_router_and_refuses_experts():
    cfg = MoEConfig(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=64, ffn_dim=96,
                    first_k_dense=1, num_experts=4, moe_ffn_dim=32, num_shared_experts=1)  # fmt: skip
    with torch.device("meta"):
        model = SPEC.build(cfg, KernelsConfig())
    adapted = apply_lora(model, PeftConfig(method="lora"), SPEC.linear_names())
    assert "layers.1.mlp.shared_experts.gate_proj" in adapted and "layers.0.mlp.down_proj" in adapted
    assert "layers.1.self_attn.q_proj" in adapted
    assert not any("router" in name for name in adapted)
    for target in ("experts", "w1"):
        with pytest.raises(
            ValueError, match=rf"'{target}' cannot be adapted: the routed experts are stacked"
        ):
            PeftConfig(method="lora", target_modules=[target]).validate(
                SPEC.linear_names(), SPEC.lora_refused
            )
    with pytest.raises(ValueError, match="'gate' cannot be adapted: the router gate"):
        PeftConfig(method="lora", target_modules=["gate"]).validate(SPEC.linear_names(), SPEC.lora_refused)


def test_peft_export_of_attention_lora_loads_in_hf_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model_dir = make_hf_moe_model("qwen3_moe", tmp_path / "hf")
    cfg = model_config_from_hf(ModelConfig(pretrained=str(model_dir)))
    peft_cfg = PeftConfig(method="lora", rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "o_proj"])
    with torch.device("meta"):
        model = SPEC.build(cfg, KernelsConfig())
    apply_lora(model, peft_cfg, SPEC.linear_names())
    model.to_empty(device="cpu")
    model.init_weights(seed=1)
    load_hf_weights(model, model_dir)
    with torch.no_grad():  # a non-zero adapter, so that an adapter PEFT failed to load would show
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    tokens = tokens_for(cfg)
    with torch.no_grad():
        ours = lm_logits(model.eval(), tokens)
    out = export_peft(model, cfg, peft_cfg, tmp_path / "adapter", base_model=str(model_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, out).eval()(tokens).logits
        torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
        assert (theirs - hf_logits(model_dir, tokens)).abs().max() > 1e-3  # the adapter changed the logits


@pytest.mark.parametrize("found", [6, 10])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_expert_tensors_other_than_config_name_the_key(layout, found):
    """The router agrees with config.json (8 experts) but the expert tensors do not."""
    from treadle.models.moe.hf import MIXTRAL, MoEHFAdapter

    adapter = MoEHFAdapter(MIXTRAL)
    if layout == "per_expert":
        stored = {f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight": (32, 64) for e in range(found)}
        key = rf"model\.layers\.0\.block_sparse_moe\.experts\.{min(found, 8)}\.w1\.weight"
    else:
        stored = {"model.layers.0.mlp.experts.gate_up_proj": (found, 64, 64)}
        key = r"model\.layers\.0\.mlp\.experts\.gate_up_proj"
    with pytest.raises(ValueError, match=rf"tensor '{key}': .* {found} experts .* num_local_experts=8; fix"):
        adapter.hf_parts("layers.0.mlp.experts.gate_proj", (8, 32, 64), stored.get)
    assert (
        len(adapter.hf_parts("layers.0.mlp.experts.gate_proj", (8, 32, 64), None)) == 8
    )  # the export layout


def test_export_refuses_what_the_architecture_cannot_express(tmp_path):
    cfg = MoEConfig(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=64, num_experts=4,
                    moe_ffn_dim=32, num_shared_experts=1, qk_norm=True)  # fmt: skip
    with torch.device("meta"):
        model = SPEC.build(cfg, KernelsConfig())
    with pytest.raises(
        ValueError, match=r"model\.num_shared_experts=1 cannot be exported as Qwen3MoeForCausalLM"
    ):
        export_hf(model, cfg, tmp_path / "export")
    assert not (tmp_path / "export").exists()
