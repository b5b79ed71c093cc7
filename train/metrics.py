"""Training-speed and memory metrics: tokens/s, TFLOP/s and MFU per device, and peak memory per interval.

MFU (model FLOPs utilisation, PaLM paper appendix B) is achieved model FLOP/s over the device's peak
dense bf16 FLOP/s. The FLOPs per token come from the model (`ModelSpec.flops_per_token`) and count the
model's math only, so recomputation from activation checkpointing lowers MFU rather than being credited
(that would be HFU).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

# Peak dense bf16 tensor-core FLOP/s (FP32 accumulate, no 2:4 sparsity) from the vendors' datasheets and
# architecture whitepapers: NVIDIA Hopper/Ada/Ampere whitepapers and the H100, H100 NVL, H200, H200 NVL,
# H20, L40S, L4, HGX B200 and GB200 NVL72 datasheets (whose headline figures are with sparsity, so
# halved here), and the AMD Instinct MI300X datasheet. The first pattern that matches
# `torch.cuda.get_device_name()` wins, so variants come before their family; a GPU that matches none
# gets no MFU rather than a guessed one (e.g. the A10G, whose clocks NVIDIA does not publish).
_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH100 NVL\b", 835e12),
    (r"\bH100\b.*\b(HBM3|SXM)", 989.4e12),
    (r"\bH200 NVL\b", 835e12),
    (r"\bH200\b", 989.4e12),
    (r"\bH20\b", 148e12),
    (r"\bA100\b", 312e12),
    (r"\bL40S\b", 362.05e12),
    (r"\bL4\b", 121e12),
    # The RTX 4090 D has fewer SMs; `(?! D\b)` keeps it out of the 4090's entry.
    (r"\bRTX 4090\b(?! D\b)", 165.2e12),
    (r"\bGB200\b", 2500e12),
    (r"\bB200\b", 2250e12),
    (r"\bMI300X\b", 1307.4e12),
)

_warned_devices: set[str] = set()

_GIB = 2**30


def lookup_peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU named `device_name`, or None when the table does not know it."""
    for pattern, flops in _PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return flops
    return None


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one `device`: None on a CPU (MFU means nothing there) and for a GPU the
    table does not know, which is warned about once per device name so that MFU logged as null is
    explained."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    flops = lookup_peak_flops(name)
    if flops is None and name not in _warned_devices:
        _warned_devices.add(name)
        logger.warning(
            "No peak bf16 FLOP/s known for GPU %r: MFU will be logged as null (add it to "
            "treadle.train.metrics._PEAK_BF16_FLOPS).",
            name,
        )
    return flops


class Throughput:
    """Tokens/s, TFLOP/s and MFU over the window since the last `compute()`.

    Call `update(step, num_tokens)` once per optimizer step with the tokens this rank consumed, and
    `compute()` at each log interval. Time is wall-clock (`time.perf_counter`), read after
    `torch.cuda.synchronize()` on CUDA, and only at window boundaries so the steps themselves are never
    synchronised.

    Warm-up: the first `warmup_steps` updates after construction (torch.compile, autotuning, the
    allocator growing; after a resume too, since compilation starts over) are kept out of the window.
    Their time, from construction to the end of the last warm-up step, is reported once as `warmup_s`
    by the first `compute()` after it; `compute()` during warm-up reports throughput as None. Construct
    this right before the first step, since the warm-up clock starts then.

    Global tokens are this rank's tokens × `world_tokens_factor`: the number of ranks that consume
    distinct tokens, i.e. the data-parallel degree (× the context-parallel degree when `num_tokens` is
    this rank's shard of the sequence); ranks of one tensor/pipeline-parallel group share their tokens.
    Pass `world_tokens_factor=1` when `num_tokens` is already global. Per-device figures divide the
    global rate by `num_devices` (the world size), so MFU stays comparable across layouts.

    Wrap evaluation and checkpoint saves in `paused()` so their time does not count as training time.
    """

    def __init__(
        self,
        *,
        flops_per_token: float,
        device: torch.device,
        peak_flops_per_device: float | None,
        num_devices: int = 1,
        world_tokens_factor: int = 1,
        warmup_steps: int = 1,
    ) -> None:
        if num_devices < 1 or world_tokens_factor < 1 or warmup_steps < 0:
            raise ValueError(
                f"Throughput needs num_devices >= 1, world_tokens_factor >= 1 and warmup_steps >= 0, "
                f"got {num_devices}, {world_tokens_factor} and {warmup_steps}"
            )
        self.flops_per_token = flops_per_token
        self.device = device
        self.peak_flops_per_device = peak_flops_per_device
        self.num_devices = num_devices
        self.world_tokens_factor = world_tokens_factor
        self.warmup_steps = warmup_steps
        self._num_updates = 0
        self._last_step: int | None = None
        self._window_start = self._now()
        self._window_tokens = 0
        self._window_steps = 0
        self._paused_s = 0.0
        self._warmup_s: float | None = None

    def _now(self) -> float:
        # Kernels are queued asynchronously: without the sync the clock would stop before the GPU does.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @property
    def in_warmup(self) -> bool:
        return self._num_updates < self.warmup_steps

    def update(self, step: int, num_tokens: int) -> None:
        """Record that optimizer step `step` finished, having consumed `num_tokens` tokens on this rank."""
        assert self._last_step is None or step > self._last_step, (
            f"steps must increase: {step} after {self._last_step}"
        )
        self._last_step = step
        self._num_updates += 1
        if self._num_updates <= self.warmup_steps:
            if self._num_updates == self.warmup_steps:
                now = self._now()
                self._warmup_s = now - self._window_start - self._paused_s
                self._reset_window(now)
            return
        self._window_tokens += num_tokens
        self._window_steps += 1

    def compute(self) -> dict[str, float | None]:
        """Throughput over the window since the last call (or since warm-up ended), then start a new one.

        Keys: `tokens_per_s` (global), `tokens_per_s_per_device`, `tflops_per_device`, `mfu` (a fraction
        of peak; None without a known peak), `step_time_s` (mean seconds per step), and `warmup_s` once.
        Values are None when the window holds no step.
        """
        out: dict[str, float | None] = dict.fromkeys(
            ("tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu", "step_time_s")
        )
        if self.in_warmup:
            return out
        now = self._now()
        elapsed = now - self._window_start - self._paused_s
        if self._window_steps > 0 and elapsed > 0:
            tokens_per_s = self._window_tokens * self.world_tokens_factor / elapsed
            per_device = tokens_per_s / self.num_devices
            flops = self.flops_per_token * per_device
            out["tokens_per_s"] = tokens_per_s
            out["tokens_per_s_per_device"] = per_device
            out["tflops_per_device"] = flops / 1e12
            if self.peak_flops_per_device:
                out["mfu"] = flops / self.peak_flops_per_device
            out["step_time_s"] = elapsed / self._window_steps
        if self._warmup_s is not None:
            out["warmup_s"] = self._warmup_s
            self._warmup_s = None
        self._reset_window(now)
        return out

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Keep the time spent inside (evaluation, checkpointing) out of the throughput window."""
        start = self._now()
        try:
            yield
        finally:
            self._paused_s += self._now() - start

    def _reset_window(self, now: float) -> None:
        self._window_start = now
        self._window_tokens = 0
        self._window_steps = 0
        self._paused_s = 0.0


def memory_stats(device: torch.device) -> dict[str, float | int]:
    """Peak memory since the previous call.

    CUDA: the caching allocator's peak allocated and reserved bytes in GiB and as % of the device's
    total, and `num_alloc_retries` (cumulative since start: each is a cudaMalloc that failed and was
    retried after freeing the cache, a sign of fragmentation near OOM). The peaks are reset after
    reading so each log interval reports its own (the reserved peak restarts from what the cache still
    holds, so it only falls after `torch.cuda.empty_cache()`).

    Other devices: the process's peak resident set size in GiB. This is a high-water mark since the
    process started (getrusage cannot be reset), and is not reported on Windows, which lacks it.
    """
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        allocated = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
        retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
        torch.cuda.reset_peak_memory_stats(device)
        return {
            "memory_max_allocated_gib": allocated / _GIB,
            "memory_max_allocated_pct": 100 * allocated / total,
            "memory_max_reserved_gib": reserved / _GIB,
            "memory_max_reserved_pct": 100 * reserved / total,
            "memory_num_alloc_retries": retries,
        }
    if sys.platform == "win32":
        return {}
    import resource

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    max_rss_bytes = max_rss if sys.platform == "darwin" else max_rss * 1024
    return {"memory_max_rss_gib": max_rss_bytes / _GIB}
