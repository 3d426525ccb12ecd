"""Parallax decode: one new query per sequence attending over a KV cache.

    parallax_decode(q, r, k_cache, v_cache, cache_seqlens, *, window=None, scale=None, out=None)

q, r (B, 1, Hq, D); k_cache, v_cache (B, Lmax, Hkv, D); cache_seqlens int32 (B,): row b attends to
its first cache_seqlens[b] cached keys (with a window, only to the last `window` of them; the new
token's own key must already be in the cache). Returns (B, 1, Hq, D) in q's dtype.

Backends, chosen per device by `decode_backend(device)`:
- "cute": the CuTe DSL kernel for Hopper (parallax_decode_cute.py), on SM90 GPUs;
- "triton": a split-KV Triton kernel plus a combine kernel, on other CUDA GPUs or when the CuTe
  DSL is missing or broken (a one-line warning says so, once);
- "reference": parallax_reference row by row, on the CPU.

Both kernels keep, per query head, the online-softmax state m, d1 = sum e^(s-m),
d2 = sum e^(s-m) u, O1 = sum e^(s-m) v, O2 = sum e^(s-m) u v (s = scale q.k, u = r.k) and finish
with o = (O1/d1)(1 + d2/d1) - O2/d1; KV splits combine by rescaling all four with e^(m_split - m).
Below parallax_kernels.py (the front door); imports only parallax_reference.py, and the CuTe DSL
kernel on first use.
"""
import math
import warnings

import torch
import triton
import triton.language as tl

from parallax_reference import (HALF_DTYPES, SUPPORTED_HEAD_DIMS, check_shapes, choose_num_splits,
                                parallax_decode_reference, parallax_output)


# ----------------------------------------------------------------------------------------------
# Public API


def parallax_decode(q, r, k_cache, v_cache, cache_seqlens, *, window=None, scale=None, out=None):
    """Parallax attention of one query per row over a KV cache; see the module docstring.

    Raises ValueError before any launch for bad dtypes, shapes, devices, window or scale, a head
    ratio the backend cannot run, or cache_seqlens outside [1, Lmax]. Checking the values of
    cache_seqlens needs a host sync, so it is skipped while a CUDA graph is being captured
    (a captured step can then be replayed with new lengths without any sync).

    The kernels compile on the first call per (dtype, head dim, head ratio; for the CuTe DSL
    kernel also the split count, warpgroups and KV head pairing, which follow from B, Hq, Hkv
    and Lmax): make one call before capturing a graph.
    """
    backend = decode_backend(q.device) if isinstance(q, torch.Tensor) else "reference"
    check_decode_inputs(q, r, k_cache, v_cache, cache_seqlens, window, scale, out, backend)
    if backend == "reference":
        result = parallax_decode_reference(q, r, k_cache, v_cache, cache_seqlens, window, scale)
        return result if out is None else out.copy_(result)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, r = q.contiguous(), r.contiguous()
    target = out if out is not None and out.is_contiguous() else torch.empty_like(q)
    if backend == "cute":
        try:
            _cute_kernel(q.device).parallax_decode_cute(
                q, r, k_cache, v_cache, cache_seqlens, window, scale, target)
        except Exception as error:  # a broken CuTe DSL install shows up at the first compile
            if torch.cuda.is_current_stream_capturing():
                raise
            _disable_cute(q.device, f"the CuTe DSL decode kernel failed ({type(error).__name__}: "
                                    f"{str(error).splitlines()[0] if str(error) else ''})")
            backend = "triton"
    if backend == "triton":
        _decode_triton(q, r, k_cache, v_cache, cache_seqlens, window, scale, target)
    if out is not None and target is not out:
        out.copy_(target)
    return target if out is None else out


def decode_backend(device):
    """Which implementation parallax_decode uses on `device`: "cute", "triton" or "reference"."""
    device = torch.device(device)
    if device.type != "cuda":
        return "reference"
    return "cute" if _cute_kernel(device) is not None else "triton"


def parallax_decode_triton(q, r, k_cache, v_cache, cache_seqlens, *, window=None, scale=None,
                           out=None, num_splits=None):
    """The Triton decode path on its own (any integer head ratio). Runs on CUDA tensors, or on CPU
    tensors under TRITON_INTERPRET=1 (fp16/fp32 there: the interpreter misreads bf16 loads).
    num_splits overrides the KV split count (tests use it to exercise the combine)."""
    check_decode_inputs(q, r, k_cache, v_cache, cache_seqlens, window, scale, out, "triton")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, r = q.contiguous(), r.contiguous()
    target = out if out is not None and out.is_contiguous() else torch.empty_like(q)
    _decode_triton(q, r, k_cache, v_cache, cache_seqlens, window, scale, target, num_splits)
    if out is not None and target is not out:
        out.copy_(target)
    return target if out is None else out


# ----------------------------------------------------------------------------------------------
# Backend selection: the CuTe DSL kernel on SM90 when it imports and compiles


_cute_by_device = {}  # device index -> parallax_decode_cute module, or None once ruled out


def _cute_kernel(device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _cute_by_device:
        major, minor = torch.cuda.get_device_capability(index)
        if major != 9:
            _cute_by_device[index] = None
            warnings.warn(f"parallax_decode: the CuTe DSL kernel targets SM90 (Hopper); cuda:{index} "
                          f"is sm_{major}{minor}, using the Triton decode kernel", stacklevel=3)
        else:
            try:
                import parallax_decode_cute
                _cute_by_device[index] = parallax_decode_cute
            except Exception as error:  # not installed, or installed but broken
                _cute_by_device[index] = None
                warnings.warn(f"parallax_decode: CuTe DSL unavailable ({type(error).__name__}: "
                              f"{error}); using the Triton decode kernel", stacklevel=3)
    return _cute_by_device[index]


def _disable_cute(device, reason):
    index = device.index if device.index is not None else torch.cuda.current_device()
    _cute_by_device[index] = None
    warnings.warn(f"parallax_decode: {reason}; using the Triton decode kernel", stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Validation


def check_decode_inputs(q, r, k_cache, v_cache, cache_seqlens, window, scale, out, backend):
    """Raise ValueError naming the offending argument."""
    if not isinstance(cache_seqlens, torch.Tensor):
        raise ValueError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[1] != 1:
        raise ValueError(f"q must have shape (B, 1, Hq, D) (one query per row), got {tuple(q.shape)}")
    on_cpu = isinstance(q, torch.Tensor) and q.device.type == "cpu"
    check_shapes(q, r, k_cache, v_cache, None, window, scale, allow_cpu=True,
                 dtypes=HALF_DTYPES + ((torch.float32,) if on_cpu else ()), head_dims=SUPPORTED_HEAD_DIMS,
                 names=("k_cache", "v_cache"))
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    B, _, Hq, D = q.shape
    Lmax, Hkv = k_cache.shape[1:3]
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in the head dim, got strides {x.stride()}")
    if backend == "cute":
        _cute_kernel(q.device).check_inputs(q, k_cache, v_cache)
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must be an int32 tensor of shape ({B},), got "
                         f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != q.shape
                            or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}")
    capturing = q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not capturing and not torch.compiler.is_compiling():
        lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
        if lo < 1 or hi > Lmax:
            raise ValueError(f"cache_seqlens must lie in [1, {Lmax}] (k_cache's length), got {lo}..{hi}")


# ----------------------------------------------------------------------------------------------
# Triton: split-KV decode + combine


@triton.jit
def _dot_hi_lo(x, v):
    """x @ v with fp32 x fed as a 16-bit hi part plus its remainder: the output formula cancels
    large terms, and one rounding of x costs ~1% relative error."""
    hi = x.to(v.dtype)
    lo = (x - hi.to(tl.float32)).to(v.dtype)
    return tl.dot(hi, v) + tl.dot(lo, v)


@triton.jit
def _decode_split_kernel(Q, R, K, V, Lens, Out, WsO, WsStat,
                         stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
                         Lmax, kv_heads, window, scale_log2, num_splits,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                         BLOCK_N: tl.constexpr, WRITE_PARTIAL: tl.constexpr):
    split = tl.program_id(0)
    pair = tl.program_id(1)  # batch row * kv_heads + kv head
    b = pair // kv_heads
    h = pair % kv_heads
    hi = tl.minimum(tl.load(Lens + b), Lmax)
    lo = tl.maximum(hi - window, 0)
    first_tile = lo // BLOCK_N
    num_tiles = tl.maximum(tl.cdiv(hi, BLOCK_N) - first_tile, 0)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_begin = first_tile + split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, first_tile + num_tiles)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    q_offsets = (b * kv_heads * GROUP + h * GROUP + g)[:, None] * D + d[None, :]
    q = tl.load(Q + q_offsets, mask=(g < GROUP)[:, None], other=0.0)
    r = tl.load(R + q_offsets, mask=(g < GROUP)[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    d1 = tl.zeros([BLOCK_G], tl.float32)
    d2 = tl.zeros([BLOCK_G], tl.float32)
    o1 = tl.zeros([BLOCK_G, D], tl.float32)
    o2 = tl.zeros([BLOCK_G, D], tl.float32)
    for tile in range(tile_begin, tile_end):
        keys = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        visible = (keys >= lo) & (keys < hi)
        # keys outside [lo, hi) load as zeros: garbage past the cache length never enters the MMAs
        k = tl.load(k_base + keys[:, None] * stride_kl + d[None, :], mask=visible[:, None], other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vl + d[None, :], mask=visible[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        u = tl.dot(r, tl.trans(k))
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        pu = p * u
        d1 = d1 * alpha + tl.sum(p, 1)
        d2 = d2 * alpha + tl.sum(pu, 1)
        o1 = o1 * alpha[:, None] + _dot_hi_lo(p, v)
        o2 = o2 * alpha[:, None] + _dot_hi_lo(pu, v)
        m = m_new

    if WRITE_PARTIAL:
        row = pair * num_splits + split
        tl.store(WsStat + (row * 3 + 0) * BLOCK_G + g, m)
        tl.store(WsStat + (row * 3 + 1) * BLOCK_G + g, d1)
        tl.store(WsStat + (row * 3 + 2) * BLOCK_G + g, d2)
        o_offsets = g[:, None] * D + d[None, :]
        tl.store(WsO + (row * 2 + 0) * BLOCK_G * D + o_offsets, o1)
        tl.store(WsO + (row * 2 + 1) * BLOCK_G * D + o_offsets, o2)
    else:
        o = parallax_output(o1, o2, d1, d2)
        tl.store(Out + q_offsets, o.to(Out.dtype.element_ty), mask=(g < GROUP)[:, None])


@triton.jit
def _decode_combine_kernel(Out, WsO, WsStat, kv_heads, num_splits,
                           GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr):
    pair = tl.program_id(0)
    b = pair // kv_heads
    h = pair % kv_heads
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for split in range(num_splits):
        m = tl.maximum(m, tl.load(WsStat + ((pair * num_splits + split) * 3) * BLOCK_G + g))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    d1 = tl.zeros([BLOCK_G], tl.float32)
    d2 = tl.zeros([BLOCK_G], tl.float32)
    o1 = tl.zeros([BLOCK_G, D], tl.float32)
    o2 = tl.zeros([BLOCK_G, D], tl.float32)
    o_offsets = g[:, None] * D + d[None, :]
    for split in range(num_splits):
        row = pair * num_splits + split
        weight = tl.exp2(tl.load(WsStat + (row * 3 + 0) * BLOCK_G + g) - m_safe)
        d1 += weight * tl.load(WsStat + (row * 3 + 1) * BLOCK_G + g)
        d2 += weight * tl.load(WsStat + (row * 3 + 2) * BLOCK_G + g)
        o1 += weight[:, None] * tl.load(WsO + (row * 2 + 0) * BLOCK_G * D + o_offsets)
        o2 += weight[:, None] * tl.load(WsO + (row * 2 + 1) * BLOCK_G * D + o_offsets)
    o = parallax_output(o1, o2, d1, d2)
    q_offsets = (b * kv_heads * GROUP + h * GROUP + g)[:, None] * D + d[None, :]
    tl.store(Out + q_offsets, o.to(Out.dtype.element_ty), mask=(g < GROUP)[:, None])


TRITON_BLOCK_N = 64


def _decode_triton(q, r, k_cache, v_cache, cache_seqlens, window, scale, out, num_splits=None):
    B, _, Hq, D = q.shape
    Lmax, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot needs 16 rows
    splits = num_splits or choose_num_splits(B * Hkv, Lmax, TRITON_BLOCK_N, q.device)
    ws_o = ws_stat = out
    if splits > 1:
        ws_o = torch.empty(B * Hkv * splits * 2 * block_g * D, dtype=torch.float32, device=q.device)
        ws_stat = torch.empty(B * Hkv * splits * 3 * block_g, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(splits, B * Hkv)](
        q, r, k_cache, v_cache, cache_seqlens, out, ws_o, ws_stat,
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        Lmax, Hkv, min(window or Lmax, Lmax), scale * math.log2(math.e), splits,
        GROUP=group, BLOCK_G=block_g, D=D, BLOCK_N=TRITON_BLOCK_N, WRITE_PARTIAL=splits > 1,
        num_warps=4, num_stages=3)
    if splits > 1:
        _decode_combine_kernel[(B * Hkv,)](out, ws_o, ws_stat, Hkv, splits,
                                           GROUP=group, BLOCK_G=block_g, D=D, num_warps=4)
    return out
