import math

import pytest
import torch
import torch.nn.functional as F
from lm_helpers import lm_logits, lm_loss

from treadle.models.llama import Llama, ModelConfig, RopeScalingConfig, flops_per_token, rope_frequencies
from treadle.models.ops import attention_eager, attention_sdpa, document_causal_mask

TINY = dict(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=97, ffn_dim=96, max_seq_len=64)


def build(seed: int = 0, **overrides) -> Llama:
    with torch.device("meta"):
        model = Llama(ModelConfig(**{**TINY, **overrides}))
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model


def test_init_is_deterministic_per_seed_and_name():
    a, b, c = build(0), build(0), build(1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight") and not name.endswith("layernorm.weight"):
            assert not torch.equal(pa, pc), name
    # Different parameters of the same shape draw different values.
    assert not torch.equal(a.layers["0"].self_attn.q_proj.weight, a.layers["1"].self_attn.q_proj.weight)


def test_init_scales_residual_projections_by_depth():
    model = build(num_layers=8, dim=256, ffn_dim=512, num_heads=4)
    std = model.layers["0"].self_attn.q_proj.weight.std().item()
    depth_std = model.layers["0"].self_attn.o_proj.weight.std().item()
    assert std == pytest.approx(0.02, rel=0.05)
    assert depth_std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_loss_equals_cross_entropy_of_logits():
    model = build()
    tokens = torch.randint(0, 97, (2, 16))
    labels = torch.randint(0, 97, (2, 16))
    labels[0, :3] = -100
    loss_sum, count = lm_loss(model, tokens, labels)
    logits = lm_logits(model, tokens)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    assert count.item() == 29
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_the_output_weight():
    tied, untied = build(tie_embeddings=True), build(tie_embeddings=False)
    assert tied.lm_head is None and tied.output_weight is tied.embed_tokens.weight
    assert untied.num_params() - tied.num_params() == 97 * 64


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_sdpa_matches_eager_attention_with_document_mask(num_kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 12, 4, 8)
    k, v = torch.randn(2, 12, num_kv_heads, 8), torch.randn(2, 12, num_kv_heads, 8)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    for docs in (None, doc_ids):
        torch.testing.assert_close(
            attention_sdpa(q, k, v, doc_ids_BS=docs),
            attention_eager(q, k, v, doc_ids_BS=docs),
            rtol=1e-4,
            atol=1e-5,
        )


def test_document_mask_blocks_cross_document_attention():
    mask = document_causal_mask(torch.tensor([[0, 0, 1, 1]]))[0, 0]
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_packed_documents_do_not_see_each_other():
    """A document's logits are the same alone and packed after another document (positions restarted)."""
    model = build()
    doc_a, doc_b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 7))
    packed = torch.cat([doc_a, doc_b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    logits_packed = lm_logits(model, packed, positions_BS=positions, doc_ids_BS=doc_ids)
    torch.testing.assert_close(logits_packed[:, 5:], lm_logits(model, doc_b), rtol=1e-4, atol=1e-5)


def test_llama3_rope_scaling_bands():
    cfg = ModelConfig(dim=4096, num_heads=32, rope_theta=500000.0, rope_scaling=RopeScalingConfig(factor=8.0))
    plain = rope_frequencies(ModelConfig(dim=4096, num_heads=32, rope_theta=500000.0))
    scaled = rope_frequencies(cfg)
    wavelen = 2 * math.pi / plain
    high = wavelen < 8192 / 4  # short wavelengths: unchanged
    low = wavelen > 8192 / 1  # long wavelengths: divided by the factor
    torch.testing.assert_close(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8)
    mid = ~(high | low)
    assert mid.any() and ((scaled[mid] <= plain[mid]) & (scaled[mid] >= plain[mid] / 8)).all()


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = ModelConfig(**TINY)
    model = build()
    dense = model.num_params(exclude_embedding=True)  # untied: includes the output layer
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert flops_per_token(cfg, 32) == 6 * (dense - norms) + 6 * cfg.num_layers * 32 * cfg.dim


def test_bad_head_counts_are_refused():
    with pytest.raises(ValueError, match="model.num_kv_heads"):
        ModelConfig(dim=64, num_heads=4, num_kv_heads=3).validate()
    with pytest.raises(ValueError, match="model.num_heads"):
        ModelConfig(dim=60, num_heads=8, num_kv_heads=8).validate()
