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

The quantisation and the AdamW math live in `treadle.kernels.adamw_fp8_reference`; the fused kernel that runs
the FP8 step on CUDA (`fused`) is `treadle.kernels.adamw_fp8`, imported at its first step (only it needs Triton):
one launch per parameter shard instead of dozens of aten kernels with fp32 temporaries as large as the parameter.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

from treadle.kernels.adamw_fp8_reference import (
    FP8_DTYPE,
    AdamWStep,
    Fp8Moment,
    adamw_update_,
    dequantize_fp8,
    quantize_fp8,
)
from treadle.kernels.fp8_linear import _interpreting

__all__ = ["FP8_DTYPE", "STATE_DTYPES", "LowPrecisionAdamW", "dequantize_fp8", "quantize_fp8"]

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


def _advance_step(state: dict[str, Any]) -> int:
    """`state["step"] += 1` on its CPU tensor; the new count."""
    state["step"] += 1
    return int(state["step"].item())


class LowPrecisionAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction as `torch.optim.AdamW`) with moments stored in
    `state_dtype`: "fp8" (COAT §4), "bf16", or "fp32".

    Each step dequantises a parameter's moments to fp32, updates them, takes the update from the fp32 values
    and stores them back, so the rounding of the stored states is the only difference from fp32 AdamW.
    Parameters with fewer than 2 dims (norms, biases) or fewer than `group_size` elements keep fp32 moments:
    they are a negligible share of the memory and the most sensitive to rounding.

    `fused`: run the FP8 step as one Triton kernel per parameter (`adamw_fp8_step_triton`, in place). None
    picks it for fp32 CUDA parameters in eager mode; True forces it (on CPU tensors only under
    TRITON_INTERPRET=1, which is how the tests run it); False keeps the plain-PyTorch step everywhere.
    `state["step"]` is a CPU tensor (as in checkpoints), so reading the count for the host scalars of the
    update costs no device sync.
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
        fused: bool | None = None,
    ) -> None:
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype={state_dtype!r} is not one of {STATE_DTYPES}")
        if group_size < 1:
            raise ValueError(f"optim.fp8_group_size={group_size} must be >= 1")
        if fused and state_dtype != "fp8":
            warnings.warn(f"fused=True has no effect with state_dtype={state_dtype!r}", stacklevel=2)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.state_dtype = state_dtype
        self.group_size = group_size
        self.dynamic_range_expansion = dynamic_range_expansion
        # Not a param-group key: `Optimizer.load_state_dict` would then move `step` to the parameter's device.
        self.fused = fused
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

    def _moment(self, state: dict[str, Any], name: str) -> Fp8Moment:
        return Fp8Moment(*(_local(state[key]) for key in (name, f"{name}_scale", f"{name}_exponent")))

    def _use_kernel(self, p: torch.Tensor) -> bool:
        if not self._is_fp8(p):
            return False
        param = _local(p)
        if self.fused is None:
            return (
                param.is_cuda
                and param.dtype == torch.float32
                and param.is_contiguous()
                and not torch.compiler.is_compiling()
            )
        if self.fused and not param.is_cuda and not _interpreting():
            raise ValueError(
                f"LowPrecisionAdamW(fused=True) runs a Triton kernel, which needs CUDA tensors (got "
                f"{param.device}) or TRITON_INTERPRET=1; pass fused=None to choose per parameter"
            )
        if self.fused and (param.dtype != torch.float32 or not param.is_contiguous()):
            raise ValueError(
                f"LowPrecisionAdamW(fused=True) needs contiguous fp32 parameters (the master weights), got "
                f"{param.dtype} with strides {param.stride()}; pass fused=None to choose per parameter"
            )
        return self.fused

    def _load(self, state: dict[str, Any], name: str, p: torch.Tensor) -> torch.Tensor:
        if self._is_fp8(p):
            return dequantize_fp8(*self._moment(state, name), self.group_size)
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
                use_kernel = self._use_kernel(p)
                hp = AdamWStep(
                    lr=lr,
                    beta1=beta1,
                    beta2=beta2,
                    eps=eps,
                    weight_decay=weight_decay,
                    step=_advance_step(state),
                )
                param, grad = _local(p), _local(p.grad)
                if use_kernel:
                    from treadle.kernels.adamw_fp8 import adamw_fp8_step_triton

                    adamw_fp8_step_triton(
                        param,
                        grad,
                        self._moment(state, "exp_avg"),
                        self._moment(state, "exp_avg_sq"),
                        hp,
                        self.group_size,
                        self.dynamic_range_expansion,
                    )
                    continue
                exp_avg = self._load(state, "exp_avg", p)
                exp_avg_sq = self._load(state, "exp_avg_sq", p)
                adamw_update_(param, grad.float(), exp_avg, exp_avg_sq, hp)
                self._save(state, "exp_avg", exp_avg, p)
                self._save(state, "exp_avg_sq", exp_avg_sq, p)
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
