"""Hugging Face checkpoints in and out: our model's logits equal transformers' on the same weights, and an export
reloads in transformers unchanged. Tolerance: fp32 on the CPU, max |Δlogit| <= 1e-5 (observed ~3e-7)."""

from __future__ import annotations

import json

import pytest
import torch
from hf_fixtures import ARCHS, make_hf_model
from lm_helpers import lm_logits

from treadle.models.hf import export_hf, load_hf_weights, model_config_from_hf
from treadle.models.llama import Llama, ModelConfig

transformers = pytest.importorskip("transformers")
ATOL = 1e-5


def load_ours(model_dir) -> tuple[Llama, ModelConfig]:
    cfg = model_config_from_hf(ModelConfig(pretrained=str(model_dir)))
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=123)  # overwritten by the load: a loader that misses a tensor leaves noise
    load_hf_weights(model, model_dir)
    return model, cfg


def hf_logits(model_dir, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_logits_equal_transformers_and_export_reloads(tmp_path, arch, tie):
    model_dir = make_hf_model(arch, tmp_path / "hf", tie=tie, sharded=not tie)
    ours, cfg = load_ours(model_dir)
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = lm_logits(ours, tokens)
    reference = hf_logits(model_dir, tokens)
    torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)

    out = export_hf(ours, cfg, tmp_path / "export", dtype=torch.float32, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file()  # several shards at this shard size
    torch.testing.assert_close(hf_logits(out, tokens), reference, atol=ATOL, rtol=0)


def test_unknown_architecture_names_the_file_and_field(tmp_path):
    model_dir = make_hf_model("llama", tmp_path / "hf")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: architectures: \['GPT2LMHeadModel'\]"):
        model_config_from_hf(ModelConfig(pretrained=str(model_dir)))


def test_missing_shard_names_the_shard(tmp_path):
    model_dir = make_hf_model("llama", tmp_path / "hf", sharded=True)
    shard = sorted(model_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=shard.name):
        load_ours(model_dir)


def test_mismatched_shape_names_the_tensor_and_file(tmp_path):
    model_dir = make_hf_model("qwen2", tmp_path / "hf")
    config = json.loads((model_dir / "config.json").read_text())
    config["intermediate_size"] = 128
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"
    ):
        load_ours(model_dir)


def test_missing_directory_says_what_to_point_at(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        model_config_from_hf(ModelConfig(pretrained=str(tmp_path / "nothing")))


def test_truncated_safetensors_file_is_named(tmp_path):
    import os

    model_dir = make_hf_model("llama", tmp_path / "hf")
    weights = model_dir / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    cfg = model_config_from_hf(ModelConfig(pretrained=str(model_dir)))
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device="cpu")
    with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file.*re-download"):
        load_hf_weights(model, model_dir)
