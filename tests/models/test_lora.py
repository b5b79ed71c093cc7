"""LoRA / DoRA / NF4 against their references: the PEFT library for adapters, exact math for NF4."""

from __future__ import annotations

import pytest
import torch
from hf_fixtures import make_hf_model
from lm_helpers import lm_logits

from treadle.memory.nf4 import NF4_LEVELS, dequantize_nf4, nf4_linear, quantize_nf4
from treadle.models.hf import export_hf, export_peft, load_hf_weights, model_config_from_hf
from treadle.models.llama import Llama, ModelConfig
from treadle.models.lora import LoRALinear, PeftConfig, apply_lora, finish_adapters

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def adapted_model(model_dir, peft_cfg: PeftConfig) -> tuple[Llama, ModelConfig]:
    cfg = model_config_from_hf(ModelConfig(pretrained=str(model_dir)))
    with torch.device("meta"):
        model = Llama(cfg)
    apply_lora(model, peft_cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    load_hf_weights(model, model_dir)
    finish_adapters(model)
    return model, cfg


@torch.no_grad()
def perturb_adapters(model: Llama) -> None:
    """Trained-looking adapters (B is zero at init, which would hide a wrong B)."""
    gen = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)


def test_adapters_start_as_the_base_and_only_they_train(tmp_path):
    model_dir = make_hf_model("llama", tmp_path / "hf")
    base, _ = adapted_model(model_dir, PeftConfig(method="none"))
    model, cfg = adapted_model(model_dir, PeftConfig(method="lora", rank=4, use_dora=True))
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(lm_logits(model, tokens), lm_logits(base, tokens), atol=1e-5, rtol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 7 * cfg.num_layers


@pytest.mark.parametrize(
    "variant",
    [
        dict(rank=4, alpha=8.0),
        dict(rank=4, alpha=8.0, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
        dict(rank=4, alpha=16.0, use_dora=True, dropout=0.1),
    ],
    ids=["lora", "rslora_some_targets", "dora"],
)
def test_peft_adapter_and_merged_export_give_our_logits(tmp_path, variant):
    model_dir = make_hf_model("qwen2", tmp_path / "hf")
    peft_cfg = PeftConfig(method="lora", **variant)
    model, cfg = adapted_model(model_dir, peft_cfg)
    perturb_adapters(model)
    model.eval()  # dropout off, as PEFT's eval
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = lm_logits(model, tokens)

    adapter = export_peft(model, cfg, peft_cfg, tmp_path / "adapter", base_model=str(model_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(tokens).logits.clone()
        peft_logits = peft.PeftModel.from_pretrained(base, adapter).eval()(tokens).logits
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the adapters do change the output
    torch.testing.assert_close(peft_logits, ours, atol=1e-5, rtol=0)

    merged = export_hf(model, cfg, tmp_path / "merged", dtype=torch.float32)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, ours, atol=1e-5, rtol=0)


def test_nf4_round_trip_is_the_nearest_level_times_the_block_absmax():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    packed, absmax = quantize_nf4(weight, block_size=64)
    assert packed.dtype == torch.uint8 and packed.numel() == weight.numel() // 2
    restored = dequantize_nf4(packed, absmax, weight.shape, torch.float32)
    levels = torch.tensor(NF4_LEVELS)
    blocks = weight.reshape(-1, 64) / absmax[:, None]
    nearest = levels[(blocks[..., None] - levels).abs().argmin(-1)]
    torch.testing.assert_close(restored, (nearest * absmax[:, None]).reshape(weight.shape))
    # Block maxima are stored exactly (level ±1).
    torch.testing.assert_close(restored.abs().reshape(-1, 64).amax(1), absmax)


def test_nf4_linear_gradient_is_that_of_the_dequantized_weight():
    weight = torch.randn(48, 64)
    packed, absmax = quantize_nf4(weight)
    dense = dequantize_nf4(packed, absmax, weight.shape, torch.float32)
    x = torch.randn(5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    nf4_linear(x, packed, absmax, weight.shape).sum().backward()
    (x_ref @ dense.t()).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_qlora_model_stores_the_base_in_nf4_and_exports_it_dequantized(tmp_path):
    model_dir = make_hf_model("llama", tmp_path / "hf")
    model, cfg = adapted_model(model_dir, PeftConfig(method="lora", rank=4, quantize_base="nf4"))
    layer = model.layers["0"].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and "weight" not in dict(layer.named_parameters(recurse=False))
    assert layer.weight_nf4.dtype == torch.uint8
    dense, _ = adapted_model(model_dir, PeftConfig(method="none"))
    tokens = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        # 4-bit weights: close to the dense model, not equal.
        error = (lm_logits(model, tokens) - lm_logits(dense, tokens)).abs().max()
    assert 0 < error < 0.5
    merged = export_hf(model, cfg, tmp_path / "merged", dtype=torch.float32)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, lm_logits(model, tokens), atol=1e-5, rtol=0)


def test_bad_targets_are_refused():
    with pytest.raises(ValueError, match=r"peft.target_modules: \['qproj'\]"):
        PeftConfig(method="lora", target_modules=["qproj"]).validate()


def test_exports_are_world_readable_name_an_absolute_base_and_carry_the_eos(tmp_path, monkeypatch):
    """safetensors writes 0600; PEFT resolves a relative base against the reader's directory; generation
    stops at the base's eos_token_id only if the export carries it (config.json, generation_config.json)."""
    import json
    import os
    import stat

    model_dir = make_hf_model("llama", tmp_path / "hf")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "eos_token_id": 7, "bos_token_id": 5}))
    (model_dir / "generation_config.json").unlink(missing_ok=True)
    model, cfg = adapted_model(model_dir, PeftConfig(method="lora", rank=2))
    monkeypatch.chdir(tmp_path)
    adapter = export_peft(
        model, cfg, PeftConfig(method="lora", rank=2), tmp_path / "adapter", base_model="hf"
    )
    merged = export_hf(model, cfg, tmp_path / "merged", dtype=torch.float32)

    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(model_dir.resolve())
    assert json.loads((merged / "config.json").read_text())["eos_token_id"] == 7
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == 7
    umask = os.umask(0)
    os.umask(umask)
    expected_mode = 0o666 & ~umask  # 0644 under the usual umask 022
    for path in [*adapter.iterdir(), *merged.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == expected_mode, path
