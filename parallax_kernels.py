"""Parallax attention, the one front door: training attention, decode, their input checks and the
reference, and the attention the model calls over packed documents (packed_attention: Parallax, or
softmax through FlexAttention or SDPA with the same visibility). Callers import from here; the
implementations below import nothing above them:

    parallax_kernels.py        this file: re-exports, and packed_attention with its masks
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
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from parallax_attn_triton import parallax_attn
from parallax_decode import check_decode_inputs, decode_backend, parallax_decode, parallax_decode_triton
from parallax_reference import (ALL_DTYPES, HALF_DTYPES, SUPPORTED_HEAD_DIMS, check_cu_seqlens, check_shapes,
                                document_ids, parallax_decode_reference, parallax_reference, visible)

__all__ = [
    "parallax_attn", "parallax_decode", "parallax_decode_triton", "decode_backend",
    "parallax_reference", "parallax_decode_reference", "document_ids", "visible",
    "check_shapes", "check_cu_seqlens", "check_decode_inputs",
    "SUPPORTED_HEAD_DIMS", "HALF_DTYPES", "ALL_DTYPES",
    "packed_attention", "flex_block_mask", "dense_visibility", "FLEX_BLOCK",
]


# ----------------------------------------------------------------------------------------------
# Attention over packed documents

FLEX_BLOCK = 128  # FlexAttention's block size; training sequences are multiples of it


def dense_visibility(doc_ids: Tensor, window: int) -> Tensor:
    """(T, T) bool: which key each query sees (visible)."""
    i = torch.arange(doc_ids.numel(), device=doc_ids.device)
    return visible(i[:, None], i[None, :], window, doc_ids)


def flex_block_mask(doc_ids: Tensor, window: int) -> BlockMask:
    """The same visibility as a FlexAttention BlockMask, built from (T/128)^2 block summaries: block pairs
    where every (query, key) pair is visible are 'full' (no mask evaluated), the rest that see anything
    are 'partial'."""
    n = doc_ids.numel() // FLEX_BLOCK
    blocks = torch.arange(n, device=doc_ids.device)
    offset = (blocks[:, None] - blocks[None, :]) * FLEX_BLOCK  # query block start - key block start
    first_doc = doc_ids.view(n, FLEX_BLOCK)[:, 0]
    last_doc = doc_ids.view(n, FLEX_BLOCK)[:, -1]
    q_first, q_last, k_first, k_last = first_doc[:, None], last_doc[:, None], first_doc[None, :], last_doc[None, :]
    # query - key ranges over offset +- (FLEX_BLOCK - 1) within a block pair
    some_visible = (offset >= 0) & (offset - (FLEX_BLOCK - 1) < window) & (q_first <= k_last) & (k_first <= q_last)
    all_visible = (offset > 0) & (offset + FLEX_BLOCK - 1 < window) & (q_first == q_last) & (q_last == k_first) \
        & (k_first == k_last)

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(q_idx, kv_idx, window, doc_ids)

    return BlockMask.from_kv_blocks(*_block_lists(some_visible & ~all_visible), *_block_lists(all_visible),
                                    BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod)


def _block_lists(mask: Tensor):
    """(n, n) bool block map -> per query block the count and the indices of its key blocks, listed first
    in increasing order, the other blocks after them. Ranks by cumulative sums and a scatter, not a sort:
    inductor's Triton sort took minutes to compile at n = 128 (16K-token sequences)."""
    counts = mask.sum(-1, dtype=torch.int32)
    listed_before = mask.cumsum(-1, dtype=torch.int32) - 1
    unlisted_before = counts[:, None] + (~mask).cumsum(-1, dtype=torch.int32) - 1
    slots = torch.where(mask, listed_before, unlisted_before).long()
    blocks = torch.arange(mask.shape[-1], device=mask.device, dtype=torch.int32).expand_as(slots)
    indices = torch.empty_like(blocks).scatter_(-1, slots, blocks)
    return counts[None, None].contiguous(), indices[None, None].contiguous()


def packed_attention(parallax: bool, cu_seqlens: Tensor, T: int, windows: list, scale: float, use_flex: bool,
                     doc_ids: Tensor | None = None):
    """attend(layer, q, r, k, v) -> (1, T, H, D) for documents packed with cu_seqlens (B = 1).

    Parallax: the Triton kernel on CUDA, the fp32 reference on the CPU. Softmax:
    FlexAttention with the document + window block mask when use_flex (CUDA, compiled), else SDPA
    with a dense (T, T) boolean mask (eager runs; T^2 bytes per window size). windows[layer] is the
    number of visible keys, the diagonal included. doc_ids (document_ids of cu_seqlens) may be given:
    a compiled graph needs it as an input, since inductor cannot lower a mask_mod that reads a
    tensor computed inside the graph."""
    if parallax:
        if cu_seqlens.is_cuda:
            def attend(layer, q, r, k, v):
                return parallax_attn(q, r, k, v, cu_seqlens=cu_seqlens, window=windows[layer], scale=scale)
        else:
            def attend(layer, q, r, k, v):
                return parallax_reference(q, r, k, v, cu_seqlens=cu_seqlens, window=windows[layer],
                                          scale=scale).type_as(q)
        return attend

    if doc_ids is None:
        doc_ids = document_ids(cu_seqlens, T)
    if use_flex:
        block_masks = {w: flex_block_mask(doc_ids, w) for w in set(windows)}

        def attend(layer, q, r, k, v):
            y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               block_mask=block_masks[windows[layer]], scale=scale)
            return y.transpose(1, 2)
    else:
        dense_masks = {w: dense_visibility(doc_ids, w) for w in set(windows)}

        def attend(layer, q, r, k, v):
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=dense_masks[windows[layer]], scale=scale)
            return y.transpose(1, 2)
    return attend
