"""Activation offload: saved activations wait out the rest of forward in host memory, not on the GPU.

Each transformer block's saved tensors form one group. Forward: a tensor is copied to pinned host memory on a
side stream, which first waits for the compute stream (the tensor must be written before it is read); the
GPU copy is released to the caching allocator with `record_stream`, so its memory is reused only once the
copy has finished, without the compute stream ever waiting. Backward runs the blocks in reverse: the first
tensor unpacked from group g fetches group g on the side stream if it is not there yet, and starts fetching
group g − 1, so that the next block's host-to-device copies overlap this block's backward (one group of
lookahead, as in torchtitan's and Megatron-LM's activation offloading). The compute stream waits on a
group's copy event before using its tensors.

PCIe bandwidth bounds it: an H100 moves ~25 GB/s each way over PCIe Gen5, so a block's activations must take
longer to compute than to copy for the offload to be hidden. Off CUDA there is nothing to offload to; the
`host_copy` mode copies CPU tensors anyway, so that tests exercise the pack/unpack/prefetch logic on CPU.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class OffloadedTensor:
    host: torch.Tensor
    device: torch.device
    group: int
    d2h_done: torch.cuda.Event | None = None
    fetched: torch.Tensor | None = None
    h2d_done: torch.cuda.Event | None = None

    @property
    def nbytes(self) -> int:
        return self.host.numel() * self.host.element_size()


@dataclass
class Offloader:
    """Moves tensors to host memory in forward and back in backward, one group (block) ahead."""

    host_copy: bool = False  # copy CPU tensors too (tests); on CUDA tensors are always offloaded
    _stream: torch.cuda.Stream | None = None
    _group: int = -1
    _groups: dict[int, list[weakref.ref[OffloadedTensor]]] = field(default_factory=dict)

    def new_group(self) -> None:
        self._group += 1
        self._groups[self._group] = []

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def offload(self, t: torch.Tensor) -> OffloadedTensor:
        if not t.is_cuda:
            off = OffloadedTensor(t.detach().clone(), t.device, self._group)
        else:
            stream = self._side_stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            t.record_stream(stream)
            off = OffloadedTensor(host, t.device, self._group, d2h_done=event)
        self._groups.setdefault(self._group, []).append(weakref.ref(off))
        return off

    def _fetch_group(self, group: int) -> None:
        for ref in self._groups.pop(group, []):
            off = ref()
            if off is None or off.fetched is not None:
                continue
            if off.device.type != "cuda":
                off.fetched = off.host
                continue
            stream = self._side_stream(off.device)
            with torch.cuda.stream(stream):
                off.fetched = off.host.to(off.device, non_blocking=True)
                off.h2d_done = torch.cuda.Event()
                off.h2d_done.record(stream)

    def fetch(self, off: OffloadedTensor) -> torch.Tensor:
        if off.fetched is None:
            self._fetch_group(off.group)
            if off.fetched is None:  # a group already fetched, but this tensor was added to it later
                self._groups.setdefault(off.group, []).append(weakref.ref(off))
                self._fetch_group(off.group)
        self._fetch_group(off.group - 1)
        t = off.fetched
        assert t is not None
        if off.h2d_done is not None:
            current = torch.cuda.current_stream(off.device)
            current.wait_event(off.h2d_done)
            t.record_stream(current)
        return t
