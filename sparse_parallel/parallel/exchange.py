"""The one communication primitive of sequence parallelism: a planned point-to-point exchange.

Every rank knows, from the shard rule and the pattern alone, which tensors it
sends to and receives from every peer (shapes and dtypes included), so one
``batch_isend_irecv`` moves them with no size handshake.  The tensors for one
peer travel as a single byte buffer (segments ordered by element size, largest
first, so every segment stays aligned without padding).

The exchange is a start/wait pair of autograd functions; its backward is the
same exchange run in reverse (each received tensor's gradient goes back to its
sender), launched at the wait and collected at the start, so work between the
two overlaps the transfer in both directions.  Halo exchange, gathering
strided/global keys, fetching global queries, returning their partial results
and the all-to-all of the head-sharded path are all this one primitive; what differs is only which rows are selected before it (whose
autograd backward adds the returned gradients into the owner's dk/dv) and how
the received tensors are used after it.

Every byte put on the wire is added to ``SequenceParallel.bytes_sent`` under
"forward" or "backward", so tests can check ``comm_volume`` against reality.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Spec:
    """Shape and dtype of one tensor received from a peer."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _order(dtypes: list[torch.dtype]) -> list[int]:
    """Packing order: largest element size first (keeps every segment aligned)."""
    return sorted(range(len(dtypes)), key=lambda i: -dtypes[i].itemsize)


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


def _launch(sp, peers_out: list[int], tensors, peers_in: list[int], specs_in: list[Spec], device, direction):
    """Pack ``tensors`` by peer and launch; returns a function giving the received tensors in order."""
    by_peer: dict[int, list[torch.Tensor]] = {}
    for peer, t in zip(peers_out, tensors):
        by_peer.setdefault(peer, []).append(t)
    specs_by_peer: dict[int, list[Spec]] = {}
    for peer, spec in zip(peers_in, specs_in):
        specs_by_peer.setdefault(peer, []).append(spec)
    sends = {p: _pack(ts) for p, ts in by_peer.items()}
    nbytes = {p: sum(sp_.nbytes for sp_ in specs) for p, specs in specs_by_peer.items()}
    bufs, works = _p2p(sp, sends, nbytes, device, direction)

    def finish() -> list[torch.Tensor]:
        for w in works:
            w.wait()
        got = {p: _unpack(bufs[p], specs) if p in bufs else
               [torch.zeros(x.shape, dtype=x.dtype, device=device) for x in specs]
               for p, specs in specs_by_peer.items()}
        cursor = {p: 0 for p in got}
        out = []
        for peer in peers_in:
            out.append(got[peer][cursor[peer]])
            cursor[peer] += 1
        sends.clear()  # the send buffers lived until here: the transfer is complete
        return out

    return finish


@dataclass
class _State:
    """Shared by the start and wait halves of one exchange."""

    sp: object
    send_peers: list[int]
    send_specs: list[Spec]
    recv_peers: list[int]
    recv_specs: list[Spec]
    device: object
    finish: object = None  # forward: completes the forward transfer; backward: the reverse one


class _Start(torch.autograd.Function):
    """Forward: launch the sends/receives.  Backward: wait for the reverse transfer, return dsends."""

    @staticmethod
    def forward(fctx, st: _State, anchor, *tensors):
        st.finish = _launch(st.sp, st.send_peers, tensors, st.recv_peers, st.recv_specs, st.device, "forward")
        fctx.st = st
        # Placeholders carrying the graph edge to _Wait; the data comes from st.finish().
        return tuple(torch.empty(0, dtype=s.dtype, device=st.device) for s in st.recv_specs) + (
            torch.zeros((), dtype=anchor.dtype, device=st.device),)

    @staticmethod
    def backward(fctx, *grads):
        st = fctx.st
        dsends = st.finish()
        st.finish = None
        return (None, None, *dsends)


class _Wait(torch.autograd.Function):
    """Forward: wait for the transfer, return what arrived.  Backward: launch the reverse transfer."""

    @staticmethod
    def forward(fctx, st: _State, *placeholders):
        outs = st.finish()
        st.finish = None
        fctx.st = st
        return (*outs, placeholders[-1].clone())

    @staticmethod
    def backward(fctx, *grads):
        st = fctx.st
        dgot = [torch.zeros(s.shape, dtype=s.dtype, device=st.device) if g is None else g.to(s.dtype)
                for s, g in zip(st.recv_specs, grads[:-1])]
        st.finish = _launch(st.sp, st.recv_peers, dgot, st.send_peers, st.send_specs, st.device, "backward")
        # Launched, not waited: gradients of other work are computed while it is in flight,
        # until the autograd engine reaches _Start.backward, which waits.
        return (None, *[torch.zeros(0, dtype=s.dtype, device=st.device) for s in st.recv_specs],
                grads[-1])


class Pending:
    """An exchange in flight: ``wait()`` gives the received tensors (and sets ``token``)."""

    def __init__(self, st: _State | None, placeholders, tensors=None, token=None):
        self.st, self.placeholders = st, placeholders
        self.tensors, self.token = tensors, token

    def wait(self) -> list[torch.Tensor]:
        if self.tensors is None:
            outs = _Wait.apply(self.st, *self.placeholders)
            self.tensors, self.token = list(outs[:-1]), outs[-1]
        return self.tensors


def start_exchange(sp, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, Spec]],
                   device, anchor: torch.Tensor) -> Pending:
    """Send ``sends`` [(peer, tensor)] and receive ``recvs`` [(peer, Spec)], asynchronously.

    Both sides must list the tensors between one pair of ranks in the same
    order.  Returns a ``Pending`` whose ``wait()`` gives the received tensors,
    differentiable: in backward their gradients go back to the senders, launched
    when the engine reaches the wait and collected when it reaches the start, so
    the gradients of work done between the two overlap the reverse transfer.

    Backward exchanges are collective, so every rank must run each one, in the
    same order.  ``anchor`` (a floating tensor of the graph, e.g. q_shard or the
    previous exchange's token) ties this exchange into the graph; the caller
    adds ``pending.token`` (a zero, set by ``wait()``) into its result, so the
    backward of this exchange runs on every rank even where nothing is
    received, and chaining the next exchange's anchor to this token fixes the
    order of the backwards.
    """
    st = _State(sp, [p for p, _ in sends], [Spec(tuple(t.shape), t.dtype) for _, t in sends],
                [p for p, _ in recvs], [s for _, s in recvs], device)
    placeholders = _Start.apply(st, anchor, *[t for _, t in sends])
    return Pending(st, placeholders)
