"""What the FP8 linear tests of both backends share (tests/memory, tests/parallel): a tiny Llama whose block
linears all qualify for FP8 (every dim a multiple of 16) and the error measure their tolerances are stated in."""

import torch

from treadle.models.llama import ModelConfig

CPU = torch.device("cpu")
CFG = ModelConfig(
    dim=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=97,
    ffn_dim=128,
    max_seq_len=64,
    tie_embeddings=False,
)
# The linears of one block, all converted by the default FP8 filter.
BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against b, in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
