"""Parallax attention stated once: the reference, the visibility rule, the input checks, and the
pieces every kernel module shares. The bottom of the attention modules: it imports none of them.

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

The kernels keep online-softmax sums per row, m = max s, d1 = sum e^(s-m), d2 = sum e^(s-m) u,
O1 = sum e^(s-m) v, O2 = sum e^(s-m) u v, and finish with o = (O1/d1)(1 + d2/d1) - O2/d1, which is
the reference's sum above (t = d2/d1). Triton's form of that combine is `parallax_output` below,
shared by the training and decode kernels; the CuTe DSL kernel carries its own (`_finalize`). The
tests hold every copy to `parallax_reference`.
"""
import math
import os

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (64, 128)
HALF_DTYPES = (torch.bfloat16, torch.float16)
ALL_DTYPES = HALF_DTYPES + (torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# Documents and visibility


def document_ids(cu_seqlens, T):
    """Per position of a packed sequence of length T, the index of its document."""
    positions = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, positions, right=True) - 1


def visible(query_pos, key_pos, window=None, doc_ids=None):
    """The visibility rule, elementwise over broadcasting position tensors: a query sees a key at or
    before it, fewer than `window` positions back, in its own document (doc_ids: per position)."""
    seen = key_pos <= query_pos
    if window is not None:
        seen = seen & (query_pos - key_pos < window)
    if doc_ids is not None:
        seen = seen & (doc_ids[query_pos] == doc_ids[key_pos])
    return seen


# ----------------------------------------------------------------------------------------------
# Reference


def parallax_reference(q, r, k, v, *, cu_seqlens=None, window=None, scale=None):
    """Plain-PyTorch Parallax attention, the ground truth for every test.

    Computes in float32 (float64 when given float64) and returns that dtype. Causal and
    end-aligned: with Tq queries and Tk >= Tq keys, query i sees keys j <= Tk - Tq + i.
    """
    check_shapes(q, r, k, v, cu_seqlens, window, scale, allow_cpu=True, dtypes=ALL_DTYPES, head_dims=None)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, r, k, v = (x.to(dtype) for x in (q, r, k, v))
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    group = Hq // Hkv
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)

    query_pos = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
    key_pos = torch.arange(Tk, device=q.device)[None, :]
    doc_ids = None if cu_seqlens is None else document_ids(cu_seqlens, Tk)
    seen = visible(query_pos, key_pos, window, doc_ids)  # (Tq, Tk)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    u = torch.einsum("bihd,bjhd->bhij", r, k)
    p = torch.softmax(s.masked_fill(~seen, float("-inf")), dim=-1)
    u = u.masked_fill(~seen, 0.0)  # p = 0 there; keep u finite so 0 * u stays 0
    t = (p * u).sum(-1, keepdim=True)
    weights = p * (1 + t - u)
    return torch.einsum("bhij,bjhd->bihd", weights, v)


def parallax_decode_reference(q, r, k_cache, v_cache, cache_seqlens, window=None, scale=None):
    """parallax_reference row by row over each row's valid keys (any device; reads the lengths on the host)."""
    rows = []
    for b, length in enumerate(cache_seqlens.tolist()):
        rows.append(parallax_reference(q[b:b + 1], r[b:b + 1], k_cache[b:b + 1, :length],
                                       v_cache[b:b + 1, :length], window=window, scale=scale))
    return torch.cat(rows).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Validation (before any kernel launches)


def check_shapes(q, r, k, v, cu_seqlens, window, scale, *, allow_cpu, dtypes, head_dims, names=("k", "v")):
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
        check_cu_seqlens(cu_seqlens, B, Tq, Tk, q.device)
    if not allow_cpu and q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"q is on {q.device}: the Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1); use parallax_reference on the CPU")


def check_cu_seqlens(cu_seqlens, B, Tq, Tk, device):
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
# Shared by the kernel modules


@triton.jit
def parallax_output(o1, o2, d1, d2):
    """Triton's combine of a block of rows' sums: o = (O1/d1)(1 + d2/d1) - O2/d1; a row without
    visible keys (d1 = 0) gives 0."""
    inv = 1.0 / tl.where(d1 > 0, d1, float("inf"))
    return o1 * (inv * (1.0 + d2 * inv))[:, None] - o2 * inv[:, None]


def num_sms(device):
    """The device's streaming multiprocessors (4 stand in for a CPU under the Triton interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def choose_num_splits(ctas, rows, tile_rows, device, max_splits=None):
    """KV splits for `ctas` decode units whose caches hold `rows` rows: about one CTA per SM, no more
    splits than tiles of `tile_rows` (nor than max_splits); a function of the shape class only,
    never of the lengths, so one compiled kernel or captured graph serves every length."""
    splits = min(num_sms(device) // ctas, -(-rows // tile_rows))
    return max(1, splits if max_splits is None else min(splits, max_splits))
