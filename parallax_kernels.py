"""Parallax attention: softmax attention plus a learned probe r of the key-value covariance.

Per head, for query row i over its visible keys j (causal, optionally a sliding window, never across
a document boundary):

    s_ij = scale * q_i . k_j        u_ij = r_i . k_j        p_ij = softmax_j(s_ij)
    t_i  = sum_j p_ij u_ij
    o_i  = sum_j p_ij (1 + t_i - u_ij) v_j  =  softmax_attention_i - r_i^T Cov_p(k, v)

r = 0 gives softmax attention exactly. Layout is heads-last: q, r (B, T, Hq, D); k, v (B, T, Hkv, D);
packed documents use B = 1 and cu_seqlens (int32, N + 1 offsets).

Sliding window: `window` is the number of visible keys including the diagonal, so query i sees keys
j with i - window < j <= i. FlashAttention's `window_size=(left, 0)` shows left + 1 keys: window =
left + 1.

Contents: the fp32/fp64 reference, input validation, the Triton forward/backward (varlen documents,
causal, sliding window, GQA) behind a torch custom op, and `python parallax_kernels.py bench`.
"""
import math
import os
import sys

import torch

SUPPORTED_HEAD_DIMS = (64, 128)


# ----------------------------------------------------------------------------------------------
# Reference


def parallax_reference(q, r, k, v, *, cu_seqlens=None, window=None, scale=None):
    """Plain-PyTorch Parallax attention, the ground truth for every test.

    Computes in float32 (float64 when given float64) and returns that dtype. Causal and
    end-aligned: with Tq queries and Tk >= Tq keys, query i sees keys j <= Tk - Tq + i.
    """
    _check_shapes(q, r, k, v, cu_seqlens, window, scale, allow_cpu=True, dtypes=ALL_DTYPES, head_dims=None)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, r, k, v = (x.to(dtype) for x in (q, r, k, v))
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    group = Hq // Hkv
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)

    visible = _visible_keys(Tq, Tk, window, cu_seqlens, q.device)  # (Tq, Tk) bool
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    u = torch.einsum("bihd,bjhd->bhij", r, k)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    u = u.masked_fill(~visible, 0.0)  # p = 0 there; keep u finite so 0 * u stays 0
    t = (p * u).sum(-1, keepdim=True)
    weights = p * (1 + t - u)
    return torch.einsum("bhij,bjhd->bihd", weights, v)


def _visible_keys(Tq, Tk, window, cu_seqlens, device):
    i = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    j = torch.arange(Tk, device=device)[None, :]
    visible = j <= i
    if window is not None:
        visible &= j > i - window
    if cu_seqlens is not None:
        doc = torch.bucketize(torch.arange(Tk, device=device), cu_seqlens[1:].long(), right=True)
        visible &= doc[:, None] == doc[None, :]
    return visible


# ----------------------------------------------------------------------------------------------
# Validation (before any kernel launches)


HALF_DTYPES = (torch.bfloat16, torch.float16)
ALL_DTYPES = HALF_DTYPES + (torch.float32, torch.float64)


def _check_shapes(q, r, k, v, cu_seqlens, window, scale, *, allow_cpu, dtypes, head_dims, names=("k", "v")):
    """Raise ValueError naming the offending argument (k and v are called `names` in messages).
    dtypes: the supported dtypes; head_dims: the supported head dims (None: any)."""
    k_name, v_name = names
    for name, x in (("q", q), ("r", r), (k_name, k), (v_name, v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (B, T, H, D), got shape {tuple(x.shape)}")
    if q.dtype not in dtypes:
        raise ValueError(f"q has dtype {q.dtype}; supported: {', '.join(map(str, dtypes))}")
    for name, x in (("r", r), (k_name, k), (v_name, v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}; all four must match")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if r.shape != q.shape:
        raise ValueError(f"r must have q's shape {tuple(q.shape)}, got {tuple(r.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{v_name} must have {k_name}'s shape {tuple(k.shape)}, got {tuple(v.shape)}")
    B, Tq, Hq, D = q.shape
    Bk, Tk, Hkv, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"{k_name} has shape {tuple(k.shape)}, incompatible with q {tuple(q.shape)} "
                         "(batch and head dim must match)")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q has {Hq} heads, not a multiple of {k_name}'s {Hkv} heads")
    if Tq > Tk:
        raise ValueError(f"q has {Tq} positions but {k_name} has only {Tk}; need Tq <= Tk")
    if Tq == 0:
        raise ValueError("q has zero positions")
    if head_dims is not None and D not in head_dims:
        raise ValueError(f"head dim {D} is not supported; supported: {head_dims}")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"window must be a positive int (visible keys incl. the diagonal), got {window!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, B, Tq, Tk, q.device)
    if not allow_cpu and q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"q is on {q.device}: the Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1); use parallax_reference on the CPU")


def _check_cu_seqlens(cu_seqlens, B, Tq, Tk, device):
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        raise ValueError("cu_seqlens must be an int32 tensor of N + 1 document offsets")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if B != 1 or Tq != Tk:
        raise ValueError(f"packed documents need B = 1 and Tq == Tk, got B={B}, Tq={Tq}, Tk={Tk}")
    if torch.compiler.is_compiling():
        return  # value checks need a host sync; a compiled model checks its inputs once, eagerly
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != Tq:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={Tq}, got {offsets[0]}..{offsets[-1]}")
    if any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError("cu_seqlens must be strictly increasing (no empty documents)")


# ----------------------------------------------------------------------------------------------
# Triton kernels
#
# One program owns a block of BLOCK_M query rows of one head (forward, dQ/dR) or a block of BLOCK_N
# keys of one KV head (dK/dV). Documents are handled as a mask over the packed sequence: query row i
# sees key j when lo_i <= j <= pos_i, where lo_i = max(start of i's document, pos_i - window + 1).
# Both bounds grow with i, so a block's key range is [lo of its first row, pos of its last row].
#
# The backward needs, per query row, b_i = g_i . o1_i with o1 = softmax attention's output. o1 is not
# saved (only O(T) state is), so the dQ kernel first sweeps the keys once to accumulate
# b_i = sum_j p_ij (g_i . v_j), then sweeps again for dQ and dR, and stores b and c_i = g_i . o_i for
# the dK/dV kernel.

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634


# Tile shapes (BLOCK_M, BLOCK_N, warps, pipeline stages) per kernel: the fastest of 8 or 9 candidates each,
# timed kernel by kernel on an H100 at D=128 (dense and packed-document workloads agreed within 1%). Fixed
# rather than autotuned, so a new shape costs only compilation. The interpreter runs one small tile so the
# CPU tests exercise multi-block paths quickly.
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
def _query_block(n_heads, group, Tq, Tk, window, DOC_START, stride_qb, stride_qt, stride_qh, stride_kb, stride_kh,
                 D: tl.constexpr, VARLEN: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's query rows: offsets, validity, key bounds, the q and K/V row offsets, and the
    offsets of its per-row statistics."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    pos, lo = _row_bounds(offs_m, Tq, Tk, window, DOC_START, VARLEN, WINDOWED)
    q_off = b * stride_qb + offs_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    kv_base = b * stride_kb + (h // group) * stride_kh + offs_d[None, :]
    return offs_m, offs_m < Tq, pos, lo, q_off, kv_base, pid_bh * Tq + offs_m


@triton.jit
def _load_rows(X, offsets, rows, n_rows):
    return tl.load(X + offsets, mask=(rows < n_rows)[:, None], other=0.0)


@triton.jit
def _fwd_tile(q, r, K, V, kv_base, stride_kt, start_n, Tk, pos, lo, scale_log2, m_i, d1, d2, o1, o2,
              BLOCK_N: tl.constexpr):
    kpos = start_n + tl.arange(0, BLOCK_N)
    kv_off = kv_base + kpos[:, None] * stride_kt
    k = _load_rows(K, kv_off, kpos, Tk)
    v = _load_rows(V, kv_off, kpos, Tk)
    s = tl.dot(q, tl.trans(k)) * scale_log2
    u = tl.dot(r, tl.trans(k))
    # u stays finite (masked loads are 0), so p * u = 0 where p = 0
    s = tl.where((kpos[None, :] <= pos[:, None]) & (kpos[None, :] >= lo[:, None]), s, float("-inf"))
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
def _fwd_kernel(Q, R, K, V, O, LSE, TMEAN, DOC_START,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                Tq, Tk, n_heads, group, window, scale_log2,
                D: tl.constexpr, VARLEN: tl.constexpr, WINDOWED: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m, row_ok, pos, lo, q_off, kv_base, stat_off = _query_block(
        n_heads, group, Tq, Tk, window, DOC_START, stride_qb, stride_qt, stride_qh, stride_kb, stride_kh,
        D, VARLEN, WINDOWED, BLOCK_M)
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    r = tl.load(R + q_off, mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite, so fully masked tiles give alpha = 1
    d1 = tl.zeros([BLOCK_M], tl.float32)
    d2 = tl.zeros([BLOCK_M], tl.float32)
    o1 = tl.zeros([BLOCK_M, D], tl.float32)
    o2 = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(tl.min(lo, axis=0) // BLOCK_N * BLOCK_N, tl.max(pos, axis=0) + 1, BLOCK_N):
        m_i, d1, d2, o1, o2 = _fwd_tile(q, r, K, V, kv_base, stride_kt, start_n, Tk, pos, lo, scale_log2,
                                        m_i, d1, d2, o1, o2, BLOCK_N)

    t = d2 / d1
    o = (o1 * (1.0 + t)[:, None] - o2) / d1[:, None]
    tl.store(O + q_off, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + stat_off, m_i + tl.log2(d1), mask=row_ok)
    tl.store(TMEAN + stat_off, t, mask=row_ok)


@triton.jit
def _bwd_probs(q, k, kpos, pos, lo, lse, scale_log2):
    """Recomputed softmax probabilities of a (query rows, keys) tile."""
    p = tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None])
    return tl.where((kpos[None, :] <= pos[:, None]) & (kpos[None, :] >= lo[:, None]), p, 0.0)


@triton.jit
def _bdot_tile(q, g, K, V, kv_base, stride_kt, start_n, Tk, pos, lo, lse, scale_log2, bdot,
               BLOCK_N: tl.constexpr):
    kpos = start_n + tl.arange(0, BLOCK_N)
    kv_off = kv_base + kpos[:, None] * stride_kt
    k = _load_rows(K, kv_off, kpos, Tk)
    v = _load_rows(V, kv_off, kpos, Tk)
    p = _bwd_probs(q, k, kpos, pos, lo, lse, scale_log2)
    return bdot + tl.sum(p * tl.dot(g, tl.trans(v)), axis=1)


@triton.jit
def _dqdr_tile(q, r, g, K, V, kv_base, stride_kt, start_n, Tk, pos, lo, lse, t, bdot, c, scale_log2, dq, dr,
               BLOCK_N: tl.constexpr):
    kpos = start_n + tl.arange(0, BLOCK_N)
    kv_off = kv_base + kpos[:, None] * stride_kt
    k = _load_rows(K, kv_off, kpos, Tk)
    v = _load_rows(V, kv_off, kpos, Tk)
    p = _bwd_probs(q, k, kpos, pos, lo, lse, scale_log2)
    u = tl.dot(r, tl.trans(k))
    a = tl.dot(g, tl.trans(v))
    delta = a - bdot[:, None]
    ds = p * (a - c[:, None] + (t[:, None] - u) * delta)
    dq += tl.dot(ds.to(k.dtype), k)
    dr += tl.dot((-p * delta).to(k.dtype), k)
    return dq, dr


@triton.jit
def _bwd_dq_kernel(Q, R, K, V, O, G, LSE, TMEAN, DOC_START, DQ, DR, BDOT, CDOT,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   Tq, Tk, n_heads, group, window, scale_log2, scale,
                   D: tl.constexpr, VARLEN: tl.constexpr, WINDOWED: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m, row_ok, pos, lo, q_off, kv_base, stat_off = _query_block(
        n_heads, group, Tq, Tk, window, DOC_START, stride_qb, stride_qt, stride_qh, stride_kb, stride_kh,
        D, VARLEN, WINDOWED, BLOCK_M)
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    r = tl.load(R + q_off, mask=row_ok[:, None], other=0.0)
    g = tl.load(G + q_off, mask=row_ok[:, None], other=0.0)
    o = tl.load(O + q_off, mask=row_ok[:, None], other=0.0)
    c = tl.sum(g.to(tl.float32) * o.to(tl.float32), axis=1)
    lse = tl.load(LSE + stat_off, mask=row_ok, other=0.0)
    t = tl.load(TMEAN + stat_off, mask=row_ok, other=0.0)
    k_start, k_end = tl.min(lo, axis=0) // BLOCK_N * BLOCK_N, tl.max(pos, axis=0) + 1

    # Sweep 1: b_i = g_i . o1_i = sum_j p_ij a_ij.
    bdot = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(k_start, k_end, BLOCK_N):
        bdot = _bdot_tile(q, g, K, V, kv_base, stride_kt, start_n, Tk, pos, lo, lse, scale_log2, bdot, BLOCK_N)

    # Sweep 2: dL/ds = p [a - c + (t - u)(a - b)], dL/du = -p (a - b).
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    dr = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(k_start, k_end, BLOCK_N):
        dq, dr = _dqdr_tile(q, r, g, K, V, kv_base, stride_kt, start_n, Tk, pos, lo, lse, t, bdot, c, scale_log2,
                            dq, dr, BLOCK_N)

    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
    tl.store(DR + q_off, dr.to(DR.dtype.element_ty), mask=row_ok[:, None])
    tl.store(BDOT + stat_off, bdot, mask=row_ok)
    tl.store(CDOT + stat_off, c, mask=row_ok)


@triton.jit
def _dkdv_tile(k, v, kpos, Q, R, G, LSE, TMEAN, BDOT, CDOT, DOC_START, q_base, stat_base, stride_qt,
               start_m, Tq, Tk, window, scale_log2, scale, dk, dv,
               VARLEN: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = start_m + tl.arange(0, BLOCK_M)
    q_off = q_base + rows[:, None] * stride_qt
    q = _load_rows(Q, q_off, rows, Tq)
    r = _load_rows(R, q_off, rows, Tq)
    g = _load_rows(G, q_off, rows, Tq)
    row_ok = rows < Tq
    lse = tl.load(LSE + stat_base + rows, mask=row_ok, other=0.0)
    t = tl.load(TMEAN + stat_base + rows, mask=row_ok, other=0.0)
    bdot = tl.load(BDOT + stat_base + rows, mask=row_ok, other=0.0)
    c = tl.load(CDOT + stat_base + rows, mask=row_ok, other=0.0)

    pos, lo = _row_bounds(rows, Tq, Tk, window, DOC_START, VARLEN, WINDOWED)
    visible = (kpos[:, None] <= pos[None, :]) & (kpos[:, None] >= lo[None, :]) & row_ok[None, :]
    p_t = tl.where(visible, tl.exp2(tl.dot(k, tl.trans(q)) * scale_log2 - lse[None, :]), 0.0)
    u_t = tl.dot(k, tl.trans(r))
    a_t = tl.dot(v, tl.trans(g))
    delta_t = a_t - bdot[None, :]
    dv += tl.dot((p_t * (1.0 + t[None, :] - u_t)).to(g.dtype), g)
    ds_t = p_t * (a_t - c[None, :] + (t[None, :] - u_t) * delta_t)
    dk += tl.dot((ds_t * scale).to(q.dtype), q) + tl.dot((-p_t * delta_t).to(r.dtype), r)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, R, K, V, G, LSE, TMEAN, BDOT, CDOT, DOC_START, DOC_END, DK, DV,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
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

    # The queries that see some key of this block end where the last key's document (or window) ends.
    last_key = tl.minimum(first_key + BLOCK_N - 1, Tk - 1)
    last_seen = Tk
    if VARLEN:
        last_seen = tl.load(DOC_END + last_key)
    if WINDOWED:
        last_seen = tl.minimum(last_seen, last_key + window)
    shift = Tk - Tq
    m_start = tl.maximum(first_key - shift, 0) // BLOCK_M * BLOCK_M

    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for h in range(hk * group, hk * group + group):
        q_base = b * stride_qb + h * stride_qh + offs_d[None, :]
        stat_base = (b * n_heads + h) * Tq
        for start_m in range(m_start, last_seen - shift, BLOCK_M):
            dk, dv = _dkdv_tile(k, v, kpos, Q, R, G, LSE, TMEAN, BDOT, CDOT, DOC_START, q_base, stat_base, stride_qt,
                                start_m, Tq, Tk, window, scale_log2, scale, dk, dv, VARLEN, WINDOWED, BLOCK_M)

    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


def _launch_args(q, k, window):
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    return dict(stride_qb=q.stride(0), stride_qt=q.stride(1), stride_qh=q.stride(2),
                stride_kb=k.stride(0), stride_kt=k.stride(1), stride_kh=k.stride(2),
                Tq=Tq, Tk=Tk, n_heads=Hq, group=Hq // Hkv, window=max(window, 1),
                D=D, WINDOWED=window > 0)


def _forward(q, r, k, v, doc_start, window, scale):
    B, Tq, Hq, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32)
    t = torch.empty_like(lse)
    tile = _tile("fwd")
    _fwd_kernel[(triton.cdiv(Tq, tile["BLOCK_M"]), B * Hq)](
        q, r, k, v, o, lse, t, doc_start if doc_start is not None else lse,
        scale_log2=scale * LOG2E, VARLEN=doc_start is not None, **_launch_args(q, k, window), **tile)
    return o, lse, t


def _backward(g, q, r, k, v, o, lse, t, doc_start, doc_end, window, scale):
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    dq, dr = torch.empty_like(q), torch.empty_like(r)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    bdot, cdot = torch.empty_like(lse), torch.empty_like(lse)
    varlen = doc_start is not None
    common = dict(scale_log2=scale * LOG2E, scale=scale, VARLEN=varlen, **_launch_args(q, k, window))
    tile = _tile("dq")
    _bwd_dq_kernel[(triton.cdiv(Tq, tile["BLOCK_M"]), B * Hq)](
        q, r, k, v, o, g, lse, t, doc_start if varlen else lse, dq, dr, bdot, cdot, **common, **tile)
    tile = _tile("dkdv")
    _bwd_dkdv_kernel[(triton.cdiv(Tk, tile["BLOCK_N"]), B * Hkv)](
        q, r, k, v, g, lse, t, bdot, cdot, doc_start if varlen else lse, doc_end if varlen else lse,
        dk, dv, n_kv_heads=Hkv, **common, **tile)
    return dq, dr, dk, dv


# ----------------------------------------------------------------------------------------------
# torch custom ops: opaque to torch.compile (no graph break), with autograd


@torch.library.custom_op("parallax::forward", mutates_args=())
def _forward_op(q: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                doc_start: torch.Tensor | None, doc_end: torch.Tensor | None, window: int, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, r, k, v = (x.contiguous() for x in (q, r, k, v))  # the kernels share q's strides for r, g, o
    return _forward(q, r, k, v, doc_start, window, scale)


@_forward_op.register_fake
def _(q, r, k, v, doc_start, doc_end, window, scale):
    stats = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.custom_op("parallax::backward", mutates_args=())
def _backward_op(g: torch.Tensor, q: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 o: torch.Tensor, lse: torch.Tensor, t: torch.Tensor, doc_start: torch.Tensor | None,
                 doc_end: torch.Tensor | None, window: int, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g, q, r, k, v = (x.contiguous() for x in (g, q, r, k, v))
    return _backward(g, q, r, k, v, o, lse, t, doc_start, doc_end, window, scale)


@_backward_op.register_fake
def _(g, q, r, k, v, o, lse, t, doc_start, doc_end, window, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, r, k, v))


def _setup_context(ctx, inputs, output):
    q, r, k, v, doc_start, doc_end, window, scale = inputs
    o, lse, t = output
    ctx.mark_non_differentiable(lse, t)
    ctx.save_for_backward(q, r, k, v, o, lse, t, doc_start, doc_end)
    ctx.window, ctx.scale = window, scale


def _backward_rule(ctx, grad_o, grad_lse, grad_t):
    q, r, k, v, o, lse, t, doc_start, doc_end = ctx.saved_tensors
    dq, dr, dk, dv = _backward_op(grad_o, q, r, k, v, o, lse, t, doc_start, doc_end, ctx.window, ctx.scale)
    return dq, dr, dk, dv, None, None, None, None


_forward_op.register_autograd(_backward_rule, setup_context=_setup_context)


def _document_bounds(cu_seqlens, T):
    """Per position, the offsets where its document starts and ends (int32, length T each)."""
    pos = torch.arange(T, device=cu_seqlens.device, dtype=torch.int32)
    doc = torch.searchsorted(cu_seqlens, pos, right=True) - 1
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
    Returns q's dtype and shape. Saved for backward beyond the inputs and output: O(B * Hq * Tq).
    """
    _check_shapes(q, r, k, v, cu_seqlens, window, scale, allow_cpu=False, dtypes=HALF_DTYPES,
                  head_dims=SUPPORTED_HEAD_DIMS)
    if max_seqlen is not None and not (isinstance(max_seqlen, int) and max_seqlen >= 1):
        raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    doc_start, doc_end = (None, None) if cu_seqlens is None else _document_bounds(cu_seqlens, q.shape[1])
    o, _, _ = _forward_op(q, r, k, v, doc_start, doc_end, window or 0, scale)
    return o


# ----------------------------------------------------------------------------------------------
# Decode lives in a sibling file; import it on first use so that file can import this one.


def __getattr__(name):
    if name in ("parallax_decode", "parallax_decode_reference", "decode_backend"):
        import parallax_decode
        return getattr(parallax_decode, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# Benchmark: python parallax_kernels.py bench [--peers] | bench decode


def fineweb_like_doc_lens(total, seed=0, mean=762, lo=16, hi=4096):
    """Log-normal document lengths clipped to [lo, hi], summing exactly to total."""
    gen = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        x = math.exp(math.log(mean) - 0.5 + torch.randn(1, generator=gen).item())
        lens.append(int(min(max(x, lo), hi)))
    lens[-1] -= sum(lens) - total
    return [n for n in lens if n > 0]


def _median_ms(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def _fwd_and_fwdbwd(attn, inputs):
    """Median ms of the forward alone and of forward + backward (gradients of all inputs)."""
    with torch.no_grad():
        fwd = _median_ms(lambda: attn(*inputs))
    out = attn(*inputs)
    grad = torch.randn_like(out)
    both = _median_ms(lambda: torch.autograd.grad(attn(*inputs), inputs, grad))
    return fwd, both


def _first_call_s(attn, inputs):
    torch.cuda.synchronize()
    start = __import__("time").perf_counter()
    out = attn(*inputs)
    torch.autograd.grad(out, inputs, torch.ones_like(out))
    torch.cuda.synchronize()
    return __import__("time").perf_counter() - start


def _peer_functions():
    """The public Parallax kernels, when installed: name -> (dense fn, varlen fn) in our layout."""
    peers = {}
    try:
        import parallax as pk
        from parallax.triton import parallax_varlen_func
        dense = lambda q, r, k, v, window=None: pk.parallax_func(  # noqa: E731  (B, H, L, D) API
            *(x.transpose(1, 2) for x in (q, r, k, v)), window_size_left=(window or 0) - 1).transpose(1, 2)
        varlen = lambda q, r, k, v, cu, window=None: parallax_varlen_func(  # noqa: E731
            q, r, k, v, window_size_left=(window or 0) - 1, cu_seqlens=cu)
        peers["parallax-kernel 0.1.1"] = (dense, varlen)
    except ImportError:
        pass
    try:
        from fla.ops.parallax import parallel_parallax
        peers["fla 0.6.0"] = (lambda q, r, k, v, window=None: parallel_parallax(q, r, k, v, window_size=window),
                              lambda q, r, k, v, cu, window=None: parallel_parallax(
                                  q, r, k, v, window_size=window, cu_seqlens=cu.long()))
    except ImportError:
        pass
    return peers


def bench_training(with_peers=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    import torch.nn.functional as F

    device, dtype, D, H = "cuda", torch.bfloat16, 128, 6
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"bf16, D={D}, H={H}; medians in ms", flush=True)
    rows = []  # (workload, implementation, fwd ms, fwd+bwd ms)
    peers = _peer_functions() if with_peers else {}

    def rand(B, T):
        return [torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(4)]

    # (a) dense causal B=16, T=2048
    q, r, k, v = rand(16, 2048)
    first = _first_call_s(parallax_attn, (q, r, k, v))
    print(f"first call (compile) dense: {first:.1f} s", flush=True)
    dense = "dense causal B=16 T=2048"
    rows.append((dense, "parallax (ours)", *_fwd_and_fwdbwd(parallax_attn, (q, r, k, v))))
    for name, backend in (("softmax cuDNN (SDPA)", SDPBackend.CUDNN_ATTENTION),
                          ("softmax FA2 (SDPA)", SDPBackend.FLASH_ATTENTION)):
        def sdpa(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True).transpose(1, 2)
        rows.append((dense, name, *_fwd_and_fwdbwd(sdpa, (q, k, v))))
    for name, (peer_dense, _) in peers.items():
        print(f"first call {name} dense: {_first_call_s(peer_dense, (q, r, k, v)):.1f} s", flush=True)
        rows.append((dense, name, *_fwd_and_fwdbwd(peer_dense, (q, r, k, v))))
    del q, r, k, v

    # (b) packed documents B=1, T=65536, with and without a 1024-token window
    T = 65536
    lens = fineweb_like_doc_lens(T)
    cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
    doc = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))
    q, r, k, v = rand(1, T)
    first = _first_call_s(lambda *x: parallax_attn(*x, cu_seqlens=cu), (q, r, k, v))
    print(f"first call (compile) documents: {first:.1f} s; {len(lens)} documents, "
          f"mean length {T / len(lens):.0f}", flush=True)
    flex = torch.compile(flex_attention, dynamic=False)
    for window in (None, 1024):
        work = f"documents T=65536{'' if window is None else ' window 1024'}"
        # Compiled, like FlexAttention and as train_gpt.py runs it: the eager call's cu_seqlens value
        # check synchronizes with the host, which a compiled graph skips.
        packed = torch.compile(lambda *x, window=window: parallax_attn(*x, cu_seqlens=cu, window=window),
                               dynamic=False)
        rows.append((work, "parallax (ours)", *_fwd_and_fwdbwd(packed, (q, r, k, v))))

        def mask_mod(b, h, i, j, window=window):
            keep = (doc[i] == doc[j]) & (j <= i)
            return keep if window is None else keep & (i - j < window)
        block_mask = create_block_mask(mask_mod, None, None, T, T, device=device)
        rows.append((work, "softmax FlexAttention", *_fwd_and_fwdbwd(
            lambda q, k, v: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 block_mask=block_mask).transpose(1, 2), (q, k, v))))
        for name, (_, peer_varlen) in peers.items():
            rows.append((work, name, *_fwd_and_fwdbwd(lambda *x: peer_varlen(*x, cu, window), (q, r, k, v))))

    # Each workload's ratio is against its first softmax row: cuDNN (dense) or FlexAttention (documents).
    baseline = {}
    for work, name, _, both in rows:
        if name.startswith("softmax"):
            baseline.setdefault(work, both)
    print(f"\n{'workload':<32} {'implementation':<24} {'fwd':>8} {'fwd+bwd':>8} {'x softmax':>9}")
    for work, name, fwd, both in rows:
        print(f"{work:<32} {name:<24} {fwd:8.3f} {both:8.3f} {both / baseline[work]:9.2f}")


def main(argv):
    if not argv or argv[0] != "bench":
        print("usage: python parallax_kernels.py bench [--peers] | bench decode")
        return 2
    if not torch.cuda.is_available():
        print("the benchmark needs a CUDA GPU")
        return 1
    if argv[1:2] == ["decode"]:
        import parallax_decode
        parallax_decode.bench_decode()
    else:
        bench_training(with_peers="--peers" in argv)
    return 0


if __name__ == "__main__":
    import parallax_kernels  # run as the importable module, so the custom ops register only once
    sys.exit(parallax_kernels.main(sys.argv[1:]))
