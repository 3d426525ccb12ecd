"""Parallax attention, the one front door: training attention, decode, their input checks and the
reference. Callers import from here; the implementations below import nothing above them:

    parallax_kernels.py        this file: re-exports only
    ├── parallax_attn_triton.py    parallax_attn: Triton forward/backward behind a torch custom op
    ├── parallax_decode.py         parallax_decode, decode_backend: dispatch and the Triton decode
    │   └── parallax_decode_cute.py    the CuTe DSL decode kernel for Hopper (imported on first use)
    └── parallax_reference.py      the reference, the visibility rule, document ids, input checks

    parallax_attn(q, r, k, v, *, cu_seqlens=None, max_seqlen=None, window=None, scale=None)
    parallax_decode(q, r, k_cache, v_cache, cache_seqlens, *, window=None, scale=None, out=None)

Layout is heads-last: q, r (B, T, Hq, D); k, v (B, T, Hkv, D). `window` counts the visible keys
including the diagonal (FlashAttention's `window_size=(left, 0)` is window = left + 1). The math and
its conventions are stated in parallax_reference.py.
"""
from parallax_attn_triton import parallax_attn
from parallax_decode import check_decode_inputs, decode_backend, parallax_decode, parallax_decode_triton
from parallax_reference import (ALL_DTYPES, HALF_DTYPES, SUPPORTED_HEAD_DIMS, check_cu_seqlens, check_shapes,
                                document_ids, parallax_decode_reference, parallax_reference, visible)

__all__ = [
    "parallax_attn", "parallax_decode", "parallax_decode_triton", "decode_backend",
    "parallax_reference", "parallax_decode_reference", "document_ids", "visible",
    "check_shapes", "check_cu_seqlens", "check_decode_inputs",
    "SUPPORTED_HEAD_DIMS", "HALF_DTYPES", "ALL_DTYPES",
]
