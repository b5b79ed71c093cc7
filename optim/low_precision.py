"""AdamW with low-precision moments: FP8 (E4M3, per-group scale + dynamic range expansion) or BF16.

COAT (Xi et al. 2024, "COAT: Compressing Optimizer states and Activation for memory-efficient FP8
Training") §4: the first and second moments are kept in FP8 E4M3 with one scale per group of `G` consecutive
elements, and each group is first passed through the expansion f(x) = sign(x)·|x|^k, k chosen per group so
the group's dynamic range fills E4M3's (§4.2). The master weights stay fp32: here they are the parameters
themselves (under FSDP2, the sharded fp32 DTensors).

Layout of one FP8 moment of a parameter of shape [..., C] (groups run along the last dim, so FSDP2's
Shard(0) row sharding never splits a group and every shard quantises exactly as the unsharded tensor would):
    `<name>`            float8_e4m3fn [..., C]          the quantised, expanded, normalised values
    `<name>_scale`      float32 [..., ceil(C / G)]      max |x| of the group (before expansion)
    `<name>_exponent`   float32 [..., ceil(C / G)]      k of the group
Under FSDP2 all three are DTensors on the parameter's mesh with its placements, so
`torch.distributed.checkpoint.state_dict.get_state_dict` and DCP save them sharded and reshard them at another
data-parallel size. No communication: every rank updates its own shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# Target the *normal* range of E4M3, [2^-6, 448]: an expanded group then keeps 3 mantissa bits on every
# element (relative rounding error <= 2^-4), instead of reaching into the subnormals where the smallest
# elements would keep 0-2 bits.
FP8_MIN_NORMAL = torch.finfo(FP8_DTYPE).smallest_normal
FP8_LOG_RANGE = math.log(FP8_MAX / FP8_MIN_NORMAL)
# A group whose non-zeros all have one magnitude has range 1 and would get k = inf; any k >= 1 represents it
# exactly (its elements map to ±448), so cap k where fp32 pow stays well-conditioned.
MAX_EXPONENT = 16.0

STATE_DTYPES = ("fp32", "bf16", "fp8")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Wrap a state computed on this rank's shard as a DTensor with the parameter's mesh and placements.

    A state shaped like the local shard gets the parameter's global shape; a per-group state ([..., groups])
    gets the parameter's leading dims, which is exact because the last dim is never sharded (checked at
    construction).
    """
    if not isinstance(param, DTensor):
        return local
    if local.shape == _local(param).shape:
        shape, stride = param.shape, param.stride()
    else:
        shape = torch.Size((*param.shape[:-1], local.shape[-1]))
        stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=shape, stride=stride
    )


def quantize_fp8(
    x: torch.Tensor, group_size: int, dynamic_range_expansion: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group E4M3 quantisation along the last dim; returns (payload, scale, exponent).

    With expansion (COAT §4.2) each group is normalised by its max |x|, raised to k = log(R_E4M3) / log(R_g)
    (R = max/min of |x| over the non-zeros), which maps its smallest non-zero to E4M3's smallest normal and
    its largest to 448; without it k = 1 (plain per-group absmax scaling, COAT's baseline).
    """
    *lead, num_cols = x.shape
    num_groups = math.ceil(num_cols / group_size)
    pad = num_groups * group_size - num_cols
    x32 = torch.nn.functional.pad(x.float(), (0, pad)).view(*lead, num_groups, group_size)
    mag = x32.abs()
    scale = mag.amax(dim=-1)
    if dynamic_range_expansion:
        smallest = torch.where(mag > 0, mag, torch.inf).amin(dim=-1)
        log_range = torch.log(scale / smallest)
        exponent = torch.where(log_range > 0, FP8_LOG_RANGE / log_range, MAX_EXPONENT).clamp_(
            max=MAX_EXPONENT
        )
        exponent = torch.where(scale > 0, exponent, 1.0)
    else:
        exponent = torch.ones_like(scale)
    # Normalising to [0, 1] before the power keeps |x|^k inside fp32 for any k (|x| ~ 1e-12 and k = 16 would
    # underflow otherwise).
    y = mag / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)
    q = (y.pow(exponent.unsqueeze(-1)) * FP8_MAX).copysign(x32)
    q = q.view(*lead, num_groups * group_size)[..., :num_cols].to(FP8_DTYPE)
    return q, scale, exponent


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, exponent: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Inverse of `quantize_fp8`: sign(q) · scale · (|q| / 448)^(1/k), in fp32."""
    *lead, num_cols = q.shape
    num_groups = scale.shape[-1]
    pad = num_groups * group_size - num_cols
    q32 = torch.nn.functional.pad(q.float(), (0, pad)).view(*lead, num_groups, group_size)
    y = (q32.abs() / FP8_MAX).pow(exponent.reciprocal().unsqueeze(-1)) * scale.unsqueeze(-1)
    return y.copysign(q32).view(*lead, num_groups * group_size)[..., :num_cols]


class LowPrecisionAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction as `torch.optim.AdamW`) with moments stored in
    `state_dtype`: "fp8" (COAT §4), "bf16", or "fp32".

    Each step dequantises a parameter's moments to fp32, updates them, takes the update from the fp32 values
    and stores them back, so the rounding of the stored states is the only difference from fp32 AdamW.
    Parameters with fewer than 2 dims (norms, biases) or fewer than `group_size` elements keep fp32 moments:
    they are a negligible share of the memory and the most sensitive to rounding.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_dtype: str = "fp8",
        group_size: int = 128,
        dynamic_range_expansion: bool = True,
    ) -> None:
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype={state_dtype!r} is not one of {STATE_DTYPES}")
        if group_size < 1:
            raise ValueError(f"optim.fp8_group_size={group_size} must be >= 1")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.state_dtype = state_dtype
        self.group_size = group_size
        self.dynamic_range_expansion = dynamic_range_expansion
        for group in self.param_groups:
            for p in group["params"]:
                if self._is_fp8(p) and isinstance(p, DTensor):
                    last = p.ndim - 1
                    if any(isinstance(pl, Shard) and pl.dim == last for pl in p.placements):
                        raise ValueError(
                            f"optim.name=adamw_fp8 needs the last dim of every matrix unsharded (its groups "
                            f"run along it), got placements {p.placements}; use optim.name=adamw_bf16 with "
                            f"tensor parallelism"
                        )

    def _is_fp8(self, p: torch.Tensor) -> bool:
        return self.state_dtype == "fp8" and p.ndim >= 2 and p.numel() >= self.group_size

    def _storage_dtype(self, p: torch.Tensor) -> torch.dtype:
        if self.state_dtype == "bf16" and p.ndim >= 2:
            return torch.bfloat16
        return torch.float32

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        local = _local(p)
        state: dict[str, Any] = {"step": torch.tensor(0.0)}
        for name in ("exp_avg", "exp_avg_sq"):
            if self._is_fp8(p):
                self._store_fp8(state, name, torch.zeros_like(local, dtype=torch.float32), p)
            else:
                state[name] = _like_param(torch.zeros_like(local, dtype=self._storage_dtype(p)), p)
        return state

    def _store_fp8(self, state: dict[str, Any], name: str, value: torch.Tensor, p: torch.Tensor) -> None:
        q, scale, exponent = quantize_fp8(value, self.group_size, self.dynamic_range_expansion)
        state[name] = _like_param(q, p)
        state[f"{name}_scale"] = _like_param(scale, p)
        state[f"{name}_exponent"] = _like_param(exponent, p)

    def _load(self, state: dict[str, Any], name: str, p: torch.Tensor) -> torch.Tensor:
        if self._is_fp8(p):
            return dequantize_fp8(
                _local(state[name]),
                _local(state[f"{name}_scale"]),
                _local(state[f"{name}_exponent"]),
                self.group_size,
            )
        return _local(state[name]).float()

    def _save(self, state: dict[str, Any], name: str, value: torch.Tensor, p: torch.Tensor) -> None:
        if self._is_fp8(p):
            self._store_fp8(state, name, value, p)
        else:
            _local(state[name]).copy_(value)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                state["step"] += 1
                step = int(state["step"].item())
                param, grad = _local(p), _local(p.grad).float()
                exp_avg = self._load(state, "exp_avg", p).lerp_(grad, 1 - beta1)
                exp_avg_sq = (
                    self._load(state, "exp_avg_sq", p).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                )
                self._save(state, "exp_avg", exp_avg, p)
                self._save(state, "exp_avg_sq", exp_avg_sq, p)
                param.mul_(1 - lr * weight_decay)
                bias_correction1 = 1 - beta1**step
                bias_correction2_sqrt = math.sqrt(1 - beta2**step)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """`Optimizer.load_state_dict` casts every floating state to the parameter's dtype (fp32); the casts
        from FP8/BF16 are exact, so casting back restores the stored states bit for bit."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                names = ("exp_avg", "exp_avg_sq")
                dtype = FP8_DTYPE if self._is_fp8(p) else self._storage_dtype(p)
                for name in names:
                    if state[name].dtype != dtype:
                        state[name] = state[name].to(dtype)
