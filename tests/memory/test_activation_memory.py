"""FP8 activation compression and activation offload: bytes kept for backward, and gradients.

Compression tolerance: each compressed activation has per-element relative error <= 2^-4 (E4M3, per-group
scale), ~2-3% rms; it reaches gradients only, through backward's products with other exact terms, so whole
gradients move by a few percent (measured here: < 4% relative Frobenius error for every parameter); we hold
them to 8% and require the loss (forward, untouched) to be bit-equal. Offload moves tensors and returns them
unchanged: gradients bit-equal.
"""

from __future__ import annotations

import pytest
import torch
from lm_helpers import lm_loss

from treadle.memory.activations import SavedActivationHooks, apply_activation_memory, install_block_hooks
from treadle.memory.checkpointing import MemoryConfig, apply_activation_checkpointing
from treadle.memory.compression import dequantize_groups, quantize_groups
from treadle.models.llama import Llama, ModelConfig
from treadle.parallel.fsdp import apply_compile

CFG = ModelConfig(
    dim=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=97, ffn_dim=256, max_seq_len=64
)


def _run(hooks: SavedActivationHooks | None, ac: str = "none", compile: bool = False):
    model = Llama(CFG)
    model.init_weights(seed=1)
    apply_activation_checkpointing(model.layers, MemoryConfig(activation_checkpoint=ac))
    if compile:
        apply_compile(model, fullgraph=hooks is None or not hooks.compress)
    if hooks is not None:
        install_block_hooks(model.layers, hooks)
        if hooks.compress:
            from treadle.memory.activations import _exempt_op

            model.ops.attention = _exempt_op(model.ops.attention, hooks)
    tokens = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(0))
    loss, count = lm_loss(model, tokens, tokens)
    (loss / count).backward()
    grads = {
        n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): p.grad
        for n, p in model.named_parameters()
    }
    return loss.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_group_quantisation_round_trip() -> None:
    x = torch.randn(3, 5, 200) * torch.logspace(-3, 3, 200)  # per-group scales follow the magnitude
    c = quantize_groups(x, 64)
    assert c.payload.dtype == torch.float8_e4m3fn and c.payload.shape == (15, 256)
    y = dequantize_groups(c)
    assert y.shape == x.shape and y.dtype == x.dtype
    # Half an E4M3 ulp (2^-4 relative) for normal values; half the subnormal step (2^-10 of 448) of the
    # group's scale below them.
    group_max = torch.nn.functional.pad(x.abs(), (0, 56)).view(3, 5, 4, 64).amax(-1, keepdim=True)
    floor = (group_max * 2**-10 / 448).expand(3, 5, 4, 64).reshape(3, 5, 256)[..., :200]
    assert ((y - x).abs() <= 2**-4 * x.abs() + floor * 1.0001).all()
    assert c.nbytes < 0.35 * x.numel() * x.element_size()  # 256 padded bytes + 4 scales per row of 200
    narrow = quantize_groups(torch.randn(8, 32), 128)  # one unpadded group per row
    assert narrow.payload.shape == (8, 32) and narrow.inv_scale.shape == (8, 1, 1)


def test_compression_saves_bytes_and_keeps_gradients_close() -> None:
    plain = SavedActivationHooks(compress=False, offload=False, min_numel=1024)
    loss_ref, grads_ref = _run(plain)
    fp8 = SavedActivationHooks(compress=True, offload=False, min_numel=1024)
    loss, grads = _run(fp8)
    assert fp8.input_bytes == plain.input_bytes > 0  # the same tensors were seen
    # fp32 activations: compressed ones keep ~1.03 of 4 bytes; attention's stay exact.
    assert plain.packed_bytes == plain.input_bytes
    assert fp8.packed_bytes < 0.5 * plain.packed_bytes
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    errors = {name: _rel(grads[name], g) for name, g in grads_ref.items()}
    assert max(errors.values()) < 0.08, errors
    assert max(errors.values()) > 1e-4  # compression is in effect


def test_compression_under_compile() -> None:
    """Compiled blocks (attention kept out of the graph): the compiled graphs' saved tensors are compressed,
    attention's are not, and gradients stay as close to the exact ones as in eager mode."""
    torch._dynamo.reset()
    plain = SavedActivationHooks(compress=False, offload=False, min_numel=1024)
    loss_ref, grads_ref = _run(plain)
    fp8 = SavedActivationHooks(compress=True, offload=False, min_numel=1024)
    loss, grads = _run(fp8, compile=True)
    assert fp8.input_bytes > 0 and fp8.packed_bytes < 0.5 * fp8.input_bytes
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    errors = {name: _rel(grads[name], g) for name, g in grads_ref.items()}
    assert max(errors.values()) < 0.08, errors
    assert max(errors.values()) > 1e-4
    # The exemption holds in the compiled model: compressing attention's tensors too would pack fewer bytes.
    everything = SavedActivationHooks(compress=True, offload=False, min_numel=1024)
    torch._dynamo.reset()
    model = Llama(CFG)
    model.init_weights(seed=1)
    apply_compile(model)
    install_block_hooks(model.layers, everything)
    tokens = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(0))
    lm_loss(model, tokens, tokens)
    assert everything.packed_bytes < fp8.packed_bytes


def test_attention_tensors_are_not_compressed() -> None:
    """Without the attention exemption more bytes are compressed (q, k, v, output): the exemption is real."""
    exempt = SavedActivationHooks(compress=True, offload=False, min_numel=1024)
    _run(exempt)
    everything = SavedActivationHooks(compress=True, offload=False, min_numel=1024)
    model = Llama(CFG)
    model.init_weights(seed=1)
    install_block_hooks(model.layers, everything)
    tokens = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(0))
    lm_loss(model, tokens, tokens)
    assert everything.packed_bytes < exempt.packed_bytes


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("ac", ["none", "full"])
def test_offload_gives_equal_gradients(compress: bool, ac: str) -> None:
    """`host_copy` runs the offload path on CPU tensors: every saved tensor leaves for a separate host copy
    and is fetched back (one block ahead) in backward."""
    _, grads_ref = _run(SavedActivationHooks(compress=compress, offload=False, min_numel=1024), ac)
    hooks = SavedActivationHooks(compress=compress, offload=True, min_numel=1024, host_copy=True)
    _, grads = _run(hooks, ac)
    assert hooks.input_bytes > 0 and hooks.packed_bytes == 0  # nothing eligible stayed on the device
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)


def test_engine_settings_on_cpu() -> None:
    model = Llama(CFG)
    with pytest.warns(UserWarning, match="activation_offload=true has no effect"):
        hooks = apply_activation_memory(model, MemoryConfig(activation_offload=True), torch.device("cpu"))
    assert hooks is None
    hooks = apply_activation_memory(model, MemoryConfig(activation_compression="fp8"), torch.device("cpu"))
    assert hooks is not None and hooks.compress and not hooks.offload
    with pytest.raises(ValueError, match="memory.activation_compression='int4'"):
        MemoryConfig(activation_compression="int4").validate()
    with pytest.raises(ValueError, match="memory.param_offload='nvme'"):
        MemoryConfig(param_offload="nvme").validate()
