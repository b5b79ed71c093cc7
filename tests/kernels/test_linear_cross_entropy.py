"""Fused linear + cross-entropy vs the unchunked plain-PyTorch reference (Triton interpreter on CPU).

Tolerances: fp32 compares at rtol 1e-5 (loss) / 1e-4 (grads; the chunked GEMMs sum in another order); bf16 and
fp16 compare the loss at rtol 2e-3 and the gradients at 2e-2 of their largest entry: both sides round the
logits and d(logits) to the input dtype, but the kernel accumulates dW in fp32 where the reference's GEMM
rounds once per output, and the GEMMs differ by chunk shape.
"""

import pytest
import torch

from treadle.kernels import linear_cross_entropy as lce
from treadle.models.ops import KernelsConfig, build_ops, linear_cross_entropy_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {
    torch.float32: {"loss": 1e-5, "grad": 1e-4},
    torch.bfloat16: {"loss": 2e-3, "grad": 2e-2},
    torch.float16: {"loss": 2e-3, "grad": 2e-2},
}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several column tiles per vocab block even at V=500 (blocks of 62), so the online logsumexp's rescaling
    # is exercised; several rows per program, as the interpreter's cost is per program (and a partial last
    # program is exercised too).
    monkeypatch.setattr(lce, "_MAX_TILE_V", 32)
    monkeypatch.setattr(lce, "_ROWS_PER_PROGRAM", 16)


def make_inputs(
    num_tokens: int,
    dim: int,
    vocab: int,
    dtype: torch.dtype = torch.float32,
    *,
    scale: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, dim, generator=gen) * scale
    weight = torch.randn(vocab, dim, generator=gen) / dim**0.5 * 2
    labels = torch.randint(0, vocab, (num_tokens,), generator=gen)
    return hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), labels.to(DEVICE)


def run(
    fn,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    grad_scale: float = 1.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_sum, count, z_loss_sum, d hidden, d weight) of `fn` for `grad_scale * loss_sum / count`."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss_sum, count, z_loss_sum = fn(h, w, labels, **kwargs)
    (loss_sum * grad_scale / count.clamp(min=1)).backward()
    return loss_sum.detach(), count, z_loss_sum, h.grad, w.grad


def assert_matches(ours: tuple, ref: tuple, dtype: torch.dtype) -> None:
    tol = TOLERANCES[dtype]
    loss, count, z_loss, dh, dw = ours
    ref_loss, ref_count, ref_z_loss, ref_dh, ref_dw = ref
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert count.item() == ref_count.item()
    torch.testing.assert_close(loss, ref_loss, rtol=tol["loss"], atol=1e-4)
    torch.testing.assert_close(z_loss, ref_z_loss, rtol=tol["loss"], atol=1e-4)
    for got, want in ((dh, ref_dh), (dw, ref_dw)):
        assert got.dtype == dtype and got.shape == want.shape
        atol = tol["grad"] * want.float().abs().max().item() + 1e-7
        torch.testing.assert_close(got.float(), want.float(), rtol=tol["grad"], atol=atol)


@pytest.mark.parametrize(
    ("num_tokens", "dim", "vocab", "chunk_size"),
    [(37, 48, 257, 16), (96, 64, 500, 32), (37, 48, 257, None), (5, 16, 33, 1)],
)
def test_matches_reference_fp32(num_tokens: int, dim: int, vocab: int, chunk_size: int | None) -> None:
    hidden, weight, labels = make_inputs(num_tokens, dim, vocab)
    ours = run(lce.linear_cross_entropy, hidden, weight, labels, chunk_size=chunk_size)
    ref = run(lce.linear_cross_entropy_reference, hidden, weight, labels)
    assert_matches(ours, ref, torch.float32)


def test_large_logits_stay_finite() -> None:
    # Logits of magnitude ~100: a naive exp would overflow fp32; the online max keeps it finite.
    hidden, weight, labels = make_inputs(37, 48, 257, scale=40.0)
    ours = run(lce.linear_cross_entropy, hidden, weight, labels, chunk_size=16)
    ref = run(lce.linear_cross_entropy_reference, hidden, weight, labels)
    assert torch.isfinite(ours[0]) and ours[0] > 100
    assert_matches(ours, ref, torch.float32)


def test_ignore_index_including_a_whole_chunk() -> None:
    hidden, weight, labels = make_inputs(37, 48, 257)
    labels[16:32] = -100  # chunk 2 of 3 (chunk_size 16) counts no token at all
    labels[[0, 5, 36]] = -100
    ours = run(lce.linear_cross_entropy, hidden, weight, labels, chunk_size=16)
    ref = run(lce.linear_cross_entropy_reference, hidden, weight, labels)
    assert ours[1].item() == 37 - 19
    assert_matches(ours, ref, torch.float32)
    assert torch.all(ours[3][16:32] == 0), "ignored tokens must get zero gradient"


def test_every_token_ignored() -> None:
    hidden, weight, labels = make_inputs(20, 16, 65)
    labels.fill_(-100)
    loss, count, z_loss, dh, dw = run(lce.linear_cross_entropy, hidden, weight, labels, chunk_size=8)
    assert loss.item() == 0 and count.item() == 0 and z_loss.item() == 0
    assert torch.all(dh == 0) and torch.all(dw == 0)


def test_other_ignore_index() -> None:
    hidden, weight, labels = make_inputs(37, 48, 257)
    labels[::3] = 7  # a real class id used as the ignore value
    ours = run(lce.linear_cross_entropy, hidden, weight, labels, ignore_index=7, chunk_size=16)
    ref = run(lce.linear_cross_entropy_reference, hidden, weight, labels, ignore_index=7)
    assert_matches(ours, ref, torch.float32)


def test_z_loss() -> None:
    hidden, weight, labels = make_inputs(37, 48, 257, scale=3.0)
    labels[10:14] = -100
    ours = run(lce.linear_cross_entropy, hidden, weight, labels, z_loss_weight=1e-2, chunk_size=16)
    ref = run(lce.linear_cross_entropy_reference, hidden, weight, labels, z_loss_weight=1e-2)
    assert ours[2].item() > 0.01 * ours[0].item(), "z-loss too small to test its gradient"
    assert not ours[2].requires_grad
    assert_matches(ours, ref, torch.float32)
    no_z = run(lce.linear_cross_entropy, hidden, weight, labels, chunk_size=16)
    torch.testing.assert_close(ours[0] - ours[2], no_z[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [16, None])  # fp32 dW accumulated over 3 chunks; one chunk
def test_low_precision(dtype: torch.dtype, chunk_size: int | None) -> None:
    hidden, weight, labels = make_inputs(48, 64, 300, dtype)
    labels[20:30] = -100
    ours = run(lce.linear_cross_entropy, hidden, weight, labels, chunk_size=chunk_size, z_loss_weight=1e-3)
    ref = run(lce.linear_cross_entropy_reference, hidden, weight, labels, z_loss_weight=1e-3)
    assert_matches(ours, ref, dtype)


@pytest.mark.parametrize("grad_scale", [0.5, -3.0])
def test_grad_output_scales_gradients(grad_scale: float) -> None:
    # run() backpropagates grad_scale * loss / count, so grad_output = grad_scale / count, not 1.
    hidden, weight, labels = make_inputs(37, 48, 257)
    ours = run(lce.linear_cross_entropy, hidden, weight, labels, grad_scale=grad_scale, chunk_size=16)
    ref = run(lce.linear_cross_entropy_reference, hidden, weight, labels, grad_scale=grad_scale)
    assert_matches(ours, ref, torch.float32)


def test_retained_graph_backward_twice() -> None:
    hidden, weight, labels = make_inputs(37, 48, 257)
    h = hidden.clone().requires_grad_()
    loss, _, _ = lce.linear_cross_entropy(h, weight, labels, chunk_size=16)
    (first,) = torch.autograd.grad(loss * 2, h, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 2, h)
    torch.testing.assert_close(first, second)


def test_tied_weights_gradients_add() -> None:
    """The output weight is also the embedding table: its gradient is the sum of both uses."""
    vocab, dim, num_tokens = 257, 48, 37
    gen = torch.Generator().manual_seed(3)
    table = (torch.randn(vocab, dim, generator=gen) * 0.5).to(DEVICE)
    tokens = torch.randint(0, vocab, (num_tokens,), generator=gen).to(DEVICE)
    labels = torch.roll(tokens, -1)
    labels[-1] = -100

    def grads(fn, *, detach_hidden: bool = False, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = torch.nn.Embedding(vocab, dim, _weight=table.clone()).to(DEVICE)
        hidden = torch.tanh(embedding(tokens)) * 2
        hidden = hidden.detach() if detach_hidden else hidden
        loss_sum, count, _ = fn(hidden, embedding.weight, labels, **kwargs)
        (loss_sum / count).backward()
        return loss_sum.detach(), embedding.weight.grad

    loss, grad = grads(lce.linear_cross_entropy, chunk_size=16)
    ref_loss, ref_grad = grads(lce.linear_cross_entropy_reference)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4 * ref_grad.abs().max().item())
    # The embedding's share is really there: the output layer's gradient alone differs at counted inputs.
    _, output_only = grads(lce.linear_cross_entropy, detach_hidden=True, chunk_size=16)
    assert (grad - output_only)[tokens[:-1]].abs().amax(dim=-1).min() > 0  # the last one is ignored


def test_only_hidden_requires_grad() -> None:
    """A frozen output layer (LoRA): no weight gradient is computed or returned."""
    hidden, weight, labels = make_inputs(37, 48, 257)
    h = hidden.clone().requires_grad_()
    loss, count, _ = lce.linear_cross_entropy(h, weight, labels, chunk_size=16)
    (loss / count).backward()
    h_ref = hidden.clone().requires_grad_()
    ref_loss, ref_count, _ = lce.linear_cross_entropy_reference(h_ref, weight, labels)
    (ref_loss / ref_count).backward()
    assert weight.grad is None
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-6)


def test_no_grad_path() -> None:
    hidden, weight, labels = make_inputs(37, 48, 257)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_loss, ref_count, _ = lce.linear_cross_entropy_reference(hidden, weight, labels)
    with torch.no_grad():
        loss, count, _ = lce.linear_cross_entropy(h, w, labels, chunk_size=16)
    assert not loss.requires_grad
    with torch.inference_mode():
        loss_inf, _, _ = lce.linear_cross_entropy(h, w, labels, chunk_size=16)
    loss_plain, _, _ = lce.linear_cross_entropy(hidden, weight, labels, chunk_size=16)  # no input needs grad
    for got in (loss, loss_inf, loss_plain):
        torch.testing.assert_close(got, ref_loss, rtol=1e-5, atol=1e-4)
    assert count.item() == ref_count.item()


def test_op_table_entry() -> None:
    ops = build_ops(KernelsConfig(loss="triton"))
    assert ops.loss is lce.linear_cross_entropy_op
    hidden, weight, labels = make_inputs(37, 48, 257)
    labels[:4] = -100

    def op(fn):
        return lambda h, w, y: (*fn(h, w, y, ignore_index=-100), torch.zeros(()))

    ours = run(op(ops.loss), hidden, weight, labels)
    ref = run(op(linear_cross_entropy_torch), hidden, weight, labels)
    assert_matches(ours, ref, torch.float32)


def test_torch_compile_fullgraph() -> None:
    """treadle compiles the loss with fullgraph=True: the op must trace without graph breaks."""
    compiled = torch.compile(lce.linear_cross_entropy_op, backend="aot_eager", fullgraph=True)
    hidden, weight, labels = make_inputs(37, 48, 257)

    def op(fn):
        return lambda h, w, y: (*fn(h, w, y), torch.zeros(()))

    ours = run(op(compiled), hidden, weight, labels, grad_scale=0.5)
    ref = run(op(linear_cross_entropy_torch), hidden, weight, labels, grad_scale=0.5)
    assert_matches(ours, ref, torch.float32)


def test_dtensor_weight_is_rejected(tmp_path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        hidden, weight, labels = make_inputs(8, 16, 33)
        sharded = DTensor.from_local(weight.cpu(), mesh, [Shard(0)])
        with pytest.raises(TypeError, match="vocab-sharded"):
            lce.linear_cross_entropy_op(hidden.cpu(), sharded, labels.cpu())
    finally:
        dist.destroy_process_group()


def test_input_checks() -> None:
    hidden, weight, labels = make_inputs(8, 16, 33)
    with pytest.raises(ValueError, match="flatten"):
        lce.linear_cross_entropy(hidden[None], weight, labels[None])
    with pytest.raises(ValueError, match="shape mismatch"):
        lce.linear_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(TypeError, match="share a dtype"):
        lce.linear_cross_entropy(hidden, weight.half(), labels)


def test_vocab_blocks_cover_the_vocab() -> None:
    for vocab in (1, 33, 257, 128256):
        bounds = lce.vocab_blocks(vocab)
        assert bounds[0][0] == 0 and bounds[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1
    assert len(lce.vocab_blocks(128256)) == lce._NUM_VOCAB_BLOCKS


def test_default_chunk_size() -> None:
    # Llama-3-8B's micro-batch: one chunk (its logits cost no more than the fp32 dW accumulator would).
    assert lce.default_chunk_size(8192, 128256, 4096, torch.bfloat16) == 8192
    # Twice the tokens: budget-sized chunks of all-live logits, evened out.
    chunk = lce.default_chunk_size(16384, 128256, 4096, torch.bfloat16)
    assert chunk == 2048 and chunk * 128256 * 2 <= lce.LOGITS_BUDGET_BYTES
    # A frozen output layer needs no accumulator, so the budget alone decides.
    assert lce.default_chunk_size(8192, 128256, 4096, torch.bfloat16, grad_weight=False) == 2048
    # Without gradients one vocab block is live at a time.
    assert (
        lce.default_chunk_size(16384, 128256, 4096, torch.bfloat16, grad_hidden=False, grad_weight=False)
        == 16384
    )
    for num_tokens, vocab, dtype in [(8000, 128256, torch.bfloat16), (8192, 32000, torch.float32)]:
        chunk = lce.default_chunk_size(num_tokens, vocab, 64, dtype)
        assert 1 <= chunk <= num_tokens and chunk * vocab * dtype.itemsize <= lce.LOGITS_BUDGET_BYTES
    assert lce.default_chunk_size(10, 2**30, 64, torch.float32) == 1


def gpu_real_vocab_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden, weight, labels = make_inputs(2048, 1024, 128256, dtype, seed=1)
    labels[100:600] = -100
    return hidden, weight, labels


@pytest.fixture
def gpu_launch_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lce, "_MAX_TILE_V", 4096)
    monkeypatch.setattr(lce, "_ROWS_PER_PROGRAM", 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk_size", [None, 768])
def test_gpu_real_vocab(dtype: torch.dtype, chunk_size: int | None, gpu_launch_config: None) -> None:
    """Llama-3's vocab on cuBLAS: one chunk (default) and three (fp32 dW accumulator)."""
    hidden, weight, labels = gpu_real_vocab_inputs(dtype)
    kwargs = {"z_loss_weight": 1e-4, "grad_scale": 0.7}
    ours = run(lce.linear_cross_entropy, hidden, weight, labels, chunk_size=chunk_size, **kwargs)
    ref = run(lce.linear_cross_entropy_reference, hidden, weight, labels, **kwargs)
    assert_matches(ours, ref, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_inductor_compile(gpu_launch_config: None) -> None:
    hidden, weight, labels = gpu_real_vocab_inputs(torch.bfloat16)
    compiled = torch.compile(lce.linear_cross_entropy_op, fullgraph=True)

    def op(fn):
        return lambda h, w, y: (*fn(h, w, y), torch.zeros((), device=DEVICE))

    ours = run(op(compiled), hidden, weight, labels, grad_scale=0.5)
    ref = run(op(linear_cross_entropy_torch), hidden, weight, labels, grad_scale=0.5)
    assert_matches(ours, ref, torch.bfloat16)
