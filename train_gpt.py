"""The Parallax speedrun: a GPT-2-small-scale model with Parallax attention, trained on FineWeb with Muon.

    ./run.sh                                        # every GPU of this node, through torchrun
    SMOKE=1 python train_gpt.py                     # tiny CPU check (on the shards TRAIN_FILES names)
    python train_gpt.py sample --checkpoint checkpoints/<run-id>/state_step001385.pt --prompt "The"
    python train_gpt.py bench-sample                # decode tokens/s of the speedrun-size model

The architecture is the FlexAttention era of modded-nanoGPT (records of January 2025): RMS norms
without gains, half-truncated rotary embeddings, QK-norm, ReLU^2 MLP, value embeddings on the first
and last layers, U-net skip connections, an untied zero-initialized LM head with tanh logit
soft-capping, bf16 activations, attention over packed documents with sliding windows that grow over
training. Parallax adds one projection r shaped like q (own RMS norm, q's rotary) per layer;
`attention = "softmax"` swaps only the attention for FlexAttention (same masks).

Hyperparameters live in the dataclass below. Every field can be overridden by an environment variable
of its upper-case name; the ones meant for it: TRAIN_FILES, VAL_FILES (glob patterns), NUM_ITERATIONS,
SEED, ATTENTION (parallax|softmax), PARAM_MATCHED (0|1), OPTIMIZER (muon|adamw), RUN_NAME, VAL_TOKENS,
VAL_EVERY (0: only at the start and the end), SAVE_EVERY, RESUME (a checkpoint), OVERWRITE (0|1). A variable
one typo away from a field's name is an error. SMOKE=1 first switches to a tiny CPU configuration (2
layers of width 64, reference attention, 30 steps of 512 tokens; gloo when run under torchrun).

Batch: the global batch is `micro_batches` sequences of `seq_len` tokens (8 x 64K by default, the
records' 8-GPU configuration). Each of W ranks (W divides micro_batches) runs micro_batches / W
micro-batches per step and accumulates gradients, so 1, 2, 4 or 8 GPUs train the same tokens in the
same order.

Each run writes logs/<run-id>.txt (the hyperparameters as JSON, the code of train_gpt.py,
parallax_kernels.py and muon.py, versions and GPU, then `step:N/T val_loss:X train_time:Yms
step_avg:Zms` and `step:N/T train_loss:X ...` lines, closing with peak memory, or with a `stopped:`
line) and checkpoints/<run-id>/state_step<N>.pt at the end (and every SAVE_EVERY steps when > 0). A
run name that already has a log or checkpoints is refused unless OVERWRITE=1. The run stops (exit 1)
when a validation loss is not finite, or, after the first tenth of the steps, no better than the
untrained model's at step 0. SIGINT or SIGTERM checkpoints the current step and stops (exit 128 + the
signal); every checkpoint holds the optimizer states, and RESUME=<checkpoint> continues its run to the
same losses.
"""
import argparse
import codecs
import glob
import itertools
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from importlib import metadata
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import parallax_kernels

# ----------------------------------------------------------------------------------------------
# Hyperparameters


@dataclass
class Hyperparameters:
    run_name: str = ""  # names logs/<run-id>.txt, checkpoints/<run-id>/; default <attention>-<hex>, or RESUME's run
    seed: int = 0  # model initialization (the data order is fixed)
    # data: modded-nanoGPT shards (see load_shard)
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    val_tokens: int = 10_485_760  # fixed for comparable val losses; a multiple of world_size * seq_len
    seq_len: int = 64 * 1024  # tokens per micro-batch (one rank's packed documents), a multiple of 128
    micro_batches: int = 8  # micro-batches per step: global batch 8 x 64K tokens, split over the ranks
    max_doc_len: int = 0  # split longer documents into attention segments of this length (0: no cap)
    # model
    attention: str = "parallax"  # "parallax" or "softmax"
    param_matched: bool = False  # parallax only: shrink the MLP hidden by hdim/2 to pay for r (3072 -> 2688)
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 128
    num_layers: int = 12
    model_dim: int = 768
    num_heads: int = 6
    head_dim: int = 128
    num_value_embeds: int = 3  # value embeddings shared by the first and the last layers
    logit_cap: float = 15.0  # logits = cap * tanh(logits / cap)
    attn_scale: float = 0.12  # multiplies q.k (r.k is not scaled); the records' value for QK-normed heads
    window_schedule: tuple = (384, 896, 1408, 1792)  # long window per quarter of training; short = long // 2
    # optimization
    optimizer: str = "muon"  # "muon": hidden matrices under Muon; "adamw": under AdamW at adamw_lr
    num_iterations: int = 1385
    lr_warmup_steps: int = 0
    cooldown_frac: float = 0.4  # learning rates decay linearly over this last fraction of training
    final_lr_frac: float = 0.1  # ... down to this fraction of their initial value
    muon_lr: float = 0.05
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85  # warmed up linearly to muon_momentum over the first steps
    muon_momentum_warmup_steps: int = 300
    embed_lr: float = 0.6
    head_lr: float = 0.008
    scalar_lr: float = 0.04
    adamw_lr: float = 0.0018  # hidden matrices when optimizer == "adamw" (llm.c's GPT-2 124M rate)
    weight_decay: float = 0.0
    # evaluation, checkpoints, implementation
    val_every: int = 125  # validate every this many steps, at step 0 and at the end (0: only at 0 and the end)
    save_every: int = 0  # also checkpoint every this many steps (0: only at the end)
    resume: str = ""  # a checkpoint to continue from (model, optimizer states, step, data position)
    overwrite: bool = False  # replace the log and checkpoints of a run of the same name (else it is refused)
    compile: bool = True  # torch.compile the model on CUDA
    smoke: bool = False  # the tiny CPU configuration below


SMOKE_CONFIG = dict(
    smoke=True, num_layers=2, model_dim=64, num_heads=1, head_dim=64, num_value_embeds=1, seq_len=256,
    micro_batches=2, num_iterations=30, val_tokens=2048, val_every=10, window_schedule=(128, 256),
    compile=False,
)


def hyperparameters_from_env(environ) -> Hyperparameters:
    """The defaults, then SMOKE=1's configuration, then one override per upper-case field name set."""
    check_for_misspelled_settings(environ)
    hp = Hyperparameters()
    if "SMOKE" in environ and _parse_env("SMOKE", environ["SMOKE"], False):
        hp = replace(hp, **SMOKE_CONFIG)
    overrides = {}
    for field in fields(hp):
        name = field.name.upper()
        if name in environ and name != "SMOKE":
            overrides[field.name] = _parse_env(name, environ[name], getattr(hp, field.name))
    return replace(hp, **overrides)


def check_for_misspelled_settings(environ):
    """A setting whose name is one typo away from a field's is an error, not silently ignored; other
    variables (PATH, HOME, ...) are not within one edit of any field name."""
    names = [field.name.upper() for field in fields(Hyperparameters)]
    for variable in sorted(environ):
        if variable in names or not variable.isupper():
            continue
        near = [name for name in names if one_edit_apart(variable, name)]
        if near:
            raise ValueError(f"unknown setting {variable}={environ[variable]!r}; did you mean {near[0]}?")


def one_edit_apart(a: str, b: str) -> bool:
    """True when a and b differ by one inserted, deleted or replaced character, or two swapped neighbours."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    if len(a) < len(b):
        return a[i:] == b[i + 1:]
    return a[i + 1:] == b[i + 1:] or (a[i:i + 2] == b[i:i + 2][::-1] and a[i + 2:] == b[i + 2:])


def _parse_env(name, text, default):
    try:
        if isinstance(default, bool):
            choices = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
            return choices[text.strip().lower()]
        if isinstance(default, tuple):
            return tuple(int(part) for part in text.split(","))
        return type(default)(text)
    except (KeyError, ValueError):
        kind = "0 or 1" if isinstance(default, bool) else "comma-separated ints" if isinstance(default, tuple) \
            else type(default).__name__
        raise ValueError(f"environment variable {name}={text!r}: expected {kind}") from None


def check_hyperparameters(hp: Hyperparameters, world_size: int):
    if hp.attention not in ("parallax", "softmax"):
        raise ValueError(f"attention must be 'parallax' or 'softmax', got {hp.attention!r}")
    if hp.optimizer not in ("muon", "adamw"):
        raise ValueError(f"optimizer must be 'muon' or 'adamw', got {hp.optimizer!r}")
    if hp.micro_batches % world_size:
        raise ValueError(f"world size {world_size} must divide micro_batches={hp.micro_batches} "
                         "(the global batch is the same at every world size)")
    if hp.seq_len <= 0 or hp.seq_len % FLEX_BLOCK:
        raise ValueError(f"seq_len must be a positive multiple of {FLEX_BLOCK}, got {hp.seq_len}")
    if hp.val_tokens <= 0 or hp.val_tokens % (world_size * hp.seq_len):
        raise ValueError(f"val_tokens={hp.val_tokens} must be a positive multiple of world_size * seq_len "
                         f"= {world_size} * {hp.seq_len}")
    if not hp.window_schedule or any(w < 1 for w in hp.window_schedule):
        raise ValueError(f"window_schedule must hold positive window sizes, got {hp.window_schedule}")
    if hp.num_layers < 2 or hp.num_layers % 2:
        raise ValueError(f"num_layers must be even (U-net halves), got {hp.num_layers}")
    if 2 * hp.num_value_embeds > hp.num_layers:
        raise ValueError(f"num_value_embeds={hp.num_value_embeds} needs at least {2 * hp.num_value_embeds} layers")
    if hp.num_iterations < 1:
        raise ValueError(f"num_iterations must be at least 1, got {hp.num_iterations}")


# ----------------------------------------------------------------------------------------------
# Data: shards and the distributed loader

BOS = 50256  # GPT-2's <|endoftext|>: every document starts with it
GPT2_VOCAB = 50257
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_BYTES = 256 * 4
DATA_HINT = ("fetch FineWeb with `python data/cached_fineweb10B.py`, or point TRAIN_FILES / VAL_FILES "
             "at your shards")


def read_shard_header(path) -> int:
    """Check a shard's header against its size; return its token count (ValueError naming the problem).
    data/cached_fineweb10B.py's read_header checks the same format for the data scripts: this file keeps
    its own copy so that it, and the code its logs carry, stand alone."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such shard; {DATA_HINT}") from None
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=3)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: wrong version {header[1]} (expected {SHARD_VERSION})")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size < expected:
        raise ValueError(f"{path}: truncated: {size} bytes, but the header announces {num_tokens} tokens "
                         f"({expected} bytes)")
    if size > expected:
        raise ValueError(f"{path}: {size - expected} trailing bytes after the {num_tokens} tokens its header "
                         "announces")
    return num_tokens


def load_shard(path, pin_memory=False, vocab_size: int | None = None) -> Tensor:
    """The uint16 tokens of one shard (256 int32 of header: magic, version, token count; then tokens);
    with vocab_size, every token id must be below it (an embedding lookup would fail mid-run)."""
    num_tokens = read_shard_header(path)
    tokens = torch.empty(num_tokens, dtype=torch.uint16, pin_memory=pin_memory)
    target = memoryview(tokens.numpy()).cast("B")  # read straight into the (pinned) tensor
    with open(path, "rb", buffering=0) as f:
        f.seek(HEADER_BYTES)
        done = 0
        while done < len(target):
            count = f.readinto(target[done:])
            if not count:
                raise ValueError(f"{path}: truncated while reading (got {done} of {len(target)} bytes)")
            done += count
    if vocab_size is not None:
        check_token_ids(path, tokens, vocab_size)
    return tokens


def check_token_ids(path, tokens: Tensor, vocab_size: int):
    largest = int(tokens.numpy().max()) if tokens.numel() else 0
    if largest >= vocab_size:
        raise ValueError(f"{path}: token id {largest} is outside the vocabulary ({vocab_size} ids): not GPT-2 "
                         "tokens; re-tokenize the text with data/tokenize_text.py, or set VOCAB_SIZE above it")


def shard_files(pattern: str) -> list:
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no shards match {pattern!r}; {DATA_HINT}")
    folders = [f for f in files if os.path.isdir(f)]
    if folders:
        raise ValueError(f"{pattern!r} matches the folder {folders[0]}, not only shard files; make the pattern "
                         "name the .bin files (e.g. end it in *.bin)")
    return files


class TokenStream:
    """The tokens of a list of shards read in order as one stream; the next shard loads in the background."""

    def __init__(self, files, pin_memory=False, vocab_size: int | None = None):
        self._files = deque(files)
        self._pin_memory = pin_memory
        self._vocab_size = vocab_size
        self._loader = ThreadPoolExecutor(max_workers=1)
        self._pending = None
        self._chunks = deque()  # loaded shards, the first one read from self._pos on
        self._pos = 0
        self._request_next_shard()

    def _request_next_shard(self):
        self._pending = (self._loader.submit(load_shard, self._files.popleft(), self._pin_memory, self._vocab_size)
                         if self._files else None)

    def read(self, n) -> Tensor | None:
        """The next n tokens without consuming them (a view unless they span two shards); None at the end."""
        while sum(len(c) for c in self._chunks) - self._pos < n:
            if self._pending is None:
                return None
            self._chunks.append(self._pending.result())
            self._request_next_shard()
        pieces, start = [], self._pos
        for chunk in self._chunks:
            pieces.append(chunk[start:start + n - sum(len(p) for p in pieces)])
            start = 0
            if sum(len(p) for p in pieces) == n:
                break
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def advance(self, n):
        self._pos += n
        while self._chunks and self._pos >= len(self._chunks[0]):
            self._pos -= len(self._chunks.popleft())


class Batch(NamedTuple):
    inputs: Tensor  # (seq_len,) int32 tokens of packed documents
    targets: Tensor  # (seq_len,) int64: the stream shifted by one
    cu_seqlens: Tensor  # (segments + 1,) int32 segment boundaries: 0, every BOS, max_doc_len splits, seq_len


def document_boundaries(inputs: Tensor, max_doc_len: int = 0) -> Tensor:
    """cu_seqlens for packed documents: a boundary at every BOS, and at 0 (a document cut at the start
    of the batch is a segment of its own); with max_doc_len, longer segments are split into pieces."""
    T = inputs.numel()
    starts = (inputs == BOS).nonzero().flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    if max_doc_len:
        lengths = torch.diff(starts, append=starts.new_tensor([T]))
        pieces = (lengths + max_doc_len - 1) // max_doc_len
        first_piece = torch.cumsum(pieces, 0) - pieces
        piece_index = torch.arange(int(pieces.sum())) - torch.repeat_interleave(first_piece, pieces)
        starts = torch.repeat_interleave(starts, pieces) + piece_index * max_doc_len
    return torch.cat([starts, starts.new_tensor([T])]).to(torch.int32)


def distributed_data_generator(pattern: str, seq_len: int, rank: int, world_size: int, *, max_doc_len: int = 0,
                               device="cpu", vocab_size: int | None = None):
    """Yield this rank's micro-batches: each call consumes world_size * seq_len tokens of the stream, of
    which rank r takes [r * seq_len, (r + 1) * seq_len), so ranks never share a token. Targets are the
    stream shifted by one, across documents too: the last target of a document is the next one's BOS
    (as the speedrun does; the model learns where documents end). Deterministic: no shuffling. Stops
    when the shards run out. With vocab_size, each shard's token ids are checked as it loads."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    device = torch.device(device)
    stream = TokenStream(shard_files(pattern), pin_memory=device.type == "cuda", vocab_size=vocab_size)
    step_tokens = world_size * seq_len
    while (window := stream.read(step_tokens + 1)) is not None:
        local = window[rank * seq_len:(rank + 1) * seq_len + 1].to(torch.int32)
        inputs = local[:-1]
        cu_seqlens = document_boundaries(inputs, max_doc_len)
        stream.advance(step_tokens)
        yield Batch(inputs.to(device, non_blocking=True), local[1:].to(device, torch.int64, non_blocking=True),
                    cu_seqlens.to(device, non_blocking=True))


def validation_batches(pattern: str, val_tokens: int, seq_len: int, rank: int, world_size: int, *, device="cpu",
                       vocab_size: int | None = None):
    """This rank's share of the first val_tokens tokens (a multiple of world_size * seq_len)."""
    if val_tokens % (world_size * seq_len):
        raise ValueError(f"val_tokens={val_tokens} is not a multiple of world_size * seq_len = "
                         f"{world_size} * {seq_len}")
    batches = distributed_data_generator(pattern, seq_len, rank, world_size, device=device, vocab_size=vocab_size)
    return itertools.islice(batches, val_tokens // (world_size * seq_len))


def check_enough_tokens(pattern: str, needed: int, what: str):
    available = sum(read_shard_header(f) for f in shard_files(pattern))
    if available < needed:
        raise ValueError(f"{pattern}: {available:,} tokens, but {what} needs {needed:,}")


# ----------------------------------------------------------------------------------------------
# Attention over packed documents

FLEX_BLOCK = 128  # FlexAttention's block size; training sequences are multiples of it


def document_ids(cu_seqlens: Tensor, T: int) -> Tensor:
    positions = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, positions, right=True) - 1


def dense_visibility(doc_ids: Tensor, window: int) -> Tensor:
    """(T, T) bool: query i sees key j when j <= i, i - j < window and both are in one document."""
    i = torch.arange(doc_ids.numel(), device=doc_ids.device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < window) & (doc_ids[:, None] == doc_ids[None, :])


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

    def visible(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window) & (doc_ids[q_idx] == doc_ids[kv_idx])

    return BlockMask.from_kv_blocks(*_block_lists(some_visible & ~all_visible), *_block_lists(all_visible),
                                    BLOCK_SIZE=FLEX_BLOCK, mask_mod=visible)


def _block_lists(mask: Tensor):
    """(n, n) bool block map -> per query block the count and the indices (listed first) of its key blocks."""
    counts = mask.sum(-1, dtype=torch.int32)
    indices = torch.argsort(mask.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None].contiguous(), indices[None, None].contiguous()


def packed_attention(parallax: bool, cu_seqlens: Tensor, T: int, windows: list, scale: float, use_flex: bool,
                     doc_ids: Tensor | None = None):
    """attend(layer, q, r, k, v) -> (1, T, H, D) for documents packed with cu_seqlens (B = 1).

    Parallax: the Triton kernel on CUDA, the fp32 reference on the CPU. Softmax (r is None):
    FlexAttention with the document + window block mask when use_flex (CUDA, compiled), else SDPA
    with a dense (T, T) boolean mask (eager runs; T^2 bytes per window size). windows[layer] is the
    number of visible keys, the diagonal included. doc_ids (document_ids of cu_seqlens) may be given:
    a compiled graph needs it as an input, since inductor cannot lower a mask_mod that reads a
    tensor computed inside the graph."""
    if parallax:
        if cu_seqlens.is_cuda:
            def attend(layer, q, r, k, v):
                return parallax_kernels.parallax_attn(q, r, k, v, cu_seqlens=cu_seqlens, window=windows[layer],
                                                      scale=scale)
        else:
            def attend(layer, q, r, k, v):
                return parallax_kernels.parallax_reference(q, r, k, v, cu_seqlens=cu_seqlens, window=windows[layer],
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


# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class GPTConfig:
    vocab_size: int
    num_layers: int
    model_dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    attention: str
    num_value_embeds: int
    logit_cap: float
    attn_scale: float
    final_window: int  # the long window at the end of training, used when sampling


def model_config(hp: Hyperparameters) -> GPTConfig:
    mlp_hidden = 4 * hp.model_dim
    if hp.attention == "parallax" and hp.param_matched:
        mlp_hidden -= hp.num_heads * hp.head_dim // 2  # 2 * dim * (hdim / 2) = r's dim * hdim weights
    return GPTConfig(hp.vocab_size, hp.num_layers, hp.model_dim, hp.num_heads, hp.head_dim, mlp_hidden,
                     hp.attention, hp.num_value_embeds, hp.logit_cap, hp.attn_scale, hp.window_schedule[-1])


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Bias-free linear layer; its weight (fp32 for the optimizer) is cast to the input's dtype."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        if zero_init:
            with torch.no_grad():
                self.weight.zero_()

    def reset_parameters(self):
        bound = 3**0.5 * 0.5 * self.in_features**-0.5  # uniform with std 0.5 / sqrt(fan_in)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x):
        return F.linear(x, self.weight.type_as(x))


def rotary_tables(positions: Tensor, head_dim: int):
    """cos, sin for half-truncated rotary embeddings: a quarter of the dimension pairs rotate at
    frequencies from 1 down to 1/1024 per position, the other quarter do not rotate."""
    freqs = (1 / 1024) ** torch.linspace(0, 1, head_dim // 4, device=positions.device)
    freqs = torch.cat([freqs, freqs.new_zeros(head_dim // 4)])
    theta = positions.float()[..., None] * freqs
    return theta.cos()[..., None, :], theta.sin()[..., None, :]  # (..., T, 1, head_dim / 2)


def apply_rotary(x: Tensor, rope) -> Tensor:
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        hdim = config.num_heads * config.head_dim
        self.q = CastedLinear(config.model_dim, hdim)
        self.k = CastedLinear(config.model_dim, hdim)
        self.v = CastedLinear(config.model_dim, hdim)
        self.r = CastedLinear(config.model_dim, hdim) if config.attention == "parallax" else None
        self.c_proj = CastedLinear(hdim, config.model_dim, zero_init=True)
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # mix of v and the value embedding

    def forward(self, x: Tensor, ve: Tensor | None, rope, attend) -> Tensor:
        B, T, _ = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = apply_rotary(norm(self.q(x).view(shape)), rope)
        k = apply_rotary(norm(self.k(x).view(shape)), rope)
        r = apply_rotary(norm(self.r(x).view(shape)), rope) if self.r is not None else None
        v = self.lambdas[0] * self.v(x).view(shape)
        if ve is not None:
            v = v + self.lambdas[1] * ve.view(shape)
        y = attend(self.layer_idx, q, r, k, v)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = CastedLinear(config.model_dim, config.mlp_hidden)
        self.c_proj = CastedLinear(config.mlp_hidden, config.model_dim, zero_init=True)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # mix of the residual stream and x0

    def forward(self, x, x0, ve, rope, attend):
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        x = x + self.attn(norm(x), ve, rope, attend)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        hdim = config.num_heads * config.head_dim
        self.embed = nn.Embedding(config.vocab_size, config.model_dim)
        self.value_embeds = nn.ModuleList(nn.Embedding(config.vocab_size, hdim) for _ in range(config.num_value_embeds))
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.skip_weights = nn.Parameter(torch.ones(config.num_layers // 2))  # U-net: encoder i -> decoder L-1-i
        self.lm_head = CastedLinear(config.model_dim, config.vocab_size, zero_init=True)
        self.set_window(config.final_window)

    def embeddings_to(self, dtype: torch.dtype) -> "GPT":
        """Activations in dtype from the embeddings on; the linear weights stay fp32 for the optimizers."""
        self.embed.to(dtype)
        self.value_embeds.to(dtype)
        return self

    def set_window(self, long_window: int):
        """Per-layer windows, a Python int each (torch.compile specializes on them): long on every 4th layer
        counted from the outside in (records: L S S S L S | S L S S S L), half as long elsewhere."""
        L = self.config.num_layers
        short_window = max(1, long_window // 2)
        self.layer_windows = [long_window if min(i, L - 1 - i) % 4 == 0 else short_window for i in range(L)]

    def hidden_states(self, tokens: Tensor, positions: Tensor, attend) -> Tensor:
        """The trunk: tokens (B, T) at positions (T,) or (B, T) -> final-normed states (B, T, model_dim)."""
        rope = rotary_tables(positions, self.config.head_dim)
        x = x0 = norm(self.embed(tokens))
        ve = [embed(tokens) for embed in self.value_embeds]
        layer_ve = ve + [None] * (self.config.num_layers - 2 * len(ve)) + ve
        half = self.config.num_layers // 2
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= half:
                x = x + self.skip_weights[i - half] * skips.pop()
            x = block(x, x0, layer_ve[i], rope, attend)
            if i < half:
                skips.append(x)
        return norm(x)

    def logits(self, x: Tensor) -> Tensor:
        logits = self.lm_head(x).float()
        return self.config.logit_cap * torch.tanh(logits / self.config.logit_cap)

    def forward(self, input_seq: Tensor, target_seq: Tensor | None = None, *, cu_seqlens: Tensor,
                doc_ids: Tensor | None = None):
        """Packed documents input_seq (T,) with boundaries cu_seqlens -> mean cross-entropy against
        target_seq, or the (T, vocab) logits when no targets are given. doc_ids: document_ids(cu_seqlens,
        T), which a compiled softmax model needs as an input (see packed_attention)."""
        T = input_seq.numel()
        positions = torch.arange(T, device=input_seq.device)
        # FlexAttention only when compiled: eager flex materializes every (T, T) score matrix.
        use_flex = input_seq.is_cuda and T % FLEX_BLOCK == 0 and torch.compiler.is_compiling()
        attend = packed_attention(self.config.attention == "parallax", cu_seqlens, T, self.layer_windows,
                                  self.config.attn_scale, use_flex=use_flex, doc_ids=doc_ids)
        logits = self.logits(self.hidden_states(input_seq[None], positions, attend)[0])
        if target_seq is None:
            return logits
        return F.cross_entropy(logits, target_seq)


# ----------------------------------------------------------------------------------------------
# Checkpoints

CHECKPOINT_KIND = "train_gpt.py checkpoint 1"


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: str, model: GPT, hp: Hyperparameters, step: int, training_state: dict | None = None):
    """Atomically (temporary file, then rename): plain tensors and dicts, loadable with weights_only=True.
    training_state (optimizer states and the like, see _train) makes it resumable. Temporary files that
    an interrupted write left in the folder are removed first."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(folder), "*.tmp")):
        os.remove(stale)
    payload = dict(kind=CHECKPOINT_KIND, step=step, hyperparameters=asdict(hp), model_config=asdict(model.config),
                   model={name: t.detach().cpu() for name, t in model.state_dict().items()}, **(training_state or {}))
    temporary = f"{path}.tmp"
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_checkpoint(path: str) -> tuple:
    """(GPT on the CPU, the checkpoint dict); CheckpointError with one line on any problem."""
    if path.endswith(".tmp"):
        raise CheckpointError(f"{path}: an unfinished checkpoint write, not a checkpoint; use a state_step<N>.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a checkpoint torch can load ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path}: not a train_gpt.py checkpoint: {describe_payload(payload)}")
    try:
        model = GPT(GPTConfig(**payload["model_config"]))
    except TypeError as err:
        raise CheckpointError(f"{path}: its model config does not fit this train_gpt.py's GPTConfig ({err})") from None
    if mismatch := state_dict_mismatch(model, payload["model"]):
        raise CheckpointError(f"{path}: does not match this train_gpt.py's model: {mismatch}")
    model.load_state_dict(payload["model"])
    return model, payload


RESUME_MAY_CHANGE = {"run_name", "resume", "overwrite", "val_every", "save_every", "compile"}


def load_resume_checkpoint(hp: Hyperparameters, world_size: int) -> dict:
    """The checkpoint RESUME names, checked before anything is written: resumable (optimizer states in
    it), written by as many ranks, and trained with these hyperparameters (all but RESUME_MAY_CHANGE)."""
    _, payload = load_checkpoint(hp.resume)
    if "optimizers" not in payload:
        raise CheckpointError(f"{hp.resume}: holds no optimizer states (an older train_gpt.py wrote it); it can be "
                              "sampled from, not resumed")
    if len(payload["optimizers"]) != world_size:
        raise CheckpointError(f"{hp.resume}: written by {len(payload['optimizers'])} rank(s); resume it on as many "
                              f"(Muon's momentum is split over the ranks), not {world_size}")
    saved = payload["hyperparameters"]
    differences = [f"{name.upper()}={saved.get(name)!r} there, {value!r} here" for name, value in asdict(hp).items()
                   if name not in RESUME_MAY_CHANGE and json.dumps(saved.get(name)) != json.dumps(value)]
    if differences:
        raise CheckpointError(f"{hp.resume}: trained with other settings ({first_few(differences)}); set them as "
                              "they were to resume")
    return payload


def cpu_copy(tree):
    """Tensors of a nested optimizer state dict moved to the CPU (gather_object and torch.save take them there)."""
    if isinstance(tree, Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {key: cpu_copy(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cpu_copy(value) for value in tree)
    return tree


def gather_optimizer_states(optimizers: list, muon, rank: int, world_size: int) -> list | None:
    """Collective. On rank 0, per rank, the state dict of each optimizer (None on the other ranks).
    Muon's momentum is split over the ranks (see muon.py), so every rank's Muon state is kept; the
    other optimizers hold the same state on every rank and are kept from rank 0 only (None elsewhere)."""
    local = [cpu_copy(optimizer.state_dict()) if optimizer is muon or rank == 0 else None for optimizer in optimizers]
    if world_size == 1:
        return [local]
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(local, gathered, dst=0)
    return gathered


def restore_optimizers(optimizers: list, muon, states: list, rank: int):
    for i, optimizer in enumerate(optimizers):
        optimizer.load_state_dict(states[rank if optimizer is muon else 0][i])


def describe_payload(payload) -> str:
    """What a file that is not one of our checkpoints holds instead, in a few words."""
    if not isinstance(payload, dict):
        return f"it holds a {type(payload).__name__}"
    if "kind" in payload:
        return f"its kind is {payload['kind']!r}, this script reads {CHECKPOINT_KIND!r}"
    keys = first_few([repr(key) for key in payload])
    if payload and all(isinstance(value, Tensor) for value in payload.values()):
        return (f"a bare state dict of {len(payload)} tensors ({keys}), without the model config and kind "
                "a checkpoint carries")
    return f"a dict with keys {keys}, without the 'kind' and 'model_config' a checkpoint carries"


def state_dict_mismatch(model: nn.Module, state: dict) -> str:
    """The keys and shapes where state differs from model's parameters and buffers ("" when it fits)."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    given = {name: tuple(t.shape) for name, t in state.items()}
    differences = {
        "missing": [name for name in expected if name not in given],
        "unexpected": [name for name in given if name not in expected],
        "shapes differ:": [f"{name} {given[name]} (model {shape})" for name, shape in expected.items()
                           if name in given and given[name] != shape],
    }
    return "; ".join(f"{what} {first_few(items)}" for what, items in differences.items() if items)


def first_few(items: list, n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# ----------------------------------------------------------------------------------------------
# Training


class RunLog:
    """logs/<run-id>.txt, written by rank 0 only; echo=True also prints the line."""

    def __init__(self, path: str | None, append: bool = False):
        self.file = None
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.file = open(path, "a" if append else "w")

    def write(self, text: str, echo: bool = False):
        if self.file is None:
            return
        self.file.write(text + "\n")
        self.file.flush()
        if echo:
            print(text, flush=True)

    def close(self):
        if self.file is not None:
            self.file.close()


def environment_report() -> str:
    lines = [f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    for package in ("triton", "nvidia-cutlass-dsl"):
        try:
            lines.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{package} not installed")
    if shutil.which("nvidia-smi"):
        query = "index,name,driver_version,memory.total,power.limit,clocks.max.sm,clocks.max.mem"
        lines.append(subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
                                    capture_output=True, text=True).stdout.rstrip())
    else:
        lines.append("no nvidia-smi: no GPU info")
    return "\n".join(lines)


def write_log_header(log: RunLog, hp: Hyperparameters):
    log.write("hyperparameters: " + json.dumps(asdict(hp)))
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("train_gpt.py", "parallax_kernels.py", "muon.py"):
        log.write(f"==== {name} ====")
        path = os.path.join(here, name)
        log.write(open(path).read() if os.path.exists(path) else "(missing)")
    log.write("==== environment ====")
    log.write(environment_report())
    log.write("=" * 100)


def make_optimizers(model: GPT, hp: Hyperparameters, device: torch.device):
    """Returns (optimizers, the params whose gradients the loop averages across ranks, the Muon or None).

    Muon averages its own parameters' gradients; under optimizer="adamw" the hidden matrices go to
    torch.optim.AdamW at adamw_lr with the Adam groups' betas and eps, everything else unchanged."""
    from muon import build_optimizers

    adam, muon = build_optimizers(model, muon_lr=hp.muon_lr, embed_lr=hp.embed_lr, head_lr=hp.head_lr,
                                  scalar_lr=hp.scalar_lr, muon_momentum=hp.muon_momentum,
                                  weight_decay=hp.weight_decay)
    adam_params = [p for group in adam.param_groups for p in group["params"]]
    if hp.optimizer == "muon":
        return [adam, muon], adam_params, muon
    matrices = [p for group in muon.param_groups for p in group["params"]]
    adamw = torch.optim.AdamW(matrices, lr=hp.adamw_lr, betas=adam.defaults["betas"], eps=adam.defaults["eps"],
                              weight_decay=hp.weight_decay, fused=device.type == "cuda")
    for group in adamw.param_groups:
        group["initial_lr"] = hp.adamw_lr
    return [adam, adamw], adam_params + matrices, None


def lr_multiplier(step: int, hp: Hyperparameters) -> float:
    """Warmup (linear), stable at 1, then a linear cooldown to final_lr_frac over the last cooldown_frac."""
    if step < hp.lr_warmup_steps:
        return (step + 1) / hp.lr_warmup_steps
    remaining = 1 - step / hp.num_iterations
    if remaining >= hp.cooldown_frac:
        return 1.0
    return hp.final_lr_frac + (1 - hp.final_lr_frac) * remaining / hp.cooldown_frac


def window_at(step: int, hp: Hyperparameters) -> int:
    """The long window grows in len(window_schedule) equal stages: few distinct values, so torch.compile
    builds few graphs, all of them during the warm-up."""
    stages = hp.window_schedule
    return stages[min(step * len(stages) // hp.num_iterations, len(stages) - 1)]


def all_reduce_mean_(tensors: list, world_size: int):
    """In-place average across ranks (SUM then divide: gloo has no AVG)."""
    if world_size == 1:
        return
    handles = [dist.all_reduce(t, async_op=True) for t in tensors]
    for handle, t in zip(handles, tensors):
        handle.wait()
        t.div_(world_size)


def allow_recompiles():
    """torch.compile keeps one graph per window stage, grad mode and batch shape: more than its default 8."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_paths(run_name: str) -> tuple:
    """(its log, its checkpoint folder)."""
    return f"logs/{run_name}.txt", os.path.join("checkpoints", run_name)


def claim_run_name(hp: Hyperparameters, continuing: bool, master: bool):
    """A run never replaces another: a run name with a log or checkpoints is refused, unless this run
    continues it (RESUME) or OVERWRITE=1 asks to replace it (rank 0 then removes its log and checkpoints)."""
    log_path, checkpoint_dir = run_paths(hp.run_name)
    taken = os.path.exists(log_path) or bool(glob.glob(os.path.join(glob.escape(checkpoint_dir), "*")))
    if not taken or continuing:
        return
    if not hp.overwrite:
        raise ValueError(f"run name {hp.run_name!r} is taken ({log_path} or {checkpoint_dir}/ exists): choose "
                         "another RUN_NAME, continue that run with RESUME=<one of its checkpoints>, or replace it "
                         "with OVERWRITE=1")
    if master:
        if os.path.exists(log_path):
            os.remove(log_path)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def begin_run(hp: Hyperparameters, rank: int, world_size: int) -> tuple:
    """Checks before anything is written (enough tokens, the RESUME checkpoint, a free run name); returns
    hp with its run name (by default a resumed run keeps its own) and the resume checkpoint (or None)."""
    check_enough_tokens(hp.train_files, hp.num_iterations * hp.micro_batches * hp.seq_len + 1,
                        f"{hp.num_iterations} steps of {hp.micro_batches} x {hp.seq_len} tokens")
    check_enough_tokens(hp.val_files, hp.val_tokens + 1, f"val_tokens={hp.val_tokens} (plus one target)")
    resumed = load_resume_checkpoint(hp, world_size) if hp.resume else None
    resumed_name = resumed["hyperparameters"]["run_name"] if resumed else None
    hp = replace(hp, run_name=hp.run_name or resumed_name or f"{hp.attention}-{uuid.uuid4().hex[:8]}")
    claim_run_name(hp, continuing=hp.run_name == resumed_name, master=rank == 0)
    if world_size > 1:
        dist.barrier()  # every rank has looked before rank 0 creates the log
    return hp, resumed


def open_run_log(hp: Hyperparameters, resumed: dict | None, master: bool) -> RunLog:
    """A new log with the header; a run resumed under its own name appends to its log instead."""
    path = run_paths(hp.run_name)[0]
    appending = resumed is not None and hp.run_name == resumed["hyperparameters"]["run_name"]
    log = RunLog(path if master else None, append=appending)
    if master:
        print(f"logging to {path}", flush=True)
    if not appending:
        write_log_header(log, hp)
    if resumed is not None:
        log.write(f"resumed from {hp.resume} at step {resumed['step']}", echo=True)
    return log


INTERRUPT_CHECK_EVERY = 10  # steps between the ranks' agreement on an interrupt (a single rank checks every step)


class InterruptRequests:
    """While training, SIGINT and SIGTERM only set a flag, and the loop checkpoints and stops at a step
    boundary where the ranks agree. A second signal changes nothing (torchrun follows a Ctrl-C with
    SIGTERM). Several ranks all-reduce the flag every INTERRUPT_CHECK_EVERY steps, so no step waits on
    the host for it."""

    def __init__(self, world_size: int, device: torch.device):
        self.world_size, self.device = world_size, device
        self.received = 0  # the first signal's number

    def __enter__(self):
        self.previous = {number: signal.signal(number, self._receive) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exception):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _receive(self, number, frame):
        self.received = self.received or number

    def agreed(self, step: int) -> int:
        """The number of a signal some rank received, at a boundary where the ranks compare (0: none)."""
        if self.world_size == 1:
            return self.received
        if step % INTERRUPT_CHECK_EVERY:
            return 0
        flag = torch.tensor(self.received, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


DIVERGENCE_GRACE = 0.1  # the fraction of training after which a val loss no better than the untrained one stops it


def divergence(step: int, val_loss: float, untrained_val_loss: float, hp: Hyperparameters) -> str | None:
    """Why this validation stops the run, or None. Huge learning rates need not give a NaN: they can
    leave the model predicting the uniform distribution, the untrained model's loss, for good."""
    if not math.isfinite(val_loss):
        return "is not finite"
    if step > 0 and step >= DIVERGENCE_GRACE * hp.num_iterations and val_loss >= untrained_val_loss:
        return f"is no better than the untrained model's {untrained_val_loss:.4f}"
    return None


def skip_batches(batches, count: int):
    """Consume count batches: the loader is deterministic, so a resumed run's data position is its step."""
    for _ in itertools.islice(batches, count):
        pass


def train(hp: Hyperparameters) -> int:
    """Run one training job (a torchrun worker, or a lone process without a process group); 0, 1 when the
    run diverged, 128 + the signal's number when interrupted (after saving a checkpoint)."""
    distributed = "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    check_hyperparameters(hp, world_size)
    use_cuda = torch.cuda.is_available() and not hp.smoke
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    try:
        hp, resumed = begin_run(hp, rank, world_size)
        log = open_run_log(hp, resumed, master=rank == 0)
        try:
            with InterruptRequests(world_size, device) as interrupts:
                return _train(hp, rank, world_size, device, log, resumed, interrupts)
        except BaseException as err:  # data errors and the like: the log says the run stopped
            log.write(f"stopped: {type(err).__name__}: {err}")
            raise
        finally:
            log.close()
    finally:
        if distributed:
            dist.destroy_process_group()


def _train(hp: Hyperparameters, rank: int, world_size: int, device: torch.device, log: RunLog, resumed: dict | None,
           interrupts: InterruptRequests) -> int:
    master = rank == 0
    grad_accum = hp.micro_batches // world_size

    torch.manual_seed(hp.seed)
    model = GPT(model_config(hp)).to(device)
    if device.type == "cuda":
        model.embeddings_to(torch.bfloat16)
    if world_size > 1:
        for param in model.parameters():
            dist.broadcast(param.detach(), 0)
    counts = {"total": sum(p.numel() for p in model.parameters()),
              "blocks": sum(p.numel() for p in model.blocks.parameters())}
    log.write(f"model: {counts['total']:,} parameters ({counts['blocks']:,} in the blocks); {hp.attention} "
              f"attention, MLP hidden {model.config.mlp_hidden}; {world_size} rank(s) x {grad_accum} micro-batches "
              f"of {hp.seq_len} tokens per step; device {device}", echo=True)
    optimizers, averaged_params, muon = make_optimizers(model, hp, device)
    compiled = model
    if device.type == "cuda" and hp.compile:
        allow_recompiles()
        compiled = torch.compile(model)
    train_loader = distributed_data_generator(hp.train_files, hp.seq_len, rank, world_size,
                                              max_doc_len=hp.max_doc_len, device=device, vocab_size=hp.vocab_size)

    def run_model(batch: Batch) -> Tensor:
        if compiled is not model:
            torch._dynamo.maybe_mark_dynamic(batch.cu_seqlens, 0)  # the number of documents changes every batch
        # Only softmax attention reads document ids (see packed_attention); Parallax takes cu_seqlens.
        doc_ids = document_ids(batch.cu_seqlens, batch.inputs.numel()) if hp.attention == "softmax" else None
        return compiled(batch.inputs, batch.targets, cu_seqlens=batch.cu_seqlens, doc_ids=doc_ids)

    def train_step(step: int, batches) -> float:
        """One optimizer step; returns the loss averaged over the global batch. When it is not finite,
        nothing is updated (Muon would refuse the gradients anyway)."""
        model.set_window(window_at(step, hp))
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            loss = run_model(next(batches))
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
        mean_loss = loss_sum / grad_accum
        all_reduce_mean_([mean_loss] + [p.grad for p in averaged_params if p.grad is not None], world_size)
        if not math.isfinite(mean_loss := mean_loss.item()):
            model.zero_grad(set_to_none=True)
            return mean_loss
        multiplier = lr_multiplier(step, hp)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * multiplier
        if muon is not None:
            warmup = min(step / hp.muon_momentum_warmup_steps, 1) if hp.muon_momentum_warmup_steps else 1
            for group in muon.param_groups:
                group["momentum"] = (1 - warmup) * hp.muon_momentum_start + warmup * hp.muon_momentum
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        return mean_loss

    @torch.no_grad()
    def evaluate(step: int, max_batches=None) -> float:
        model.set_window(window_at(step, hp))
        batches = validation_batches(hp.val_files, hp.val_tokens, hp.seq_len, rank, world_size, device=device,
                                     vocab_size=hp.vocab_size)
        losses = [run_model(batch) for batch in itertools.islice(batches, max_batches)]
        val_loss = torch.stack(losses).mean()
        all_reduce_mean_([val_loss], world_size)
        return val_loss.item()

    if compiled is not model:
        warm_up(model, optimizers, hp, train_step, evaluate, grad_accum, rank, world_size, device, master)
    if resumed is not None:  # after the warm-up, which restores the states it found
        model.load_state_dict(resumed["model"])
        restore_optimizers(optimizers, muon, resumed["optimizers"], rank)
        skip_batches(train_loader, resumed["step"] * grad_accum)

    def checkpoint_path(step: int) -> str:
        return os.path.join(run_paths(hp.run_name)[1], f"state_step{step:06d}.pt")

    def save(step: int) -> str:
        """Collective (every rank's optimizer state); rank 0 writes the resumable checkpoint."""
        states = gather_optimizer_states(optimizers, muon, rank, world_size)
        path = checkpoint_path(step)
        if master:
            save_checkpoint(path, model, hp, step, dict(optimizers=states, untrained_val_loss=untrained_val_loss,
                                                        train_time_ms=training_time_ms))
        return path

    start_step = resumed["step"] if resumed else 0
    untrained_val_loss = resumed["untrained_val_loss"] if resumed else None  # measured at step 0
    last_checkpoint = last_good_checkpoint = hp.resume or None
    training_time_ms = resumed["train_time_ms"] if resumed else 0.0
    synchronize(device)
    t0 = time.perf_counter()
    for step in range(start_step, hp.num_iterations + 1):
        last_step = step == hp.num_iterations
        if last_step or step == 0 or (hp.val_every > 0 and step % hp.val_every == 0):
            synchronize(device)
            training_time_ms += 1000 * (time.perf_counter() - t0)
            val_loss = evaluate(step)
            log.write(f"step:{step}/{hp.num_iterations} val_loss:{val_loss:.4f} train_time:{training_time_ms:.0f}ms "
                      f"step_avg:{training_time_ms / max(step, 1):.2f}ms", echo=True)
            if step == 0:
                untrained_val_loss = val_loss
            if why := divergence(step, val_loss, untrained_val_loss, hp):
                log.write(f"stopped: step:{step}/{hp.num_iterations} val_loss:{val_loss:.4f} {why}: diverged. Last "
                          f"good checkpoint: {last_good_checkpoint or 'none saved (set SAVE_EVERY to keep some)'}",
                          echo=True)
                return 1
            last_good_checkpoint = last_checkpoint
            synchronize(device)
            t0 = time.perf_counter()
        if last_step:
            break

        try:
            loss = train_step(step, train_loader)
        except StopIteration:
            raise RuntimeError(f"{hp.train_files}: ran out of training tokens at step {step + 1}") from None
        elapsed_ms = training_time_ms + 1000 * (time.perf_counter() - t0)
        if not math.isfinite(loss):
            message = (f"stopped: step:{step + 1}/{hp.num_iterations} train_loss:{loss} is not finite; stopping. Last "
                       f"good checkpoint: {last_checkpoint or 'none saved (set SAVE_EVERY to keep some)'}")
            log.write(message, echo=True)
            return 1
        log.write(f"step:{step + 1}/{hp.num_iterations} train_loss:{loss:.4f} train_time:{elapsed_ms:.0f}ms "
                  f"step_avg:{elapsed_ms / (step + 1):.2f}ms", echo=True)

        if hp.save_every > 0 and (step + 1) % hp.save_every == 0 and step + 1 < hp.num_iterations:
            synchronize(device)
            training_time_ms += 1000 * (time.perf_counter() - t0)
            last_checkpoint = save(step + 1)
            t0 = time.perf_counter()
        if step + 1 < hp.num_iterations and (signal_number := interrupts.agreed(step + 1)):
            synchronize(device)
            training_time_ms += 1000 * (time.perf_counter() - t0)
            path = last_checkpoint if last_checkpoint == checkpoint_path(step + 1) else save(step + 1)
            name = signal.Signals(signal_number).name
            log.write(f"stopped: step:{step + 1}/{hp.num_iterations} interrupted by {name}; saved {path}; continue "
                      f"with RESUME={path}", echo=True)
            return 128 + signal_number

    last_checkpoint = save(hp.num_iterations)
    if master:
        print(f"checkpoint: {last_checkpoint}", flush=True)
    if device.type == "cuda":
        allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    else:
        import resource
        allocated = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak RSS
    log.write(f"peak memory allocated: {allocated // 2**20} MiB reserved: {reserved // 2**20} MiB", echo=True)
    return 0


def warm_up(model, optimizers, hp, train_step, evaluate, grad_accum, rank, world_size, device, master):
    """Compile every graph the run will use (a training step and a validation batch per window stage)
    on the first batches, outside the timed region; then restore the initial weights and optimizer
    states, as the records do."""
    initial_model = {name: t.detach().clone() for name, t in model.state_dict().items()}
    initial_optimizers = [optimizer.state_dict() for optimizer in optimizers]
    batches = distributed_data_generator(hp.train_files, hp.seq_len, rank, world_size, max_doc_len=hp.max_doc_len,
                                         device=device, vocab_size=hp.vocab_size)
    first_batches = [next(batches) for _ in range(grad_accum)]
    stage_steps = {}  # window -> the first step that uses it (validation at the last step included)
    for step in range(hp.num_iterations + 1):
        stage_steps.setdefault(window_at(step, hp), step)
    start = time.perf_counter()
    for i, (window, step) in enumerate(stage_steps.items()):
        if master:
            print(f"warm-up: window {window} ({i + 1}/{len(stage_steps)}), {time.perf_counter() - start:.0f}s so far",
                  flush=True)
        train_step(step, iter(first_batches))
        evaluate(step, max_batches=1)
    model.load_state_dict(initial_model)
    for optimizer, state in zip(optimizers, initial_optimizers):
        optimizer.load_state_dict(state)
    synchronize(device)
    if master:
        print(f"warm-up done in {time.perf_counter() - start:.0f}s", flush=True)


# ----------------------------------------------------------------------------------------------
# Generation: a preallocated KV cache, packed prefill, one-token decode steps (CUDA-graph replayed)


class KVCache:
    """Keys and values of every layer, (B, max_len, H, D) each, and the valid length of every row."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, max_len, config.num_heads, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.lengths = torch.zeros(batch_size, device=device, dtype=torch.int32)  # updated in place only
        self.rows = torch.arange(batch_size, device=device)


@torch.no_grad()
def prefill(model: GPT, cache: KVCache, prompts: list) -> Tensor:
    """Run all prompts as one packed sequence (documents never see each other), store their keys and
    values in the cache rows, and return the logits of each prompt's last token (B, vocab)."""
    device = cache.lengths.device
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.tensor([t for p in prompts for t in p], device=device)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device, torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()]).to(device)
    rows = torch.repeat_interleave(cache.rows, lengths.to(device))
    inner = packed_attention(model.config.attention == "parallax", cu_seqlens, tokens.numel(), model.layer_windows,
                             model.config.attn_scale, use_flex=False)

    def attend(layer, q, r, k, v):
        cache.k[layer][rows, positions] = k[0]
        cache.v[layer][rows, positions] = v[0]
        return inner(layer, q, r, k, v)

    x = model.hidden_states(tokens[None], positions, attend)[0]
    cache.lengths.copy_(lengths.to(device, torch.int32))
    return model.logits(x[cu_seqlens[1:].long() - 1])


def cached_attention(q, r, k_cache, v_cache, lengths, window: int, scale: float, decode_path: str):
    """One new query per row (B, 1, H, D) over its row's cache; lengths (B,) counts the valid keys, the
    new one included. Parallax through parallax_kernels.parallax_decode (decode_path="kernel") or the
    fp32 reference row by row ("reference"); softmax (r is None) through SDPA with a length mask."""
    if r is None:
        key_pos = torch.arange(k_cache.size(1), device=q.device)
        query_pos = (lengths - 1).long()[:, None]
        visible = (key_pos <= query_pos) & (key_pos > query_pos - window)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                           attn_mask=visible[:, None, None, :], scale=scale)
        return y.transpose(1, 2)
    if decode_path == "reference":
        decode = parallax_kernels.parallax_decode_reference
    else:
        decode = parallax_kernels.parallax_decode
    return decode(q, r, k_cache, v_cache, lengths, window=window, scale=scale)


@torch.compiler.disable  # eager inside a compiled step too: in-place cache writes, opaque kernels
def store_and_attend(cache: KVCache, layer: int, positions, lengths, q, r, k, v, window: int, scale: float,
                     decode_path: str):
    cache.k[layer][cache.rows, positions] = k[:, 0]
    cache.v[layer][cache.rows, positions] = v[:, 0]
    return cached_attention(q, r, cache.k[layer], cache.v[layer], lengths, window, scale, decode_path)


def decode_step(model: GPT, cache: KVCache, tokens: Tensor, decode_path: str) -> Tensor:
    """Feed one token per row (B,), append its keys and values, advance the lengths; -> logits (B, vocab).
    Only in-place updates of preallocated tensors, so the whole step can be captured in a CUDA graph."""
    positions = cache.lengths.long()  # where the new token goes
    lengths = cache.lengths + 1

    def attend(layer, q, r, k, v):
        return store_and_attend(cache, layer, positions, lengths, q, r, k, v, model.layer_windows[layer],
                                model.config.attn_scale, decode_path)

    x = model.hidden_states(tokens[:, None], positions[:, None], attend)
    cache.lengths.copy_(lengths)
    return model.logits(x[:, 0])


class DecodeStep:
    """decode_step, eager or replayed from a CUDA graph (static token buffer, cache lengths in place);
    with use_compile the step is torch.compiled first, fusing the small ops between the matmuls."""

    def __init__(self, model, cache, decode_path="kernel", use_graph=False, use_compile=False):
        self.args = (model, cache)
        self.decode_path = decode_path
        self.step = decode_step
        if use_compile:
            allow_recompiles()
            self.step = torch.compile(decode_step, dynamic=False)
        self.graph = None
        if not use_graph:
            return
        if cache.lengths.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if decode_path == "reference":
            raise ValueError("the reference decode path reads the lengths on the host: it cannot run in a CUDA graph")
        self.tokens = torch.zeros_like(cache.rows)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # run it for real first: compiles kernels, allocates workspaces
            for _ in range(2):
                self.step(model, cache, self.tokens, decode_path)
        torch.cuda.current_stream().wait_stream(side)
        cache.lengths.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step(model, cache, self.tokens, decode_path)

    def __call__(self, tokens: Tensor) -> Tensor:
        if self.graph is None:
            return self.step(*self.args, tokens, self.decode_path)
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
    """(B, vocab) -> (B,) tokens: greedy at temperature 0, else top-k sampling; padded ids never."""
    logits = logits[:, :GPT2_VOCAB]
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


class Generation(NamedTuple):
    tokens: list  # per prompt, the new tokens (end-of-text excluded)
    prefill_s: float
    decode_s: float


@torch.no_grad()
def generate(model: GPT, prompts: list, max_new_tokens: int, *, temperature=0.0, top_k=None, seed=0,
             stop_token: int | None = BOS, use_graph=False, use_compile=False, decode_path="kernel",
             on_token=None) -> Generation:
    """Continue every prompt (lists of token ids, each starting with BOS) by up to max_new_tokens,
    stopping a row at stop_token. Rows keep their own cache lengths, so prompts may differ in length.
    on_token(row, token) is called for every new token as it is sampled."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    weight = model.lm_head.weight
    device = weight.device
    cache = KVCache(model.config, len(prompts), max(map(len, prompts)) + max_new_tokens, device, weight.dtype)
    step = DecodeStep(model, cache, decode_path, use_graph, use_compile)  # captured before the prefill fills the cache
    generator = torch.Generator(device).manual_seed(seed)
    synchronize(device)
    start = time.perf_counter()
    logits = prefill(model, cache, prompts)
    synchronize(device)
    decode_start = time.perf_counter()
    outputs = [[] for _ in prompts]
    active = [True] * len(prompts)
    for i in range(max_new_tokens):
        next_tokens = sample_next(logits, temperature, top_k, generator)
        for row, token in enumerate(next_tokens.tolist()):
            if not active[row]:
                continue
            if token == stop_token:
                active[row] = False
                continue
            outputs[row].append(token)
            if on_token is not None:
                on_token(row, token)
        if not any(active) or i == max_new_tokens - 1:
            break
        logits = step(next_tokens)
    return Generation(outputs, decode_start - start, time.perf_counter() - decode_start)


# ----------------------------------------------------------------------------------------------
# Command line: sample, bench-sample


def load_gpt2_encoding(bpe_file=None):
    """tiktoken's GPT-2 encoding (downloaded and cached by tiktoken once), or built offline from a local
    GPT-2 ranks file in tiktoken's format."""
    import tiktoken

    if bpe_file is None:
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer split

    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=load_tiktoken_bpe(bpe_file),
                             special_tokens={"<|endoftext|>": BOS})


class TextStream:
    """Prints tokens as text the moment they arrive, holding back the bytes of an unfinished character."""

    def __init__(self, encoding):
        self.encoding = encoding
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, row, token):
        sys.stdout.write(self.decoder.decode(self.encoding.decode_single_token_bytes(token)))
        sys.stdout.flush()

    def close(self):
        print(self.decoder.decode(b"", final=True))


def inference_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def prepare_for_inference(model: GPT, device: torch.device) -> GPT:
    model = model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    return model.eval().requires_grad_(False)


def sample_main(args) -> int:
    try:
        model, checkpoint = load_checkpoint(args.checkpoint)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        encoding = load_gpt2_encoding(args.bpe_file)
    except Exception as err:
        print(f"error: cannot load tiktoken's GPT-2 encoding ({type(err).__name__}); "
              "offline, set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached GPT-2 files, or pass "
              "--bpe-file PATH to a GPT-2 ranks file in tiktoken's format (e.g. gpt2.tiktoken)", file=sys.stderr)
        return 1
    texts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file) as f:
            texts += [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
        texts = [""]
    device = inference_device()
    model = prepare_for_inference(model, device)
    use_graph = device.type == "cuda" and not args.no_graph
    prompts = [[BOS] + encoding.encode_ordinary(text) for text in texts for _ in range(args.num_samples)]
    stream = TextStream(encoding) if len(prompts) == 1 else None
    print(f"checkpoint step {checkpoint['step']}, {model.config.attention} attention; device {device}, "
          f"CUDA graph {'on' if use_graph else 'off'}", file=sys.stderr)
    if stream is not None:
        sys.stdout.write(texts[0])
    result = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      seed=args.seed, use_graph=use_graph, use_compile=args.compile and device.type == "cuda",
                      on_token=stream.write if stream is not None else None)
    if stream is not None:
        stream.close()
    else:
        for i, tokens in enumerate(result.tokens):
            print(f"---- sample {i + 1} (prompt {i // args.num_samples + 1}) ----")
            print(texts[i // args.num_samples] + encoding.decode(tokens))
    new_tokens = sum(map(len, result.tokens))
    print(f"{new_tokens} tokens in {result.decode_s:.2f}s: {new_tokens / result.decode_s:.0f} tokens/s "
          f"(after a {1000 * result.prefill_s:.0f} ms prefill)", file=sys.stderr)
    return 0


def bench_sample_main(args) -> int:
    device = inference_device()
    if device.type != "cuda":
        print("no CUDA device: timing the CPU path (no CUDA graphs)", file=sys.stderr)
    try:
        backend = parallax_kernels.decode_backend(device)
    except (AttributeError, ImportError) as err:
        backend = f"unavailable ({err})"
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; parallax decode backend: "
          f"{backend}; prompt {args.prompt_len} tokens, {args.new_tokens} new")
    print(f"{'attention':>9} {'batch':>5} {'graph':>5} {'compile':>7} {'prefill ms':>10} {'ms/step':>8} "
          f"{'tokens/s':>9}")
    generator = torch.Generator().manual_seed(0)
    for attention in args.attention:
        torch.manual_seed(0)
        model = prepare_for_inference(GPT(model_config(Hyperparameters(attention=attention))), device)
        with torch.no_grad():  # random weights everywhere, so no layer is skipped by a zero
            for param in model.parameters():
                if param.ndim == 2 and not param.abs().sum():
                    param.normal_(0, 0.02)
        for batch_size in args.batch_sizes:
            prompts = [[BOS] + torch.randint(0, BOS, (args.prompt_len - 1,), generator=generator).tolist()
                       for _ in range(batch_size)]
            for use_graph in ([True, False] if device.type == "cuda" else [False]):
                options = dict(temperature=0.8, top_k=50, stop_token=None, use_graph=use_graph,
                               use_compile=args.compile)
                generate(model, prompts, min(8, args.new_tokens), **options)  # compile and tune first
                result = generate(model, prompts, args.new_tokens, **options)
                steps = args.new_tokens - 1  # decode steps after the prefill's token
                print(f"{attention:>9} {batch_size:>5} {'on' if use_graph else 'off':>5} "
                      f"{'on' if args.compile else 'off':>7} {1000 * result.prefill_s:>10.1f} "
                      f"{1000 * result.decode_s / max(steps, 1):>8.3f} "
                      f"{batch_size * args.new_tokens / result.decode_s:>9.0f}", flush=True)
    return 0


def sampling_arguments_problem(args) -> str | None:
    """What is wrong with the sample command's arguments, checked before the checkpoint loads; None if nothing."""
    if args.num_samples < 1 or args.max_new_tokens < 1:
        return "--num-samples and --max-new-tokens must be at least 1"
    if not math.isfinite(args.temperature) or args.temperature < 0:
        return f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}"
    if args.top_k < 0:
        return f"--top-k must be >= 0 (0: no top-k cut), got {args.top_k}"
    if args.prompts_file is not None and not os.path.isfile(args.prompts_file):
        return f"--prompts-file {args.prompts_file}: no such file"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train the Parallax speedrun GPT (no command; run it under torchrun, "
                                                 "settings through environment variables), or sample from it.")
    commands = parser.add_subparsers(dest="command")
    sample = commands.add_parser("sample", help="generate text from a checkpoint")
    sample.add_argument("--checkpoint", required=True, help="checkpoints/<run-id>/state_step<N>.pt")
    sample.add_argument("--prompt", action="append", help="prompt text (repeat for a batch of prompts)")
    sample.add_argument("--prompts-file", help="a file of prompts, one per line")
    sample.add_argument("--max-new-tokens", type=int, default=256)
    sample.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    sample.add_argument("--top-k", type=int, default=50, help="0 for no top-k cut")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    sample.add_argument("--no-graph", action="store_true", help="decode eagerly instead of replaying a CUDA graph")
    sample.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA; faster)")
    sample.add_argument("--bpe-file", help="local GPT-2 ranks file in tiktoken's format, to work offline")
    bench = commands.add_parser("bench-sample", help="decode tokens/s of the speedrun-size model, random weights")
    bench.add_argument("--attention", nargs="+", default=["parallax", "softmax"], choices=["parallax", "softmax"])
    bench.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    bench.add_argument("--prompt-len", type=int, default=512)
    bench.add_argument("--new-tokens", type=int, default=256)
    bench.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    args = parser.parse_args(argv)
    if args.command == "sample":
        if problem := sampling_arguments_problem(args):
            parser.error(problem)
        return sample_main(args)
    if args.command == "bench-sample":
        return bench_sample_main(args)
    try:
        return train(hyperparameters_from_env(os.environ))
    except (ValueError, FileNotFoundError) as err:  # settings and data: one line says it
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
