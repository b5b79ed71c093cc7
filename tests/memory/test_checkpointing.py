"""Every activation-checkpointing mode gives the gradients of no checkpointing, and saves less for backward."""

from dataclasses import dataclass

import pytest
import torch
from lm_helpers import lm_loss
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from treadle.memory.checkpointing import AC_MODES, MemoryConfig, apply_activation_checkpointing
from treadle.models.llama import Llama, ModelConfig

CFG = ModelConfig(
    dim=64, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=97, ffn_dim=128, max_seq_len=64
)


class _CountRsqrt(TorchDispatchMode):
    """Counts RMSNorm's rsqrt: it runs in backward only when a norm is recomputed."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.rsqrt.default
        return func(*args, **(kwargs or {}))


@dataclass
class Run:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    saved_bytes: int  # saved for backward outside checkpoints' own stores
    backward_flops: int  # matmul and attention FLOPs of backward (recomputation included)
    backward_rsqrts: int  # RMSNorm recomputations in backward


def _run(mode: str) -> Run:
    model = Llama(CFG)
    model.init_weights(seed=1)
    apply_activation_checkpointing(model.layers, MemoryConfig(activation_checkpoint=mode, ac_every=2))
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 97, (2, 32), generator=g), torch.randint(0, 97, (2, 32), generator=g)
    saved_bytes = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved_bytes
        saved_bytes += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, count = lm_loss(model, tokens, labels)
    with FlopCounterMode(display=False) as flops, _CountRsqrt() as rsqrt:
        (loss / count).backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    return Run(loss.detach(), grads, saved_bytes, flops.get_total_flops(), rsqrt.count)


@pytest.mark.parametrize("mode", [m for m in AC_MODES if m != "none"])
def test_mode_matches_no_checkpointing(mode):
    ref, run = _run("none"), _run(mode)
    torch.testing.assert_close(run.loss, ref.loss, rtol=0, atol=0)
    assert run.grads.keys() == ref.grads.keys()
    for name, grad in run.grads.items():
        torch.testing.assert_close(grad, ref.grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_modes_trade_memory_for_recomputation():
    runs = {mode: _run(mode) for mode in AC_MODES}
    saved = {mode: r.saved_bytes for mode, r in runs.items()}
    backward_flops = {mode: r.backward_flops for mode, r in runs.items()}
    # full keeps only block inputs; every_k sits between; none keeps everything.
    assert saved["full"] < saved["every_k"] < saved["none"]
    # full recomputes every block's matmuls in backward, every_k half of them; selective keeps matmul and
    # attention outputs, so its backward does no more matmul work than without checkpointing.
    assert backward_flops["none"] < backward_flops["every_k"] < backward_flops["full"]
    assert backward_flops["selective"] == backward_flops["none"]
    assert saved["selective"] < saved["none"]  # its saved activations live in the checkpoint's own store
    # ... while the cheap ops around them (here RMSNorm) are recomputed.
    assert runs["selective"].backward_rsqrts > 0 and runs["none"].backward_rsqrts == 0


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="memory.activation_checkpoint='some'"):
        MemoryConfig(activation_checkpoint="some").validate()
