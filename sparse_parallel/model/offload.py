"""Activation checkpointing whose saved layer input lives in host memory.

At a million tokens per GPU the checkpointed inputs of the layers alone
(N x dim x 2 bytes each: 4 GiB per layer at d_model 2048) outgrow the GPU.
``offloaded_checkpoint`` copies the input to pinned host memory during the
forward (asynchronously, on the compute stream, so ordering is kept), runs the
layer without saving anything, and in the backward brings the input back,
recomputes the layer with gradients and back-propagates through it.

Only whole-layer checkpoints go through here: selective checkpointing keeps each
layer's attention tensors on the GPU, several times the input offloaded here, so
the config refuses the combination (``transformer.OFFLOAD_NEEDS_FULL``).
"""
from __future__ import annotations

import torch


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, x, *args):
        ctx.run = run
        ctx.device = x.device
        ctx.save_for_backward(*args)
        host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=x.is_cuda)
        host.copy_(x, non_blocking=x.is_cuda)
        ctx.host = host
        with torch.no_grad():
            return run(x, *args)

    @staticmethod
    def backward(ctx, grad):
        args = ctx.saved_tensors
        x = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.host = None
        with torch.enable_grad():
            out = ctx.run(x, *args)
        torch.autograd.backward(out, grad)
        return (None, x.grad) + (None,) * len(args)


def offloaded_checkpoint(run, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    """``run(x, *args)`` with only ``x`` kept, in host memory; ``args`` get no gradient."""
    return _OffloadedCheckpoint.apply(run, x, *args)
