"""Parallax attention for training: the Triton forward and backward (packed documents, causal,
sliding window, GQA) behind a torch custom op, `parallax_attn`. Reached through parallax_kernels.py;
the math, the checks and the reference are in parallax_reference.py.
"""
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from parallax_reference import HALF_DTYPES, SUPPORTED_HEAD_DIMS, check_shapes, document_ids, parallax_output

# ----------------------------------------------------------------------------------------------
# Triton kernels
#
# One program owns a block of BLOCK_M query rows of one head (forward, dQ/dR) or a block of BLOCK_N
# keys of one KV head (dK/dV). Documents are handled as a mask over the packed sequence: query row i
# sees key j when lo_i <= j <= pos_i, where lo_i = max(start of i's document, pos_i - window + 1).
# Both bounds grow with i, so a block's key range is [lo of its first row, pos of its last row].
#
# The backward needs, per query row, b_i = g_i . o1_i with o1 = softmax attention's output, and c_i = g_i . o_i:
# the forward saves o1 (normalized, in q's dtype: one more (B, T, H, D) tensor per call). The dQ kernel takes b
# and b - c from its g, o and o1 tiles before it sweeps the keys once, for dQ and dR, and stores them for the
# dK/dV kernel, which sweeps the queries once. (A separate kernel for them read g a second time; with the tiles
# arriving through TMA, doing it in the dQ kernel made the step 0.5-1.1 ms faster at FineWeb-like document
# lengths and no different at devdocs' longer ones: records/2026-11-30_row-dots-in-dq-h200.)
#
# The tiles each inner loop streams (K/V over keys, Q/R/G over queries) arrive through tensor descriptors:
# TMA copies on Hopper, which zero-fill rows past the end as masked loads would, with no address
# arithmetic in the loop (H200, T=65536 packed documents, window 1792: fwd+bwd 4.44 against 4.76 ms with
# masked pointer loads, the same bits). Before Hopper, Triton compiles descriptor loads to plain loads.


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634


# Tile shapes (BLOCK_M, BLOCK_N, warps, pipeline stages) per kernel, chosen by timing candidates kernel by
# kernel (README). Fixed rather than autotuned, so a new shape costs only compilation. The interpreter runs
# one small tile so the CPU tests exercise multi-block paths quickly.
_TILES = {"fwd": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "dkdv": (32, 64, 4, 2)}


def _tile(kernel):
    block_m, block_n, warps, stages = (16, 16, 1, 1) if INTERPRET else _TILES[kernel]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


@triton.jit
def _row_bounds(offs_m, Tq, Tk, window, DOC_START, VARLEN: tl.constexpr, WINDOWED: tl.constexpr):
    """Absolute key position of each query row and the first key it may see."""
    rows = tl.minimum(offs_m, Tq - 1)  # rows past the end copy the last one: bounds stay monotone
    pos = rows + (Tk - Tq)
    lo = tl.zeros_like(pos)
    if VARLEN:
        lo = tl.load(DOC_START + rows)
    if WINDOWED:
        lo = tl.maximum(lo, pos - window + 1)
    return pos, lo


@triton.jit
def _visible(pos, lo, kpos):
    """(query rows, keys) bool: the visibility rule in row bounds, lo_i <= j <= pos_i."""
    return (kpos[None, :] <= pos[:, None]) & (kpos[None, :] >= lo[:, None])


@triton.jit
def _query_rows(n_heads, Tq, stride_qb, stride_qt, stride_qh, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's block of query rows of one head: offsets, validity, their offsets in q (and in the
    tensors laid out like it), the offsets of their per-row statistics, the batch row and the head."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_off = b * stride_qb + offs_m[:, None] * stride_qt + h * stride_qh + tl.arange(0, D)[None, :]
    return offs_m, offs_m < Tq, q_off, pid_bh * Tq + offs_m, b, h


@triton.jit
def _query_block(n_heads, group, Tq, Tk, window, DOC_START, stride_qb, stride_qt, stride_qh,
                 D: tl.constexpr, VARLEN: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr):
    """_query_rows with the rows' key bounds, and the column of their KV head in a (B, T, H * D) view."""
    offs_m, row_ok, q_off, stat_off, b, h = _query_rows(n_heads, Tq, stride_qb, stride_qt, stride_qh, D, BLOCK_M)
    pos, lo = _row_bounds(offs_m, Tq, Tk, window, DOC_START, VARLEN, WINDOWED)
    return offs_m, row_ok, pos, lo, q_off, stat_off, b, (h // group) * D


@triton.jit
def _load_tile(desc, b, row0, col, BLOCK: tl.constexpr, D: tl.constexpr):
    """Rows row0 .. row0 + BLOCK - 1 of one head through a (B, T, H * D) descriptor (a TMA copy on Hopper);
    the descriptor's bounds make rows past T zeros."""
    return desc.load([b, row0, col]).reshape([BLOCK, D])


@triton.jit
def _fwd_tile(q, r, K, V, b, kv_col, start_n, pos, lo, scale_log2, m_i, d1, d2, o1, o2,
              D: tl.constexpr, BLOCK_N: tl.constexpr):
    kpos = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K, b, start_n, kv_col, BLOCK_N, D)
    v = _load_tile(V, b, start_n, kv_col, BLOCK_N, D)
    s = tl.dot(q, tl.trans(k)) * scale_log2
    u = tl.dot(r, tl.trans(k))
    # u stays finite (keys past Tk load as 0), so p * u = 0 where p = 0
    s = tl.where(_visible(pos, lo, kpos), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    pu = p * u
    d1 = d1 * alpha + tl.sum(p, axis=1)
    d2 = d2 * alpha + tl.sum(pu, axis=1)
    o1 = o1 * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    o2 = o2 * alpha[:, None] + tl.dot(pu.to(v.dtype), v)
    return m_new, d1, d2, o1, o2


@triton.jit
def _fwd_kernel(Q, R, K, V, O, O1, LSE, TMEAN, DOC_START,
                stride_qb, stride_qt, stride_qh,
                Tq, Tk, n_heads, group, window, scale_log2,
                D: tl.constexpr, VARLEN: tl.constexpr, WINDOWED: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m, row_ok, pos, lo, q_off, stat_off, b, kv_col = _query_block(
        n_heads, group, Tq, Tk, window, DOC_START, stride_qb, stride_qt, stride_qh,
        D, VARLEN, WINDOWED, BLOCK_M)
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    r = tl.load(R + q_off, mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite, so fully masked tiles give alpha = 1
    d1 = tl.zeros([BLOCK_M], tl.float32)
    d2 = tl.zeros([BLOCK_M], tl.float32)
    o1 = tl.zeros([BLOCK_M, D], tl.float32)
    o2 = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(tl.min(lo, axis=0) // BLOCK_N * BLOCK_N, tl.max(pos, axis=0) + 1, BLOCK_N):
        m_i, d1, d2, o1, o2 = _fwd_tile(q, r, K, V, b, kv_col, start_n, pos, lo, scale_log2, m_i, d1, d2, o1, o2,
                                        D, BLOCK_N)

    t = d2 / d1
    o = parallax_output(o1, o2, d1, d2)
    tl.store(O + q_off, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    softmax_out = o1 / tl.where(d1 > 0, d1, float("inf"))[:, None]  # 0 for a row without visible keys
    tl.store(O1 + q_off, softmax_out.to(O1.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + stat_off, m_i + tl.log2(d1), mask=row_ok)
    tl.store(TMEAN + stat_off, t, mask=row_ok)


@triton.jit
def _bwd_probs(q, k, kpos, pos, lo, lse, scale_log2):
    """Recomputed softmax probabilities of a (query rows, keys) tile."""
    p = tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None])
    return tl.where(_visible(pos, lo, kpos), p, 0.0)


@triton.jit
def _score_grads(p, u, a, t1, bdot, bc):
    """dL/du and dL/ds of a tile from p, u = r.k and a = g.v, given each row's 1 + t, b and b - c broadcast
    to the tile: with n = b - a, dL/du = p n and dL/ds = p (b - c - (1 + t - u) n), the gradients above
    regrouped to fewer element-wise operations."""
    n = bdot - a
    return p * n, p * (bc - (t1 - u) * n)


@triton.jit
def _dqdr_tile(q, r, g, K, V, b, kv_col, start_n, pos, lo, lse, t1, bdot, bc, scale_log2, dq, dr,
               D: tl.constexpr, BLOCK_N: tl.constexpr):
    kpos = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K, b, start_n, kv_col, BLOCK_N, D)
    v = _load_tile(V, b, start_n, kv_col, BLOCK_N, D)
    p = _bwd_probs(q, k, kpos, pos, lo, lse, scale_log2)
    u = tl.dot(r, tl.trans(k))
    a = tl.dot(g, tl.trans(v))
    du, ds = _score_grads(p, u, a, t1[:, None], bdot[:, None], bc[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq)
    dr = tl.dot(du.to(k.dtype), k, dr)
    return dq, dr


@triton.jit
def _row_dots(g, O, O1, off, row_ok):
    """Per query row, b = g . o1 (= sum_j p_ij a_ij) and b - c with c = g . o: the backward's row constants."""
    g = g.to(tl.float32)
    bdot = tl.sum(g * tl.load(O1 + off, mask=row_ok[:, None], other=0.0).to(tl.float32), axis=1)
    c = tl.sum(g * tl.load(O + off, mask=row_ok[:, None], other=0.0).to(tl.float32), axis=1)
    return bdot, bdot - c


@triton.jit
def _bwd_dq_kernel(Q, R, K, V, G, O, O1, LSE, TMEAN, BDOT, BC, DOC_START, DQ, DR,
                   stride_qb, stride_qt, stride_qh,
                   Tq, Tk, n_heads, group, window, scale_log2, scale,
                   D: tl.constexpr, VARLEN: tl.constexpr, WINDOWED: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m, row_ok, pos, lo, q_off, stat_off, b, kv_col = _query_block(
        n_heads, group, Tq, Tk, window, DOC_START, stride_qb, stride_qt, stride_qh,
        D, VARLEN, WINDOWED, BLOCK_M)
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    r = tl.load(R + q_off, mask=row_ok[:, None], other=0.0)
    g = tl.load(G + q_off, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + stat_off, mask=row_ok, other=0.0)
    t1 = 1.0 + tl.load(TMEAN + stat_off, mask=row_ok, other=0.0)
    bdot, bc = _row_dots(g, O, O1, q_off, row_ok)
    tl.store(BDOT + stat_off, bdot, mask=row_ok)
    tl.store(BC + stat_off, bc, mask=row_ok)
    k_start, k_end = tl.min(lo, axis=0) // BLOCK_N * BLOCK_N, tl.max(pos, axis=0) + 1

    # One sweep over the keys for dQ and dR.
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    dr = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(k_start, k_end, BLOCK_N):
        dq, dr = _dqdr_tile(q, r, g, K, V, b, kv_col, start_n, pos, lo, lse, t1, bdot, bc, scale_log2, dq, dr,
                            D, BLOCK_N)

    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
    tl.store(DR + q_off, dr.to(DR.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_tile(k, v, kpos, key_end, Q, R, G, LSE, TMEAN, BDOT, BC, stat_base, b, q_col, start_m, shift, Tq,
               scale_log2, scale, dk, dv, D: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q, b, start_m, q_col, BLOCK_M, D)
    r = _load_tile(R, b, start_m, q_col, BLOCK_M, D)
    g = _load_tile(G, b, start_m, q_col, BLOCK_M, D)
    row_ok = rows < Tq
    lse = tl.load(LSE + stat_base + rows, mask=row_ok, other=0.0)
    t1 = 1.0 + tl.load(TMEAN + stat_base + rows, mask=row_ok, other=0.0)
    bdot = tl.load(BDOT + stat_base + rows, mask=row_ok, other=0.0)
    bc = tl.load(BC + stat_base + rows, mask=row_ok, other=0.0)

    # Key j is seen by the rows at positions j .. key_end_j - 1 (rows past Tq are at or past Tk >= key_end_j).
    pos = rows + shift
    visible = (pos[None, :] >= kpos[:, None]) & (pos[None, :] < key_end[:, None])
    p_t = tl.where(visible, tl.exp2(tl.dot(k, tl.trans(q)) * scale_log2 - lse[None, :]), 0.0)
    u_t = tl.dot(k, tl.trans(r))
    a_t = tl.dot(v, tl.trans(g))
    dv = tl.dot((p_t * (t1[None, :] - u_t)).to(g.dtype), g, dv)
    du_t, ds_t = _score_grads(p_t, u_t, a_t, t1[None, :], bdot[None, :], bc[None, :])
    dk = tl.dot((ds_t * scale).to(q.dtype), q, dk)
    dk = tl.dot(du_t.to(r.dtype), r, dk)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, R, K, V, G, LSE, TMEAN, BDOT, BC, DOC_END, DK, DV,
                     stride_kb, stride_kt, stride_kh,
                     Tq, Tk, n_heads, n_kv_heads, group, window, scale_log2, scale,
                     D: tl.constexpr, VARLEN: tl.constexpr, WINDOWED: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bh // n_kv_heads, pid_bh % n_kv_heads
    first_key = pid_n * BLOCK_N
    kpos = first_key + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    key_ok = kpos < Tk
    kv_off = b * stride_kb + kpos[:, None] * stride_kt + hk * stride_kh + offs_d[None, :]
    k = tl.load(K + kv_off, mask=key_ok[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=key_ok[:, None], other=0.0)

    # The rule lo_i <= j <= pos_i read per key: j is seen from position j up to where its document (or its
    # window) ends, so no query row's bounds are needed here.
    key_end = tl.zeros_like(kpos) + Tk
    if VARLEN:
        key_end = tl.load(DOC_END + tl.minimum(kpos, Tk - 1))
    if WINDOWED:
        key_end = tl.minimum(key_end, kpos + window)
    shift = Tk - Tq
    m_start = tl.maximum(first_key - shift, 0) // BLOCK_M * BLOCK_M
    m_end = tl.max(key_end, axis=0) - shift

    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for h in range(hk * group, hk * group + group):
        stat_base = (b * n_heads + h) * Tq
        for start_m in range(m_start, m_end, BLOCK_M):
            dk, dv = _dkdv_tile(k, v, kpos, key_end, Q, R, G, LSE, TMEAN, BDOT, BC, stat_base, b, h * D, start_m,
                                shift, Tq, scale_log2, scale, dk, dv, D, BLOCK_M)

    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


def _launch_args(q, k, window):
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    return dict(Tq=Tq, Tk=Tk, n_heads=Hq, group=Hq // Hkv, window=max(window, 1), D=D, WINDOWED=window > 0)


def _strides(name, x):
    """A (B, T, H, D) tensor's batch, position and head strides as the kernels' stride_{name}b/t/h."""
    return {f"stride_{name}{dim}": stride for dim, stride in zip("bth", x.stride()[:3])}


def _kernel_layout(*tensors):
    """Each tensor contiguous (the kernels share q's strides for r, g, o, o1) at a 16-byte aligned address
    (TMA's terms; a contiguous view at an odd offset is copied). With D in {64, 128} at 2 bytes, every
    stride of a (B, T, H * D) view is then a multiple of 16 bytes too."""
    tensors = (x.contiguous() for x in tensors)
    return tuple(x if x.data_ptr() % 16 == 0 else x.clone() for x in tensors)


def _tile_descriptors(block_rows, *tensors):
    """Tensor descriptors over contiguous (B, T, H, D) tensors viewed as (B, T, H * D), loading [1, block_rows, D]
    tiles of one head; their bound T zero-fills the rows past the end of each batch row."""
    descriptors = []
    for x in tensors:
        B, T, H, D = x.shape
        descriptors.append(TensorDescriptor(x, [B, T, H * D], [T * H * D, H * D, 1], [1, block_rows, D]))
    return descriptors


def _forward(q, r, k, v, doc_start, window, scale):
    B, Tq, Hq, D = q.shape
    o, softmax_out = torch.empty_like(q), torch.empty_like(q)
    lse = torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32)
    t = torch.empty_like(lse)
    tile = _tile("fwd")
    k_tiles, v_tiles = _tile_descriptors(tile["BLOCK_N"], k, v)
    _fwd_kernel[(triton.cdiv(Tq, tile["BLOCK_M"]), B * Hq)](
        q, r, k_tiles, v_tiles, o, softmax_out, lse, t, doc_start if doc_start is not None else lse,
        scale_log2=scale * LOG2E, VARLEN=doc_start is not None, **_strides("q", q), **_launch_args(q, k, window),
        **tile)
    return o, softmax_out, lse, t


def _backward(g, q, r, k, v, o, softmax_out, lse, t, doc_start, doc_end, window, scale):
    B, Tq, Hq, _ = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    dq, dr = torch.empty_like(q), torch.empty_like(r)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    bdot, b_minus_c = torch.empty_like(lse), torch.empty_like(lse)
    varlen = doc_start is not None
    common = dict(scale_log2=scale * LOG2E, scale=scale, VARLEN=varlen, **_launch_args(q, k, window))
    tile = _tile("dq")
    k_tiles, v_tiles = _tile_descriptors(tile["BLOCK_N"], k, v)
    _bwd_dq_kernel[(triton.cdiv(Tq, tile["BLOCK_M"]), B * Hq)](
        q, r, k_tiles, v_tiles, g, o, softmax_out, lse, t, bdot, b_minus_c, doc_start if varlen else lse, dq, dr,
        **_strides("q", q), **common, **tile)
    tile = _tile("dkdv")
    q_tiles, r_tiles, g_tiles = _tile_descriptors(tile["BLOCK_M"], q, r, g)
    _bwd_dkdv_kernel[(triton.cdiv(Tk, tile["BLOCK_N"]), B * Hkv)](
        q_tiles, r_tiles, k, v, g_tiles, lse, t, bdot, b_minus_c, doc_end if varlen else lse, dk, dv,
        n_kv_heads=Hkv, **_strides("k", k), **common, **tile)
    return dq, dr, dk, dv


# ----------------------------------------------------------------------------------------------
# torch custom ops: opaque to torch.compile (no graph break), with autograd


@torch.library.custom_op("parallax::forward", mutates_args=())
def _forward_op(q: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                doc_start: torch.Tensor | None, doc_end: torch.Tensor | None, window: int, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, r, k, v = _kernel_layout(q, r, k, v)
    return _forward(q, r, k, v, doc_start, window, scale)


@_forward_op.register_fake
def _(q, r, k, v, doc_start, doc_end, window, scale):
    stats = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    outputs = [torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(2)]
    return *outputs, stats, torch.empty_like(stats)


@torch.library.custom_op("parallax::backward", mutates_args=())
def _backward_op(g: torch.Tensor, q: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 o: torch.Tensor, softmax_out: torch.Tensor, lse: torch.Tensor, t: torch.Tensor,
                 doc_start: torch.Tensor | None, doc_end: torch.Tensor | None, window: int, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g, q, r, k, v = _kernel_layout(g, q, r, k, v)
    return _backward(g, q, r, k, v, o, softmax_out, lse, t, doc_start, doc_end, window, scale)


@_backward_op.register_fake
def _(g, q, r, k, v, o, softmax_out, lse, t, doc_start, doc_end, window, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, r, k, v))


def _setup_context(ctx, inputs, output):
    q, r, k, v, doc_start, doc_end, window, scale = inputs
    o, softmax_out, lse, t = output
    ctx.mark_non_differentiable(softmax_out, lse, t)
    ctx.save_for_backward(q, r, k, v, o, softmax_out, lse, t, doc_start, doc_end)
    ctx.window, ctx.scale = window, scale


def _backward_rule(ctx, grad_o, grad_softmax_out, grad_lse, grad_t):
    q, r, k, v, o, softmax_out, lse, t, doc_start, doc_end = ctx.saved_tensors
    dq, dr, dk, dv = _backward_op(grad_o, q, r, k, v, o, softmax_out, lse, t, doc_start, doc_end, ctx.window,
                                  ctx.scale)
    return dq, dr, dk, dv, None, None, None, None


_forward_op.register_autograd(_backward_rule, setup_context=_setup_context)


def _document_bounds(cu_seqlens, T):
    """Per position, the offsets where its document starts and ends (int32, length T each)."""
    doc = document_ids(cu_seqlens, T)
    return cu_seqlens[doc], cu_seqlens[doc + 1]


def parallax_attn(q, r, k, v, *, cu_seqlens=None, max_seqlen=None, window=None, scale=None):
    """Parallax attention through the Triton kernels, differentiable in q, r, k and v.

    q, r: (B, Tq, Hq, D); k, v: (B, Tk, Hkv, D) with Hq a multiple of Hkv (GQA/MQA: K and V are
    never repeated), D in {64, 128}, bf16 or fp16, CUDA (or CPU under TRITON_INTERPRET=1).
    Causal, end-aligned when Tq < Tk (query i sees keys j <= Tk - Tq + i): that is prefill after a
    cache. cu_seqlens (int32, N + 1 offsets, B = 1) packs documents that never see each other.
    window: visible keys including the diagonal (FlashAttention's (left, 0) is window = left + 1).
    scale multiplies q.k only (default D**-0.5); r.k is not scaled. max_seqlen is accepted for
    FlashAttention-style call sites and only checked: the kernels derive ranges from cu_seqlens.
    Returns q's dtype and shape. Saved for backward beyond the inputs and output: softmax attention's
    output o1 (q's shape and dtype) and O(B * Hq * Tq) statistics.
    """
    check_shapes(q, r, k, v, cu_seqlens, window, scale, allow_cpu=False, dtypes=HALF_DTYPES,
                 head_dims=SUPPORTED_HEAD_DIMS)
    if max_seqlen is not None and not (isinstance(max_seqlen, int) and max_seqlen >= 1):
        raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    doc_start, doc_end = (None, None) if cu_seqlens is None else _document_bounds(cu_seqlens, q.shape[1])
    o, _, _, _ = _forward_op(q, r, k, v, doc_start, doc_end, window or 0, scale)
    return o
