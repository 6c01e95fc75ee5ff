"""The one communication primitive of sequence parallelism: a planned point-to-point exchange.

Every rank knows, from the shard rule and the pattern alone, which tensors it
sends to and receives from every peer (shapes and dtypes included), so one
``batch_isend_irecv`` moves them with no size handshake.  The tensors for one
peer travel as a single byte buffer (segments ordered by element size, largest
first, so every segment stays aligned without padding).

The exchange is an autograd function: its backward is the same exchange run in
reverse (each received tensor's gradient goes back to its sender).  Halo
exchange, gathering strided/global keys, fetching global queries, returning
their partial results and the all-to-all of the head-sharded path are all this
one function; what differs is only which rows are selected before it (whose
autograd backward adds the returned gradients into the owner's dk/dv) and how
the received tensors are used after it.

Every byte put on the wire is added to ``SequenceParallel.bytes_sent`` under
"forward" or "backward", so tests can check ``comm_volume`` against reality.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Spec:
    """Shape and dtype of one tensor received from a peer."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _order(dtypes: list[torch.dtype]) -> list[int]:
    """Packing order: largest element size first (keeps every segment aligned)."""
    sizes = [torch.empty((), dtype=d).element_size() for d in dtypes]
    return sorted(range(len(dtypes)), key=lambda i: -sizes[i])


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    order = _order([t.dtype for t in tensors])
    return torch.cat([tensors[i].contiguous().reshape(-1).view(torch.uint8) for i in order])


def _unpack(buf: torch.Tensor, specs: list[Spec]) -> list[torch.Tensor]:
    out: list[torch.Tensor | None] = [None] * len(specs)
    offset = 0
    for i in _order([s.dtype for s in specs]):
        n = specs[i].nbytes
        out[i] = buf[offset:offset + n].view(specs[i].dtype).view(specs[i].shape)
        offset += n
    return out  # type: ignore[return-value]


@dataclass
class Pending:
    """Received tensors whose transfer may still be in flight: call ``wait()`` before use."""

    tensors: list[torch.Tensor]
    works: list = field(default_factory=list)
    token: torch.Tensor | None = None  # see ``start_exchange``
    keep: object = None  # send buffers, alive until the transfer completes

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        self.works = []
        self.keep = None
        return self.tensors


def _p2p(sp, sends: dict[int, torch.Tensor], recv_nbytes: dict[int, int], device, direction: str):
    """Launch one batch of sends (byte buffers per peer) and receives -> (recv buffers, works)."""
    ops, recv = [], {}
    for peer in sorted(set(sends) | set(recv_nbytes)):
        if peer == sp.rank:
            raise RuntimeError("an exchange never sends to its own rank")
        if peer in sends and sends[peer].numel():
            ops.append(dist.P2POp(dist.isend, sends[peer], sp.global_ranks[peer], sp.group))
            sp.bytes_sent[direction] += sends[peer].numel()
        if recv_nbytes.get(peer, 0):
            recv[peer] = torch.empty(recv_nbytes[peer], dtype=torch.uint8, device=device)
            ops.append(dist.P2POp(dist.irecv, recv[peer], sp.global_ranks[peer], sp.group))
    works = dist.batch_isend_irecv(ops) if ops else []
    return recv, works


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(fctx, sp, send_peers, recv_plan, device, pending_box, anchor, *tensors):
        # recv_plan: list of (peer, Spec) in the order the outputs are returned.
        by_peer: dict[int, list[torch.Tensor]] = {}
        for peer, t in zip(send_peers, tensors):
            by_peer.setdefault(peer, []).append(t)
        specs_by_peer: dict[int, list[Spec]] = {}
        for peer, spec in recv_plan:
            specs_by_peer.setdefault(peer, []).append(spec)
        sends = {p: _pack(ts) for p, ts in by_peer.items()}
        nbytes = {p: sum(s.nbytes for s in specs) for p, specs in specs_by_peer.items()}
        bufs, works = _p2p(sp, sends, nbytes, device, "forward")
        outs_by_peer = {p: _unpack(bufs[p], specs) if p in bufs else
                        [torch.empty(s.shape, dtype=s.dtype, device=device) for s in specs]
                        for p, specs in specs_by_peer.items()}
        cursor = {p: 0 for p in specs_by_peer}
        outs = []
        for peer, _ in recv_plan:
            outs.append(outs_by_peer[peer][cursor[peer]])
            cursor[peer] += 1
        pending_box.append((works, sends))  # sends kept alive until the transfer completes
        fctx.sp, fctx.send_peers, fctx.recv_plan, fctx.device = sp, send_peers, recv_plan, device
        fctx.send_specs = [Spec(tuple(t.shape), t.dtype) for t in tensors]
        # The token makes every rank's backward run this node, even one that receives nothing.
        token = torch.zeros((), dtype=anchor.dtype, device=device)
        return (*outs, token)

    @staticmethod
    def backward(fctx, *grads):
        sp = fctx.sp
        by_peer: dict[int, list[torch.Tensor]] = {}
        for (peer, spec), g in zip(fctx.recv_plan, grads[:-1]):
            g = torch.zeros(spec.shape, dtype=spec.dtype, device=fctx.device) if g is None else g.to(spec.dtype)
            by_peer.setdefault(peer, []).append(g)
        specs_by_peer: dict[int, list[Spec]] = {}
        for peer, spec in zip(fctx.send_peers, fctx.send_specs):
            specs_by_peer.setdefault(peer, []).append(spec)
        sends = {p: _pack(ts) for p, ts in by_peer.items()}
        nbytes = {p: sum(s.nbytes for s in specs) for p, specs in specs_by_peer.items()}
        bufs, works = _p2p(sp, sends, nbytes, fctx.device, "backward")
        for w in works:
            w.wait()
        grads_by_peer = {p: _unpack(bufs[p], specs) if p in bufs else
                         [torch.zeros(s.shape, dtype=s.dtype, device=fctx.device) for s in specs]
                         for p, specs in specs_by_peer.items()}
        cursor = {p: 0 for p in specs_by_peer}
        out = []
        for peer in fctx.send_peers:
            out.append(grads_by_peer[peer][cursor[peer]])
            cursor[peer] += 1
        return (None, None, None, None, None, None, *out)


def start_exchange(sp, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, Spec]],
                   device, anchor: torch.Tensor) -> Pending:
    """Send ``sends`` [(peer, tensor)] and receive ``recvs`` [(peer, Spec)], asynchronously.

    Both sides must list the tensors between one pair of ranks in the same
    order.  Returns a ``Pending`` whose ``wait()`` gives the received tensors
    (differentiable: their gradients are sent back to the senders in backward).

    Backward exchanges are collective, so every rank must run each one, in the
    same order.  ``anchor`` (a floating tensor of the graph, e.g. q_shard or the
    previous exchange's token) ties this exchange into the graph; the caller
    adds ``pending.token`` (a zero) into its result, so the backward of this
    node runs on every rank even where nothing is received, and chaining the
    next exchange's anchor to this token fixes the order of the backwards.
    """
    box: list = []
    outs = _Exchange.apply(sp, [p for p, _ in sends], list(recvs), device, box, anchor,
                           *[t for _, t in sends])
    works, keep = box[0]
    return Pending(list(outs[:-1]), list(works), token=outs[-1], keep=keep)
