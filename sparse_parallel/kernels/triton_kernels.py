"""The Triton kernels: forward, dq and dk/dv of attention over key spaces.

Imported lazily (``TRITON_INTERPRET`` is read when a kernel is decorated).  The
launchers in ``core.py`` are the only callers.

Vocabulary (see ``plan.py``):
- a *term* is one structured piece of the pattern: keys ``j`` with
  ``lo_rel*i + lo_c <= j <= hi_rel*i + hi_c`` and ``j = r (mod m)``; terms are
  evaluated in order and a pair belongs to the first term that allows it;
- a *pass* walks one key space for one set of served terms; its ``MODE`` is a
  ``plan.PassKind``: RANGE a range of key tiles of an arithmetic space (positions
  ``pos0 + kstr*idx``), EXPLICIT a range of an explicit space (positions loaded),
  BLOCK / BLOCK_EXPLICIT the key blocks listed by the block table;
- a tile inside a plan's *full* range needs no mask: every pair is owned.

The forward and dq kernels fuse up to ``core.MAX_SLOTS`` passes (slots: a tuple argument) of one query
tile in one online-softmax loop, each pass with its own terms (``NTS[i]``: see ``core._pass_terms``);
dk/dv runs one pass per launch, key-major, over the key tiles that some query sees, with long query
ranges split into balanced chunks.  Offsets that can pass 2^31 (batch, head and tile bases) are int64.

The streamed operand of each loop (k/v tiles of the query-major kernel, q/do tiles of dk/dv) is read
through a tensor descriptor made by the launcher: on Hopper a TMA copy (no per-element address
registers, zeros outside the rows), elsewhere rewritten by Triton to masked loads.  The query-major
kernel's are over the whole ``[B, N, H, D]`` k and v (``core.tile_descriptor``), indexed by (batch,
row, head); dk/dv's over q and do (``core.dkdv_descriptor``).  Made on the device instead, each
program writes its descriptors to global memory and fences them before its first tile (measured:
the forward ran 4-5% slower; RESULTS.md).  The launcher checks the 16-byte alignment descriptors need
(``core.check_descriptor_alignment``).
"""
import triton
import triton.language as tl

from .plan import PassKind

RANGE = tl.constexpr(PassKind.RANGE.value)
EXPLICIT = tl.constexpr(PassKind.EXPLICIT.value)
BLOCK = tl.constexpr(PassKind.BLOCK.value)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _owned(qp, kp, TERMS, NT: tl.constexpr, served, CAUSAL: tl.constexpr, n,
           KIND: tl.constexpr, member, HAS_BLOCK: tl.constexpr, TBLH, stq, W, CB):
    """Pairs (qp, kp) owned by the pass: its first allowing term is served.

    KIND (a ``PassKind``) RANGE: range pass over structured terms; EXPLICIT: the same
    plus the explicit global-key term (``member``), which comes after the block term;
    BLOCK: block pass (the tile is listed for the row, so the block term allows it).
    """
    seen = (qp < -1) & (kp < -1)
    own = seen
    for t in tl.static_range(NT):
        lo_rel = tl.load(TERMS + 6 * t)
        lo_c = tl.load(TERMS + 6 * t + 1)
        hi_rel = tl.load(TERMS + 6 * t + 2)
        hi_c = tl.load(TERMS + 6 * t + 3)
        m = tl.load(TERMS + 6 * t + 4)
        r = tl.load(TERMS + 6 * t + 5)
        a = (kp >= lo_rel * qp + lo_c) & (kp <= hi_rel * qp + hi_c)
        if m != 1:  # an integer remainder per pair costs more than the rest of the predicate
            if (m & (m - 1)) == 0:
                a = a & (((kp - r) & (m - 1)) == 0)
            else:
                a = a & ((kp - r) % m == 0)
        srv = ((served >> t) & 1) != 0
        own = own | (a & (~seen) & srv)
        seen = seen | a
    if KIND == BLOCK:
        own = own | (~seen)
    if KIND == EXPLICIT:
        if HAS_BLOCK:
            cqb = qp // CB
            kbk = kp // CB
            for w in range(0, W):
                e = tl.load(TBLH + cqb * stq + w)
                seen = seen | (kbk == e)
        own = own | ((member != 0) & (~seen))
    own = own & (kp < n) & (kp >= 0)
    if CAUSAL:
        own = own & (kp <= qp)
    return own


@triton.jit
def _first_index(p, pos0, kstr):
    """The first index of the arithmetic space ``pos0 + kstr*idx`` whose position is >= p (>= 0)."""
    return (tl.maximum(p - pos0, 0) + kstr - 1) // kstr


@triton.jit
def _span(DS, DE, dbase, pos, valid):
    """(smallest start, largest start, smallest end, largest end) of the documents holding ``pos``."""
    start = tl.load(DS + dbase + pos, mask=valid, other=0)
    end = tl.load(DE + dbase + pos, mask=valid, other=0)
    big = 2147483647
    return (start, end, tl.min(tl.where(valid, start, big)), tl.max(tl.where(valid, start, 0)),
            tl.min(tl.where(valid, end, big)), tl.max(tl.where(valid, end, 0)))


@triton.jit
def _segments(lo, hi, flo, fhi):
    """Cut the tile range [lo, hi] into masked [lo, flo), full [flo, fhi], masked (fhi, hi].

    The full range is clipped to [lo, hi]; an empty one leaves [lo, hi] to the masked segments.
    """
    flo = tl.minimum(tl.maximum(flo, lo), hi + 1)
    fhi = tl.maximum(tl.minimum(fhi, hi), flo - 1)
    return flo, fhi


@triton.jit
def _tile(acc, m_i, l_i, q, do, lse2, delta, qp, idx, b, hk, kdesc, vdesc, pos0, kstr, nk, KPOS, KMEM,
          MASKED: tl.constexpr, e, served, TERMS, NT: tl.constexpr, CAUSAL: tl.constexpr, n, qk_scale,
          HAS_BLOCK: tl.constexpr, TBLH, stq, W, CB,
          MODE: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr, PHASE: tl.constexpr,
          HAS_DOC: tl.constexpr, dstart, dend):
    """One key tile for one query tile: online softmax (PHASE 0) or dq accumulation (PHASE 1).

    ``idx`` = the tile's first key index (scalar); ``e`` the listed key block (block passes);
    ``kdesc``/``vdesc`` describe the space's keys ``[B, nk, Hkv, D]``, of which the tile reads batch
    ``b``, head ``hk`` (rows outside [0, nk) read as zeros).
    ``MASKED`` is a compile-time flag so that the loop over a plan's full tiles has no
    branch in its body and is software-pipelined like a dense attention loop.
    """
    kidx = idx + tl.arange(0, BN)
    kmask = (kidx < nk) & (kidx >= 0)
    k = tl.reshape(kdesc.load([b, idx, hk, 0]), (BN, D))
    v = tl.reshape(vdesc.load([b, idx, hk, 0]), (BN, D))
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    if MASKED:
        if MODE == RANGE or MODE == BLOCK:
            kp = pos0 + kstr * kidx
        else:
            kp = tl.load(KPOS + kidx, mask=kmask, other=-1)
        if MODE == EXPLICIT:
            mem = tl.load(KMEM + kidx, mask=kmask, other=0)
        else:
            mem = kmask
        if MODE >= BLOCK:
            ok = _owned(qp[:, None], kp[None, :], TERMS, NT, served, CAUSAL, n, BLOCK, mem[None, :],
                        HAS_BLOCK, TBLH, stq, W, CB)
            ok = ok & ((kp // CB) == e)[None, :]
        else:
            ok = _owned(qp[:, None], kp[None, :], TERMS, NT, served, CAUSAL, n, MODE, mem[None, :],
                        HAS_BLOCK, TBLH, stq, W, CB)
        ok = ok & kmask[None, :]
        if HAS_DOC:  # the query's document: [dstart, dend)
            ok = ok & (kp[None, :] >= dstart[:, None])
            if not CAUSAL:
                ok = ok & (kp[None, :] < dend[:, None])
        s = tl.where(ok, s, float("-inf"))
    if PHASE == 0:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    else:
        p = tl.math.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        acc = acc + _dot(ds.to(k.dtype), k, IEEE)
    return acc, m_i, l_i


@triton.jit
def _slot(acc, m_i, l_i, q, do, lse2, delta, qp, row0, qb, split, chunk, b, hk, TBLH, stq,
          kdesc, vdesc, pos0, kstr, nk, KPOS, KMEM, served, PLAN, TSTH,
          TERMS, NT: tl.constexpr, CAUSAL: tl.constexpr, n, qk_scale, HAS_BLOCK: tl.constexpr, W, CB,
          MODE: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
          IEEE: tl.constexpr, PHASE: tl.constexpr, HAS_DOC: tl.constexpr, dstart, dend, s_lo, s_hi, e_lo, e_hi):
    """All key tiles of one pass for one query tile.

    With documents, a range pass over an arithmetic space starts at the first key tile of the
    query tile's first document and runs unmasked only over tiles inside every row's document;
    other passes mask by document.
    """
    if MODE >= BLOCK:
        crow = (row0 // CB) * stq
        for w in range(0, W):
            e = tl.load(TBLH + crow + w)
            if e >= 0:
                st = tl.load(TSTH + crow + w)
                for u in range(0, CB // BN):
                    acc, m_i, l_i = _tile(acc, m_i, l_i, q, do, lse2, delta, qp, st + u * BN, b, hk, kdesc, vdesc,
                                          pos0, kstr, nk, KPOS, KMEM, True, e, served, TERMS, NT,
                                          CAUSAL, n, qk_scale, HAS_BLOCK, TBLH, stq, W, CB,
                                          MODE, BN, D, IEEE, PHASE, HAS_DOC, dstart, dend)
    else:
        lo = tl.load(PLAN + qb * 4)
        hi = tl.load(PLAN + qb * 4 + 1)
        flo = tl.load(PLAN + qb * 4 + 2)
        fhi = tl.load(PLAN + qb * 4 + 3)
        if SPLIT:
            lo = tl.maximum(lo, split * chunk)
            hi = tl.minimum(hi, split * chunk + chunk - 1)
        if HAS_DOC:
            if MODE == RANGE:
                lo = tl.maximum(lo, _first_index(s_lo, pos0, kstr) // BN)
                flo = tl.maximum(flo, (_first_index(s_hi, pos0, kstr) + BN - 1) // BN)
                if not CAUSAL:
                    hi = tl.minimum(hi, (_first_index(e_hi, pos0, kstr) + BN - 1) // BN - 1)
                    fhi = tl.minimum(fhi, _first_index(e_lo, pos0, kstr) // BN - 1)
            else:
                flo = hi + 1  # explicit positions: every tile masked
        flo, fhi = _segments(lo, hi, flo, fhi)
        for kb in range(lo, flo):
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, do, lse2, delta, qp, kb * BN, b, hk, kdesc, vdesc,
                                  pos0, kstr, nk, KPOS, KMEM, True, -1, served, TERMS, NT,
                                  CAUSAL, n, qk_scale, HAS_BLOCK, TBLH, stq, W, CB,
                                  MODE, BN, D, IEEE, PHASE, HAS_DOC, dstart, dend)
        for kb in range(flo, fhi + 1):
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, do, lse2, delta, qp, kb * BN, b, hk, kdesc, vdesc,
                                  pos0, kstr, nk, KPOS, KMEM, False, -1, served, TERMS, NT,
                                  CAUSAL, n, qk_scale, HAS_BLOCK, TBLH, stq, W, CB,
                                  MODE, BN, D, IEEE, PHASE, HAS_DOC, dstart, dend)
        for kb in range(fhi + 1, hi + 1):
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, do, lse2, delta, qp, kb * BN, b, hk, kdesc, vdesc,
                                  pos0, kstr, nk, KPOS, KMEM, True, -1, served, TERMS, NT,
                                  CAUSAL, n, qk_scale, HAS_BLOCK, TBLH, stq, W, CB,
                                  MODE, BN, D, IEEE, PHASE, HAS_DOC, dstart, dend)
    return acc, m_i, l_i


# Lengths, offsets and strides of positions are run-time values: changing them must not recompile.
# Triton specialises the integers inside a tuple argument even under do_not_specialize, so the
# spaces' offsets, strides and lengths stay top-level arguments, one per slot (unused slots: zeros).
@triton.jit(do_not_specialize=["qpos0", "nq", "n", "chunk", "W", "CB"]
            + [f"{a}{i}" for i in range(6) for a in ("pp", "ks", "nk")])
def query_kernel(Q, sqb, sqn, sqh, DO, sdb, sdn, sdh, QPOS, qpos0, nq, heads, group,
                  O, sob, son, soh, sos, LSE, slb, slh, sls, LSE2, DELTA, sxb, sxh,
                  n, qk_scale, TBL, stb, sth, stq, W, CB, chunk, DS, DE, sdcb, SLOTS,
                  kd0, vd0, kd1, vd1, kd2, vd2, kd3, vd3, kd4, vd4, kd5, vd5,
                  pp0, ks0, nk0, pp1, ks1, nk1, pp2, ks2, nk2, pp3, ks3, nk3, pp4, ks4, nk4, pp5, ks5, nk5,
                  MODES: tl.constexpr, NTS: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_BLOCK: tl.constexpr, Q_EXPLICIT: tl.constexpr,
                  SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                  IEEE: tl.constexpr, PHASE: tl.constexpr, HAS_DOC: tl.constexpr):
    """Query-major kernel: PHASE 0 writes out and lse, PHASE 1 writes dq (unscaled by nothing: final)."""
    qb = tl.num_programs(0) - 1 - tl.program_id(0)  # causal: the longest rows first
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // heads
    h = bh % heads
    hk = h // group
    rows = qb * BM + tl.arange(0, BM)
    rmask = rows < nq
    offs_d = tl.arange(0, D)
    if Q_EXPLICIT:
        qp = tl.load(QPOS + rows, mask=rmask, other=0)
        row0 = tl.load(QPOS + qb * BM)
    else:
        qp = qpos0 + rows
        row0 = qpos0 + qb * BM
    qoff = tl.cast(b, tl.int64) * sqb + tl.cast(h, tl.int64) * sqh + tl.cast(qb * BM, tl.int64) * sqn
    ld = (tl.arange(0, BM) * sqn)[:, None] + offs_d[None, :]
    q = tl.load(Q + qoff + ld, mask=rmask[:, None], other=0.0)
    TBLH = TBL + tl.cast(b, tl.int64) * stb + tl.cast(h, tl.int64) * sth
    toff = tl.cast(b, tl.int64) * stb + tl.cast(h, tl.int64) * sth
    if HAS_DOC:
        dstart, dend, s_lo, s_hi, e_lo, e_hi = _span(DS, DE, tl.cast(b, tl.int64) * sdcb, qp, rmask)
    else:
        dstart, dend, s_lo, s_hi, e_lo, e_hi = qp, qp, 0, 0, 0, 0
    acc = tl.zeros([BM, D], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    if PHASE == 1:
        doff = tl.cast(b, tl.int64) * sdb + tl.cast(h, tl.int64) * sdh + tl.cast(qb * BM, tl.int64) * sdn
        do = tl.load(DO + doff + (tl.arange(0, BM) * sdn)[:, None] + offs_d[None, :], mask=rmask[:, None],
                     other=0.0)
        xoff = tl.cast(b, tl.int64) * sxb + tl.cast(h, tl.int64) * sxh
        lse2 = tl.load(LSE2 + xoff + rows, mask=rmask, other=0.0)
        delta = tl.load(DELTA + xoff + rows, mask=rmask, other=0.0)
    else:
        do = q
        lse2 = m_i
        delta = m_i
    # One slot per pass: SLOTS[i] its tensors, (kdi, vdi) its key space's descriptors, (ppi, ksi, nki)
    # the space's first position, stride and length, MODES[i] / NTS[i] its kind and term count.
    descs = ((kd0, vd0), (kd1, vd1), (kd2, vd2), (kd3, vd3), (kd4, vd4), (kd5, vd5))
    extents = ((pp0, ks0, nk0), (pp1, ks1, nk1), (pp2, ks2, nk2), (pp3, ks3, nk3), (pp4, ks4, nk4),
               (pp5, ks5, nk5))
    for i in tl.static_range(len(MODES)):
        KP, KM, sv, PL, TS, TM = SLOTS[i]
        kd, vd = descs[i]
        pp, ks, nk = extents[i]
        acc, m_i, l_i = _slot(acc, m_i, l_i, q, do, lse2, delta, qp, row0, qb, split, chunk, b, hk, TBLH,
                              stq, kd, vd, pp, ks, nk, KP, KM, sv, PL, TS + toff, TM, NTS[i],
                              CAUSAL, n, qk_scale, HAS_BLOCK, W, CB, MODES[i], SPLIT, BN, D, IEEE, PHASE,
                              HAS_DOC, dstart, dend, s_lo, s_hi, e_lo, e_hi)
    ooff = (tl.cast(split, tl.int64) * sos + tl.cast(b, tl.int64) * sob + tl.cast(h, tl.int64) * soh
            + tl.cast(qb * BM, tl.int64) * son)
    optr = O + ooff + (tl.arange(0, BM) * son)[:, None] + offs_d[None, :]
    if PHASE == 0:
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        lse = tl.where(empty, float("-inf"), (m_safe + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(optr, out.to(O.dtype.element_ty), mask=rmask[:, None])
        loff = tl.cast(split, tl.int64) * sls + tl.cast(b, tl.int64) * slb + tl.cast(h, tl.int64) * slh
        tl.store(LSE + loff + rows, lse, mask=rmask)
    else:
        acc = acc * (qk_scale * 0.6931471805599453)
        tl.store(optr, acc.to(O.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _dkdv_tile(dk, dv, k, v, kp, kmask, rows0, nq, b, h, qdesc, dodesc, lbase, dbase, sxh,
               QPOS, qpos0, MASKED: tl.constexpr, e, served, TERMS, NT: tl.constexpr, CAUSAL: tl.constexpr,
               n, qk_scale, mem, HAS_BLOCK: tl.constexpr, TBLH, stq, W, CB, MODE: tl.constexpr,
               Q_EXPLICIT: tl.constexpr, BM: tl.constexpr, GS: tl.constexpr, D: tl.constexpr,
               IEEE: tl.constexpr, HAS_DOC: tl.constexpr, DSB, DEB):
    """One query tile against the program's key tile: dk/dv accumulate.

    The tile is ``BM`` stacked rows: ``BM // GS`` positions from ``rows0`` x ``GS`` query heads of the
    key's group (row ``r`` = position ``rows0 + r // GS``, head ``r % GS`` of the chunk), so that one
    product sums over the chunk's heads.  ``qdesc``/``dodesc`` (``core.dkdv_descriptor``) read batch
    ``b`` from head ``h`` on: one head of ``[B, N, H*D]`` at column ``h*D`` (GS 1), else ``GS`` heads of
    ``[B, N, H, D]``.
    """
    r = tl.arange(0, BM)
    if GS == 1:
        rows = rows0 + r
        q = tl.reshape(qdesc.load([b, rows0, h * D]), (BM, D))
        do = tl.reshape(dodesc.load([b, rows0, h * D]), (BM, D))
        xo = rows
    else:
        rows = rows0 + r // GS
        q = tl.reshape(qdesc.load([b, rows0, h, 0]), (BM, D))
        do = tl.reshape(dodesc.load([b, rows0, h, 0]), (BM, D))
        xo = (r % GS) * sxh + rows
    rmask = (rows < nq) & (rows >= 0)
    lse2 = tl.load(lbase + xo, mask=rmask, other=0.0)
    delta = tl.load(dbase + xo, mask=rmask, other=0.0)
    st = _dot(k, tl.trans(q), IEEE) * qk_scale  # [BN, BM]
    if MASKED:
        if Q_EXPLICIT:
            qp = tl.load(QPOS + rows, mask=rmask, other=0)
        else:
            qp = qpos0 + rows
        if MODE >= BLOCK:
            ok = _owned(qp[None, :], kp[:, None], TERMS, NT, served, CAUSAL, n, BLOCK, mem[:, None],
                        HAS_BLOCK, TBLH, stq, W, CB)
            ok = ok & ((kp // CB) == e)[:, None]
        else:
            ok = _owned(qp[None, :], kp[:, None], TERMS, NT, served, CAUSAL, n, MODE, mem[:, None],
                        HAS_BLOCK, TBLH, stq, W, CB)
        ok = ok & kmask[:, None] & rmask[None, :]
        if HAS_DOC:  # the key must lie in the query's document
            ok = ok & (kp[:, None] >= tl.load(DSB + qp, mask=rmask, other=0)[None, :])
            if not CAUSAL:
                ok = ok & (kp[:, None] < tl.load(DEB + qp, mask=rmask, other=0)[None, :])
        st = tl.where(ok, st, float("-inf"))
    pt = tl.math.exp2(st - lse2[None, :])
    dv = dv + _dot(pt.to(do.dtype), do, IEEE)
    dpt = _dot(v, tl.trans(do), IEEE)
    dst = pt * (dpt - delta[None, :])
    dk = dk + _dot(dst.to(q.dtype), q, IEEE)
    return dk, dv


@triton.jit(do_not_specialize=["qpos0", "nq", "n", "pos0", "kstr", "nk", "qchunk", "W", "CB", "t0"])
def dkdv_kernel(qdesc, dodesc, QPOS, qpos0, nq, heads, group, chunks,
                 LSE2, DELTA, sxb, sxh, TERMS, n, qk_scale, TBL, stb, sth, stq, W, CB, ctb, cth,
                 K, V, skb, skn, skh, pos0, kstr, nk, KPOS, KMEM, served, QPLAN, QFPLAN, KBLK, KSTART, CPTR, CIDX,
                 DK, DV, sob, son, soh, sos, qchunk, t0, DS, DE, sdcb,
                 MODE: tl.constexpr, NT: tl.constexpr, CAUSAL: tl.constexpr, HAS_BLOCK: tl.constexpr,
                 Q_EXPLICIT: tl.constexpr, ACCUM: tl.constexpr, SPLIT: tl.constexpr,
                 BM: tl.constexpr, GS: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
                 HAS_DOC: tl.constexpr):
    """Key-major dk/dv of one pass: a key tile walks the query tiles that can see it.

    Range passes: key tile ``kb`` visits query tiles ``QPLAN[kb]``, of which ``QFPLAN[kb]``
    need no mask; block passes: program ``t`` takes sub-tile ``t % (CB/BN)`` of listed key
    block ``KBLK[t // (CB/BN)]`` and visits the query blocks that list it (``CPTR``/``CIDX``,
    per table row).  Query heads of one KV group are summed here, so dk/dv need no atomics: ``GS`` of
    them at a time stacked into each query tile of ``BM`` rows (``BM // GS`` positions; tiles, plans
    and chunks below count positions in those units).
    Range passes launch key tiles ``t0 + program_id(0)`` and write at key index
    ``idx - t0*BN`` of DK/DV (a buffer of the launched tiles only).  With SPLIT, program
    ``(t, bhk, s)`` takes query tiles ``(q_hi - (s+1)*qchunk, q_hi - s*qchunk]`` and writes a
    partial at ``s * sos`` (keys seen by very many query tiles: global keys, strided levels).
    """
    t = tl.program_id(0) + t0
    bhk = tl.program_id(1)
    split = tl.program_id(2)
    kvh = heads // group
    b = bhk // kvh
    hk = bhk % kvh
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    if MODE >= BLOCK:
        per = CB // BN
        e = tl.load(KBLK + t // per)
        idx0 = tl.load(KSTART + t // per) + (t % per) * BN
    else:
        e = -1
        idx0 = t * BN
    kidx = idx0 + offs_n
    kmask = (kidx < nk) & (kidx >= 0)
    kbase = tl.cast(b, tl.int64) * skb + tl.cast(hk, tl.int64) * skh
    toff = tl.cast(idx0, tl.int64) * skn + (offs_n * skn)[:, None] + offs_d[None, :]
    k = tl.load(K + kbase + toff, mask=kmask[:, None], other=0.0)
    v = tl.load(V + kbase + toff, mask=kmask[:, None], other=0.0)
    if MODE == RANGE or MODE == BLOCK:
        kp = pos0 + kstr * kidx
    else:
        kp = tl.load(KPOS + kidx, mask=kmask, other=-1)
    if MODE >= BLOCK:
        kmask = kmask & ((kp // CB) == e)
    if MODE == EXPLICIT:
        mem = tl.load(KMEM + kidx, mask=kmask, other=0)
    else:
        mem = kmask
    DSB = DS + tl.cast(b, tl.int64) * sdcb
    DEB = DE + tl.cast(b, tl.int64) * sdcb
    if HAS_DOC:  # the queries that can see these keys lie in the keys' documents
        _s, _e, ks_lo, ks_hi, ke_lo, ke_hi = _span(DS, DE, tl.cast(b, tl.int64) * sdcb, kp, kmask)
    dk = tl.zeros([BN, D], dtype=tl.float32)
    dv = tl.zeros([BN, D], dtype=tl.float32)
    BMR: tl.constexpr = BM // GS
    for g in range(0, chunks):  # chunks = group // GS (1, the usual case, compiles the loop away)
        h = hk * group + g * GS
        xoff = tl.cast(b, tl.int64) * sxb + tl.cast(h, tl.int64) * sxh
        TBLH = TBL + tl.cast(b, tl.int64) * stb + tl.cast(h, tl.int64) * sth
        if MODE >= BLOCK:
            crow = tl.cast(b, tl.int64) * ctb + tl.cast(h, tl.int64) * cth + e
            c0 = tl.load(CPTR + crow)
            c1 = tl.load(CPTR + crow + 1)
            for ci in range(c0, c1):
                c = tl.load(CIDX + ci)
                for u in range(0, CB // BMR):
                    rows0 = c * CB + u * BMR - qpos0
                    dk, dv = _dkdv_tile(dk, dv, k, v, kp, kmask, rows0, nq, b, h, qdesc, dodesc,
                                        LSE2 + xoff, DELTA + xoff, sxh,
                                        QPOS, qpos0, True, e, served, TERMS, NT, CAUSAL, n, qk_scale, mem,
                                        HAS_BLOCK, TBLH, stq, W, CB, MODE, Q_EXPLICIT, BM, GS, D, IEEE,
                                        HAS_DOC, DSB, DEB)
        else:
            q_lo = tl.load(QPLAN + t * 2)
            q_hi = tl.load(QPLAN + t * 2 + 1)
            if SPLIT:  # chunks counted from the range's end, so chunk s of every key tile is the same tiles
                top = q_hi - split * qchunk
                q_lo = tl.maximum(q_lo, top - qchunk + 1)
                q_hi = top
            f_lo = tl.load(QFPLAN + t * 2)
            f_hi = tl.load(QFPLAN + t * 2 + 1)
            if HAS_DOC:
                if Q_EXPLICIT:
                    f_lo = q_hi + 1  # explicit query positions: every tile masked
                else:
                    q_hi = tl.minimum(q_hi, (tl.maximum(ke_hi - qpos0, 0) + BMR - 1) // BMR - 1)
                    f_hi = tl.minimum(f_hi, tl.maximum(ke_lo - qpos0, 0) // BMR - 1)
                    if not CAUSAL:
                        q_lo = tl.maximum(q_lo, tl.maximum(ks_lo - qpos0, 0) // BMR)
                        f_lo = tl.maximum(f_lo, (tl.maximum(ks_hi - qpos0, 0) + BMR - 1) // BMR)
            f_lo, f_hi = _segments(q_lo, q_hi, f_lo, f_hi)
            # From the last query tile down: the key tiles of a pass that run at the same time mostly end
            # at the same query tile (a strided level's or the global keys' run to the sequence end), so
            # they read the same q/do tiles together, from L2.  Walking up from each key tile's first
            # query tile, a strided level's neighbours (4096 positions apart at stride 64) would read
            # each tile long after one another, every time from memory.
            for it in range(0, q_hi - f_hi):
                dk, dv = _dkdv_tile(dk, dv, k, v, kp, kmask, (q_hi - it) * BMR, nq, b, h, qdesc, dodesc,
                                    LSE2 + xoff, DELTA + xoff, sxh,
                                    QPOS, qpos0, True, e, served, TERMS, NT, CAUSAL, n, qk_scale, mem,
                                    HAS_BLOCK, TBLH, stq, W, CB, MODE, Q_EXPLICIT, BM, GS, D, IEEE,
                                    HAS_DOC, DSB, DEB)
            for it in range(0, f_hi - f_lo + 1):
                dk, dv = _dkdv_tile(dk, dv, k, v, kp, kmask, (f_hi - it) * BMR, nq, b, h, qdesc, dodesc,
                                    LSE2 + xoff, DELTA + xoff, sxh,
                                    QPOS, qpos0, False, e, served, TERMS, NT, CAUSAL, n, qk_scale, mem,
                                    HAS_BLOCK, TBLH, stq, W, CB, MODE, Q_EXPLICIT, BM, GS, D, IEEE,
                                    HAS_DOC, DSB, DEB)
            for it in range(0, f_lo - q_lo):
                dk, dv = _dkdv_tile(dk, dv, k, v, kp, kmask, (f_lo - 1 - it) * BMR, nq, b, h, qdesc, dodesc,
                                    LSE2 + xoff, DELTA + xoff, sxh,
                                    QPOS, qpos0, True, e, served, TERMS, NT, CAUSAL, n, qk_scale, mem,
                                    HAS_BLOCK, TBLH, stq, W, CB, MODE, Q_EXPLICIT, BM, GS, D, IEEE,
                                    HAS_DOC, DSB, DEB)
    ooff = (tl.cast(split, tl.int64) * sos + tl.cast(b, tl.int64) * sob + tl.cast(hk, tl.int64) * soh
            + tl.cast(idx0 - t0 * BN, tl.int64) * son)
    optr = (offs_n * son)[:, None] + offs_d[None, :]
    # dk is stored before dv's earlier partial is read: one partial live at a time (fewer spills)
    dk = dk * (qk_scale * 0.6931471805599453)
    if ACCUM:
        dk = dk + tl.load(DK + ooff + optr, mask=kmask[:, None], other=0.0)
    tl.store(DK + ooff + optr, dk.to(DK.dtype.element_ty), mask=kmask[:, None])
    if ACCUM:
        dv = dv + tl.load(DV + ooff + optr, mask=kmask[:, None], other=0.0)
    tl.store(DV + ooff + optr, dv.to(DV.dtype.element_ty), mask=kmask[:, None])


@triton.jit(do_not_specialize=["nq"])
def bwd_prep_kernel(O, sob, son, soh, DO, sdb, sdn, sdh, LSE, DLSE, slb, slh, DELTA, LSE2, nq, heads,
                     HAS_DLSE: tl.constexpr, BM: tl.constexpr, D: tl.constexpr):
    """Per query row: ``delta = rowsum(do * o) - dlse`` and ``lse2 = lse * log2(e)`` (+inf for empty
    rows, so that their probabilities are 0), read straight from the low-precision o and do."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    rows = qb * BM + tl.arange(0, BM)
    rmask = rows < nq
    offs_d = tl.arange(0, D)
    o = tl.load(O + tl.cast(b, tl.int64) * sob + tl.cast(h, tl.int64) * soh
                + tl.cast(rows, tl.int64)[:, None] * son + offs_d[None, :], mask=rmask[:, None], other=0.0)
    do = tl.load(DO + tl.cast(b, tl.int64) * sdb + tl.cast(h, tl.int64) * sdh
                 + tl.cast(rows, tl.int64)[:, None] * sdn + offs_d[None, :], mask=rmask[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    xoff = tl.cast(b, tl.int64) * slb + tl.cast(h, tl.int64) * slh + rows
    lse = tl.load(LSE + xoff, mask=rmask, other=0.0)
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + xoff, mask=rmask, other=0.0).to(tl.float32)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(DELTA + xoff, delta, mask=rmask)
    tl.store(LSE2 + xoff, lse2, mask=rmask)
