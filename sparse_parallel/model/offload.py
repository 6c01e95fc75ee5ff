"""Whole-layer activation checkpoints: a layer keeps its input (on the GPU or in host memory).

``LayerChain`` holds the inputs of the checkpointed layers of one forward:
``chain.checkpoint(layer, x, cos, sin, documents)`` keeps ``x``, runs the layer
without saving anything else, and in the backward recomputes the layer from
``x`` and back-propagates through it (``Block.backward_from``: the MLP one chunk
at a time, forward and backward together, so it runs twice per step, not three
times).  With ``keep_attention`` the attention op's output and log-sum-exp stay
on the GPU from the first forward, and the recompute replays them instead of
running the attention forward again (where the backend can: ``api.sparse_attention``).

With ``offload`` the inputs wait in pinned host memory: at a million tokens per
GPU the inputs alone (N x dim x 2 bytes each: 4 GiB per layer at d_model 2048)
outgrow the GPU.  On CUDA both copies run on a side stream, one per device, so
they overlap the layers' compute instead of queueing behind it: the forward
copies layer i's input out while layers i, i+1, ... run, and the backward of
layer i, before it recomputes, starts bringing back the input of layer i-1, the
next one the backward needs. That costs one more layer input on the GPU during
each layer's backward. On CPU the same chain runs with plain copies.

The recompute back-propagates into the layer's parameters from inside the
backward, so their gradients accumulate in ``.grad`` (as with reentrant
checkpointing): train with ``.backward()``, not ``torch.autograd.grad`` over them.

Selective checkpointing keeps each layer's attention q, k, v and output on the
GPU and does not go through here; the config refuses it with offload
(``transformer.OFFLOAD_NEEDS_FULL``).
"""
from __future__ import annotations

import torch

_TAKEN = ("checkpointed layer input {index} was already taken back: a backward through whole-layer "
          "checkpoints runs once (no retain_graph)")

# One copy stream per device, made on first use and shared by every chain: a forward creates no
# stream, and the copies of successive forwards (micro-batches) queue in order on the same one.
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return stream


class LayerChain:
    """The kept inputs of the checkpointed layers of one forward, in layer order.

    Made once per forward and shared by its layers: the forward stashes each layer's input,
    the backward takes them back in reverse order (with ``offload``, prefetching the one before:
    ``prefetched`` counts the inputs the backward found already on their way back).
    """

    def __init__(self, offload: bool = False, keep_attention: bool = False):
        self.offload, self.keep_attention = offload, keep_attention
        self._inputs: list[torch.Tensor | None] = []
        # index -> (the input on the device, the side-stream event after its copy; None on CPU)
        self._in_flight: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self._device: torch.device | None = None
        self.prefetched = 0

    def checkpoint(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   documents=None) -> torch.Tensor:
        """``layer(x, cos, sin, documents=documents)`` keeping only ``x`` (and the attention output with
        ``keep_attention``); ``cos``/``sin`` get no gradient."""
        kept = KeptAttention() if self.keep_attention else None
        if not x.requires_grad and any(p.requires_grad for p in layer.parameters()):
            # An autograd Function runs its backward only for inputs that need a gradient; the layer's
            # parameters are not inputs, so an input that needs none (frozen embeddings) gets one here.
            x = x.detach().requires_grad_(True)
        return _LayerCheckpoint.apply(self, layer, documents, kept, x, cos, sin)

    def stash(self, x: torch.Tensor) -> int:
        """Keep ``x`` (with ``offload``: start copying it to host memory); its index for :meth:`take`."""
        if not self.offload:
            self._inputs.append(x)
            return len(self._inputs) - 1
        if self._device is not None and x.device != self._device:
            raise ValueError(f"one chain holds the inputs of one device: {self._device}, then {x.device}")
        self._device = x.device
        host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=x.is_cuda)
        if x.is_cuda:
            compute, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
            # The work producing x is queued on the compute stream; the copy starts after it.
            side.wait_event(compute.record_event())
            with torch.cuda.stream(side):
                host.copy_(x, non_blocking=True)
            # Nothing keeps x once the next layer has run, and the caching allocator would hand its
            # memory to the compute stream's next allocation while the copy may still be reading it.
            # record_stream makes the allocator, when x is freed, wait for the work queued on the side
            # stream by then (this copy, maybe later ones: the memory may come back a little late,
            # never early). The pinned host buffer needs no such care: a non-blocking copy records an
            # event with the pinned-memory allocator itself.
            x.record_stream(side)
        else:
            host.copy_(x)
        self._inputs.append(host)
        return len(self._inputs) - 1

    def take(self, index: int) -> torch.Tensor:
        """The input stashed as ``index``, on its device and ready on the current stream.

        With ``offload``, before returning it, starts bringing back the input of ``index - 1``, which
        the backward needs next, so that its copy overlaps the recompute and backward of this layer.
        """
        if not self.offload:
            x, self._inputs[index] = self._inputs[index], None
            if x is None:
                raise RuntimeError(_TAKEN.format(index=index))
            return x
        entry = self._in_flight.pop(index, None)
        if entry is None:
            entry = self._fetch(index)
        else:
            self.prefetched += 1
        if index > 0 and self._inputs[index - 1] is not None:
            self._in_flight[index - 1] = self._fetch(index - 1)
        x, copied = entry
        if copied is not None:
            torch.cuda.current_stream(x.device).wait_event(copied)
        return x

    def _fetch(self, index: int) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        host = self._inputs[index]
        if host is None:
            raise RuntimeError(_TAKEN.format(index=index))
        self._inputs[index] = None
        if self._device.type != "cuda":
            return host, None
        compute, side = torch.cuda.current_stream(self._device), _side_stream(self._device)
        # Allocated on the compute stream, like the layers' own tensors: its memory may be that of a
        # tensor the compute stream freed with kernels on it still queued, so the copy first waits
        # for the work queued there so far; this layer's recompute and backward, queued after, overlap
        # it. (A block of the side stream's pool would serve only later side-stream allocations: the
        # caching allocator reuses a block on the stream it was allocated on, so two or three layer
        # inputs would be held back from the layers.)
        x = torch.empty(host.shape, dtype=host.dtype, device=self._device)
        side.wait_event(compute.record_event())
        with torch.cuda.stream(side):
            x.copy_(host, non_blocking=True)
            copied = side.record_event()
        # take() makes the compute stream wait for the copy before x is used, so x is normally freed
        # only after it; should the chain be dropped with the copy in flight (a failed backward), the
        # allocator must still not hand x's memory out while the side stream writes into it.
        x.record_stream(side)
        return x, copied


class KeptAttention:
    """A checkpointed layer's attention (out, lse) from its first forward, until its recompute takes it."""

    __slots__ = ("saved",)

    def __init__(self):
        self.saved = None


class _LayerCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chain, layer, documents, kept, x, cos, sin):
        ctx.chain, ctx.layer, ctx.documents, ctx.kept = chain, layer, documents, kept
        ctx.index = chain.stash(x)
        ctx.save_for_backward(cos, sin)
        # The recompute runs in the backward, outside the forward's autocast region: it re-enters it.
        kind = x.device.type
        ctx.autocast = dict(device_type=kind, enabled=torch.is_autocast_enabled(kind),
                            dtype=torch.get_autocast_dtype(kind), cache_enabled=torch.is_autocast_cache_enabled())
        with torch.no_grad():
            return layer(x, cos, sin, documents=documents, kept=kept)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        x = ctx.chain.take(ctx.index)
        with torch.autocast(**ctx.autocast):
            dx = ctx.layer.backward_from(x, cos, sin, grad, documents=ctx.documents, kept=ctx.kept)
        return None, None, None, None, dx, None, None
