"""A transformers-made Qwen3-MoE (per-expert tensors) and Mixtral (transformers 5's fused layout) load under expert
parallelism on 2 gloo ranks (parallel.ep=2: each rank reads only its 4 of the 8 experts' rows; the rest
FSDP-sharded over dp_shard=2), give transformers' logits, and export (gathering the expert shards) a directory
that transformers reloads with the same logits.

Tolerance: fp32, logits within 1e-5 absolute, as in tests/models/test_moe_hf.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _spawn import run_distributed
from hf_fixtures import make_hf_moe_model
from lm_helpers import lm_logits
from torch.distributed.tensor import DTensor

from treadle.models.hf import SafetensorsCheckpoint, export_hf
from treadle.train.build import build_model, engine_for, weight_loader
from treadle.train.config import load_config, validate

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


def _load_under_ep(rank: int, world_size: int, model_dir: str, out: str) -> dict:
    cfg = load_config(
        [
            "model=hf",
            f"model.pretrained={model_dir}",
            "parallel.ep=2",
            "data.seq_len=32",
            f"run.dir={out}/run",
        ]
    )
    dims = validate(cfg, world_size)
    dims.build_mesh("cpu")
    read: list[int] = []
    original = SafetensorsCheckpoint.slice

    def recording(self, key, shape, index):  # which experts' rows this rank reads
        if ".experts." in key:
            expert = key.split(".")[5]
            read.extend([int(expert)] if expert.isdigit() else range(index[0].start, index[0].stop))
        return original(self, key, shape, index)

    SafetensorsCheckpoint.slice = recording
    spec, model = build_model(cfg)
    engine = engine_for(cfg, dims, torch.device("cpu"))
    part = engine.prepare(spec, cfg.model, model, cfg.optim, weight_loader(cfg))[0]
    experts = dict(part.named_parameters())["layers.1.mlp.experts.gate_proj"]
    local_experts = experts.to_local().shape[0] if isinstance(experts, DTensor) else experts.shape[0]
    tokens = torch.arange(48).reshape(2, 24) * 7 % cfg.model.vocab_size
    part.eval()
    with torch.no_grad():
        logits = lm_logits(part, tokens)
    export_hf(part, cfg.model, Path(out) / "export", dtype=torch.float32)
    experts_read = sorted(set(read))
    return {"tokens": tokens, "logits": logits, "local_experts": local_experts, "experts_read": experts_read}


@pytest.mark.parametrize(
    ("arch", "fused"), [("qwen3_moe", False), ("mixtral", True)], ids=["qwen3_moe", "mixtral_fused"]
)
def test_hf_checkpoint_loads_and_exports_under_expert_parallelism(tmp_path, arch, fused):
    if fused and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 5 writes the fused expert layout")
    model_dir = make_hf_moe_model(arch, tmp_path / "hf", fused=fused)
    results = run_distributed(_load_under_ep, 2, str(model_dir), str(tmp_path))
    assert [r["local_experts"] for r in results] == [4, 4]
    assert [r["experts_read"] for r in results] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    tokens = results[0]["tokens"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    with torch.no_grad():
        reference = hf(tokens).logits
        torch.testing.assert_close(exported(tokens).logits, reference, atol=1e-5, rtol=0)
    for result in results:
        torch.testing.assert_close(result["logits"], reference, atol=1e-5, rtol=0)
