"""The MoE layer against a token-by-token reference (outputs and gradients, with balanced, skewed and empty
experts), the routers' rules, the auxiliary-loss-free bias update, capacity drops and the config checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from treadle.models import get_model_spec
from treadle.models.llama.model import FeedForward
from treadle.models.moe import MoEConfig, MoETransformer
from treadle.models.moe.layer import MoE, update_expert_bias
from treadle.models.ops import KernelsConfig, build_ops

DIM, WIDTH = 16, 24


def _cfg(**overrides) -> MoEConfig:
    base = dict(dim=DIM, num_layers=2, num_heads=2, num_kv_heads=1, vocab_size=64, ffn_dim=32, max_seq_len=32)
    base.update(num_experts=4, num_experts_per_tok=2, moe_ffn_dim=WIDTH)
    return MoEConfig(**(base | overrides))


def _layer(cfg: MoEConfig, moe: str = "torch", shared: bool = False, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    ops = build_ops(KernelsConfig(moe=moe))
    layer = MoE(
        cfg.dim, cfg, cfg.moe_ffn_dim, FeedForward(cfg, ops, hidden_dim=WIDTH) if shared else None, ops
    )
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def _reference(layer: MoE, x_TE: torch.Tensor) -> torch.Tensor:
    """Token by token: Σ_k w_k · expert_k(x) with the router's own choice, plus the shared experts."""
    weights_TK, ids_TK, _ = layer.router(x_TE)
    e = layer.experts
    rows = []
    for t in range(x_TE.shape[0]):
        y = torch.zeros_like(x_TE[t])
        for k in range(ids_TK.shape[1]):
            i = ids_TK[t, k]
            h = F.silu(x_TE[t] @ e.gate_proj[i].t()) * (x_TE[t] @ e.up_proj[i].t())
            y = y + weights_TK[t, k] * (h @ e.down_proj[i].t())
        rows.append(y)
    out = torch.stack(rows)
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x_TE)
    return out


def _grads(layer: MoE, out: torch.Tensor, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    layer.zero_grad()
    (out * probe).sum().backward()
    return {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("moe", ["torch", "loop"])
@pytest.mark.parametrize("case", ["balanced", "skewed", "empty_experts"])
def test_moe_layer_matches_the_token_by_token_reference(moe, case):
    cfg = _cfg(num_shared_experts=1)
    layer = _layer(cfg, moe, shared=True)
    x = torch.randn(2, 8, DIM)
    if case == "skewed":  # every token picks expert 0 (and one other)
        with torch.no_grad():
            layer.router.expert_bias[0] = 100.0
    if case == "empty_experts":  # experts 2 and 3 are never chosen
        with torch.no_grad():
            layer.router.gate.weight[2:] = 0
            layer.router.expert_bias[2:] = -100.0
    _, ids, _ = layer.router(x.reshape(-1, DIM))
    counts = torch.bincount(ids.flatten(), minlength=4)
    if case == "empty_experts":
        assert counts[2:].sum() == 0
    if case == "skewed":
        assert counts[0] == 16
    probe = torch.randn(2, 8, DIM)
    x_ref = x.clone().requires_grad_()
    expected = _reference(layer, x_ref.reshape(-1, DIM)).view_as(x)
    grads_ref = _grads(layer, expected, probe)
    x_in = x.clone().requires_grad_()
    out, aux = layer(x_in)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grads = _grads(layer, out, probe)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert aux.item() == 0.0


def test_input_gradient_matches_the_reference():
    layer = _layer(_cfg(), "torch")
    x = torch.randn(12, DIM, requires_grad=True)
    probe = torch.randn(12, DIM)
    (g_ref,) = torch.autograd.grad((_reference(layer, x) * probe).sum(), x)
    (g,) = torch.autograd.grad((layer(x[None])[0][0] * probe).sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_grouped_gemm_backward_takes_an_expanded_gradient():
    layer = _layer(_cfg(), "torch")
    out, _ = layer(torch.randn(1, 8, DIM))
    out.sum().backward()  # sum()'s gradient has zero strides; torch._grouped_mm's own backward refuses it
    assert layer.experts.gate_proj.grad.abs().sum() > 0


def test_softmax_router_renormalises_and_sigmoid_groups_limit_the_choice():
    x = torch.randn(32, DIM)
    softmax = _layer(_cfg(norm_topk_prob=True)).router
    weights, _, _ = softmax(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(32))
    unnormalised, _, _ = _layer(_cfg(norm_topk_prob=False)).router(x)
    assert (unnormalised.sum(-1) < 1).all()
    # 8 experts in 4 groups, top-1 group: both chosen experts come from one group; weights sum to route_scale.
    cfg = _cfg(num_experts=8, router_scoring="sigmoid", num_expert_groups=4, topk_groups=1, route_scale=2.5)
    weights, ids, _ = _layer(cfg).router(x)
    assert (ids[:, 0] // 2 == ids[:, 1] // 2).all()
    torch.testing.assert_close(weights.sum(-1), torch.full((32,), 2.5))


def test_bias_chooses_experts_but_does_not_weight_them():
    layer = _layer(_cfg())
    x = torch.randn(16, DIM)
    weights, ids, _ = layer.router(x)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
    biased_weights, biased_ids, _ = layer.router(x)
    assert (biased_ids == 3).any(dim=-1).all()  # every token now picks expert 3
    scores = F.linear(x, layer.router.gate.weight).softmax(-1)
    expected = scores.gather(-1, biased_ids)
    torch.testing.assert_close(biased_weights, expected / expected.sum(-1, keepdim=True))


def test_aux_loss_free_bias_moves_against_a_crafted_imbalance():
    layer = _layer(_cfg(bias_update_rate=0.01))
    layer.load_counts.copy_(torch.tensor([10.0, 2.0, 4.0, 0.0]))  # mean 4
    stats = update_expert_bias({"1": layer})
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))
    assert stats["moe/max_load"].item() == pytest.approx(2.5)
    assert stats["moe/max_load_l1"].item() == pytest.approx(2.5)
    assert layer.load_counts.sum() == 0  # reset for the next step


def test_aux_loss_is_the_switch_balance_loss():
    cfg = _cfg(aux_loss_coeff=0.1, num_experts_per_tok=1)
    layer = _layer(cfg)
    x = torch.randn(64, DIM)
    _, ids, aux = layer.router(x)
    probs = F.linear(x, layer.router.gate.weight).softmax(-1)
    fraction = torch.bincount(ids.flatten(), minlength=4).float() / 64
    torch.testing.assert_close(aux, 0.1 * 4 * (fraction * probs.mean(0)).sum())
    # Balanced routing with uniform probabilities gives exactly the coefficient.
    assert 0.1 * 4 * (torch.full((4,), 0.25) * torch.full((4,), 0.25)).sum().item() == pytest.approx(0.1)


def test_capacity_drops_rows_over_capacity_and_counts_them():
    layer = _layer(_cfg(capacity_factor=1.0))
    x = torch.randn(1, 16, DIM)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([50.0, 50.0, 0.0, 0.0]))  # all 32 rows to experts 0 and 1
    layer.train()
    out, _ = layer(x)
    # capacity = ceil(1.0 · 16·2 / 4) = 8 rows per expert; each of the two takes 16: 16 rows are dropped.
    assert layer.dropped.item() == 16
    assert torch.isfinite(out).all() and not layer.graphable()
    assert (out[0, 8:] == 0).all()  # tokens after the first 8 lost both their experts: output 0


def test_model_reports_aux_loss_and_load_after_a_step():
    cfg = _cfg(first_k_dense=1, aux_loss_coeff=0.01)
    model = get_model_spec("moe").build(cfg, KernelsConfig())
    model.init_weights(0)
    model.train()
    hidden = model(torch.randint(0, 64, (2, 16)))
    aux = model.pop_auxiliary_loss()
    assert aux is not None and aux.item() > 0 and model.pop_auxiliary_loss() is None
    (hidden.float().pow(2).mean() + aux).backward()
    stats = get_model_spec("moe").post_step[0]([model])
    assert set(stats) == {"moe/max_load", "moe/aux_loss", "moe/max_load_l1"}
    assert stats["moe/aux_loss"].item() == pytest.approx(aux.item())
    assert isinstance(model, MoETransformer) and model.compile_fullgraph


def test_active_flops_count_only_the_chosen_experts():
    spec = get_model_spec("moe")
    few, many = _cfg(num_experts=4), _cfg(num_experts=64)
    difference = spec.flops_per_token(many, 16) - spec.flops_per_token(few, 16)
    assert difference == 6 * 2 * DIM * 60  # only the router grows with the expert count


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_experts_per_tok": 5}, "model.num_experts_per_tok=5 must be between 1 and model.num_experts=4"),
        ({"router_scoring": "tanh"}, "model.router_scoring='tanh'"),
        ({"num_expert_groups": 3}, "model.num_expert_groups=3 must divide model.num_experts=4"),
        ({"capacity_factor": 0.0}, "model.capacity_factor=0.0 must be > 0"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _cfg(**overrides).validate()


def test_parallel_degrees_are_checked_against_the_experts():
    from treadle.parallel.dims import ParallelDims

    spec = get_model_spec("moe")
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, ep=8, world_size=8)
    with pytest.raises(ValueError, match="parallel.ep=8 must divide model.num_experts=4"):
        spec.validate(_cfg(), dims, seq_len=16, cp_variant="ring")
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=2, ep=8, world_size=16)
    with pytest.raises(ValueError, match="parallel.ep=8 must divide model.num_experts=4"):
        spec.validate(_cfg(), dims, seq_len=16, cp_variant="ring")
    # Pipeline stages carry the auxiliary loss and the bias update, with and without expert parallelism.
    for pp, ep, world_size in ((2, 1, 2), (2, 2, 4)):
        dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=pp, ep=ep, world_size=world_size)
        spec.validate(_cfg(), dims, seq_len=16, cp_variant="ring")


def test_pipeline_stages_give_the_whole_models_gradients():
    """Two stages (the first without the final norm and the output layer, the second without the embedding)
    with the auxiliary loss attached to each stage's output by its weight, against the whole model whose
    objective adds aux · count: every gradient, the routers' included, is the same."""
    import copy

    cfg = _cfg(num_layers=3, first_k_dense=1, aux_loss_coeff=0.1, z_loss_coeff=0.01, tie_embeddings=False)
    model = get_model_spec("moe").build(cfg, KernelsConfig())
    model.init_weights(0)
    model.train()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    labels[0, :5] = -100
    scale = torch.tensor(1 / 27.0, dtype=torch.float64)

    def lm_loss(part: MoETransformer, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden @ part.output_weight.t()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")

    first, second = copy.deepcopy(model), copy.deepcopy(model)
    first.norm = first.lm_head = second.embed_tokens = None
    del first.layers["2"], second.layers["0"], second.layers["1"]
    weights_B = (labels != -100).sum(1).double() * scale
    hidden = first(tokens, aux_loss_weight_B=weights_B)
    assert first.pop_auxiliary_loss() is None
    (lm_loss(second, second(hidden, aux_loss_weight_B=weights_B)) * scale.float()).backward()
    objective = lm_loss(model, model(tokens)) + model.pop_auxiliary_loss() * (labels != -100).sum()
    (objective * scale.float()).backward()
    stages = dict(first.named_parameters()) | dict(second.named_parameters())
    assert set(stages) == {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(stages[name].grad, param.grad, rtol=1e-5, atol=1e-8, msg=name)
    assert model.layers["1"].mlp.router.gate.weight.grad.abs().sum() > 0
    # Without the weight's gradient the routers' gradients differ (the comparison sees the auxiliary loss).
    model.zero_grad()
    (lm_loss(model, model(tokens)) * scale.float()).backward()
    gate = "layers.1.mlp.router.gate.weight"
    assert not torch.allclose(stages[gate].grad, model.get_parameter(gate).grad, rtol=1e-3)


def test_grouped_gemm_alignment_is_checked_at_build():
    with pytest.raises(ValueError, match="kernels.moe=torch runs torch._grouped_mm"):
        get_model_spec("moe").build(_cfg(moe_ffn_dim=20), KernelsConfig())
    get_model_spec("moe").build(_cfg(moe_ffn_dim=20), KernelsConfig(moe="loop"))
