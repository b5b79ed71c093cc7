"""The Llama model with every op from the Triton table equals the model with the PyTorch table.

fp32 in Triton's CPU interpreter: kernels and references differ only in summation order, so losses agree to
~1e-6 and gradients to ~1e-5.
"""

import torch
from lm_helpers import lm_loss

from treadle.models.llama import Llama, ModelConfig
from treadle.models.ops import KernelsConfig

TRITON = KernelsConfig(attention="triton", rmsnorm="triton", rope="triton", swiglu="triton", loss="triton")


def _loss_and_grads(kernels: KernelsConfig, doc_ids: torch.Tensor | None):
    cfg = ModelConfig(
        dim=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=101, ffn_dim=96, max_seq_len=64
    )
    model = Llama(cfg, kernels)
    model.init_weights(seed=3)
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 101, (2, 24), generator=g), torch.randint(0, 101, (2, 24), generator=g)
    labels[1, :4] = -100
    positions = (
        torch.arange(24).expand(2, 24)
        if doc_ids is None
        else torch.cat([torch.arange(9), torch.arange(15)]).expand(2, 24)
    )
    loss, count = lm_loss(model, tokens, labels, kernels=kernels, positions_BS=positions, doc_ids_BS=doc_ids)
    (loss / count).backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_triton_op_table_matches_torch_op_table():
    doc_ids = torch.tensor([[0] * 9 + [1] * 15] * 2)
    for docs in (None, doc_ids):
        loss_ref, grads_ref = _loss_and_grads(KernelsConfig(), docs)
        loss, grads = _loss_and_grads(TRITON, docs)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)
