"""The Parallax speedrun: a GPT-2-small-scale model with Parallax attention, trained on FineWeb with Muon.

    ./run.sh                                        # every GPU of this node, through torchrun
    SMOKE=1 python train_gpt.py                     # tiny CPU check (on the shards TRAIN_FILES names)
    python train_gpt.py sample --checkpoint checkpoints/<run-id>/state_step001385.pt --prompt "The"

The model is modded-nanoGPT's of January 2025 (the FlexAttention records) with one more projection per
layer, Parallax's probe r; `attention = "softmax"` swaps only the attention for FlexAttention (same masks).
Hyperparameters live in the dataclass below; each field can be overridden by an environment variable of
its upper-case name. A run writes logs/<run-id>.txt (the hyperparameters, the code it runs, versions,
then its losses) and checkpoints/<run-id>/state_step<N>.pt, which RESUME=<checkpoint> continues.
README.md has the rest: the settings meant for overriding, the log's lines, what stops a run, OVERWRITE.
"""
import argparse
import itertools
import math
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from attention_inputs import attention_inputs, norm
from generate import add_sample_arguments, sample_from, synchronize
from gpt2_data import BOS, TokenStream, check_enough_tokens, shard_files
from lm_head_fp8 import fp8_lm_head
from parallax_kernels import FLEX_BLOCK, document_ids, packed_attention
from safeguards import (CheckpointError, InterruptRequests, RunLog, check_for_misspelled_settings, check_resumable,
                        claim_run_name, cpu_copy, divergence, read_checkpoint, run_paths, sampling_arguments_problem,
                        save_checkpoint, state_dict_mismatch, write_log_header)

# ----------------------------------------------------------------------------------------------
# Hyperparameters


@dataclass
class Hyperparameters:
    run_name: str = ""  # names logs/<run-id>.txt, checkpoints/<run-id>/; default <attention>-<hex>, or RESUME's run
    seed: int = 0  # model initialization (the data order is fixed)
    # data: modded-nanoGPT shards (see gpt2_data.py)
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
    # Parallax's probe r = gain * rotary(norm(W_r x)). "head": a learnable scalar per head, from 0, so that
    # training starts exactly at softmax attention; "channel": one per head and channel; "none": no gain
    # (the paper authors' r, the model of the 2026-11-22 records). "head" at 0 with these rates is the variant
    # records/2026-11-30_parallax-r-study/ chose (its README has the evidence).
    r_gain: str = "head"
    r_gain_init: float = 0.0
    r_gain_lr: float = 0.04  # Adam learning rate of the gain
    r_lr_mult: float = 1.0  # multiplies W_r's learning rate (Muon's, or AdamW's under optimizer="adamw")
    r_norm: bool = True  # RMS-norm W_r x (like q and k)
    r_rotary: bool = True  # rotate r with q's rotary embedding
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
    lm_head_fp8: bool = False  # the LM head's matmuls in FP8 in training steps on CUDA (validation, sampling: bf16)
    smoke: bool = False  # the tiny CPU configuration below


SMOKE_CONFIG = dict(
    smoke=True, num_layers=2, model_dim=64, num_heads=1, head_dim=64, num_value_embeds=1, seq_len=256,
    micro_batches=2, num_iterations=30, val_tokens=2048, val_every=10, window_schedule=(128, 256),
    compile=False,
)


def hyperparameters_from_env(environ) -> Hyperparameters:
    """The defaults, then SMOKE=1's configuration, then one override per upper-case field name set."""
    check_for_misspelled_settings(environ, [field.name.upper() for field in fields(Hyperparameters)])
    hp = Hyperparameters()
    if "SMOKE" in environ and _parse_env("SMOKE", environ["SMOKE"], False):
        hp = replace(hp, **SMOKE_CONFIG)
    overrides = {}
    for field in fields(hp):
        name = field.name.upper()
        if name in environ and name != "SMOKE":
            overrides[field.name] = _parse_env(name, environ[name], getattr(hp, field.name))
    return replace(hp, **overrides)


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
    if hp.r_gain not in ("none", "head", "channel"):
        raise ValueError(f"r_gain must be 'none', 'head' or 'channel', got {hp.r_gain!r}")
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
# Data: the distributed loader (gpt2_data.py reads the shards)


class Batch(NamedTuple):
    inputs: Tensor  # (seq_len,) int32 tokens of packed documents
    targets: Tensor  # (seq_len,) int64: the stream shifted by one
    cu_seqlens: Tensor  # (segments + 1,) int32 segment boundaries: 0, every BOS, max_doc_len splits, seq_len


def document_boundaries(inputs: Tensor, max_doc_len: int = 0) -> Tensor:
    """cu_seqlens for packed documents: a boundary at every BOS, and at 0 (a document cut at the start
    of the batch is a segment of its own); with max_doc_len, longer segments are split into pieces."""
    T = inputs.numel()
    # in numpy: torch's eq and nonzero over a 64K-token batch use its intra-op thread pool, whose barriers
    # can take milliseconds when other threads keep the cores busy, once per step on the training host
    starts = torch.from_numpy(np.flatnonzero(inputs.numpy() == BOS))
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
    # r's parameterization (Hyperparameters.r_*); the defaults rebuild checkpoints written before it existed
    r_gain: str = "none"
    r_gain_init: float = 0.0
    r_norm: bool = True
    r_rotary: bool = True
    lm_head_fp8: bool = False  # Hyperparameters.lm_head_fp8

    @property
    def parallax(self) -> bool:
        """The attention switch: Parallax, or softmax (no r)."""
        return self.attention == "parallax"


def model_config(hp: Hyperparameters) -> GPTConfig:
    mlp_hidden = 4 * hp.model_dim
    if hp.attention == "parallax" and hp.param_matched:
        mlp_hidden -= hp.num_heads * hp.head_dim // 2  # 2 * dim * (hdim / 2) = r's dim * hdim weights
    return GPTConfig(hp.vocab_size, hp.num_layers, hp.model_dim, hp.num_heads, hp.head_dim, mlp_hidden,
                     hp.attention, hp.num_value_embeds, hp.logit_cap, hp.attn_scale, hp.window_schedule[-1],
                     hp.r_gain, hp.r_gain_init, hp.r_norm, hp.r_rotary, hp.lm_head_fp8)


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


class RotaryTables:
    """cos, sin of half-truncated rotary embeddings: a quarter of the dimension pairs rotate at frequencies
    from 1 down to 1/1024 per position, the other quarter do not rotate. Tabulated once, in fp32, and read:
    computed inside a compiled step, inductor recomputes sin and cos in every kernel that reads them (5.4 ms
    of a record-size step on an H200). Not module buffers, so casting the model to bf16 leaves them fp32."""

    def __init__(self, head_dim: int):
        self.head_dim = head_dim
        self.cos = self.sin = torch.empty(0)

    def prefix(self, length: int, device: torch.device) -> tuple:
        """cos, sin at positions 0 .. length - 1, each (length, 1, head_dim / 2), on device (a tensor's: with
        its index). Built or grown on first use in eager code; compiled code that finds them missing computes
        them in its graph, as before (Trainer and DecodeStep build them before compiling)."""
        if self.cos.size(0) >= length and self.cos.device == device:
            return self.cos[:length], self.sin[:length]
        freqs = (1 / 1024) ** torch.linspace(0, 1, self.head_dim // 4, device=device)
        freqs = torch.cat([freqs, freqs.new_zeros(self.head_dim // 4)])
        theta = torch.arange(length, device=device).float()[:, None, None] * freqs
        if torch.compiler.is_compiling():
            return theta.cos(), theta.sin()
        self.cos, self.sin = theta.cos(), theta.sin()
        return self.cos, self.sin

    def at(self, positions: Tensor, length: int) -> tuple:
        """cos, sin at positions (each below length), shaped (*positions.shape, 1, head_dim / 2)."""
        cos, sin = self.prefix(length, positions.device)
        return cos[positions], sin[positions]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        hdim = config.num_heads * config.head_dim
        self.q = CastedLinear(config.model_dim, hdim)
        self.k = CastedLinear(config.model_dim, hdim)
        self.v = CastedLinear(config.model_dim, hdim)
        self.r = self.r_gain = None
        self.r_norm, self.r_rotary = config.r_norm, config.r_rotary
        if config.parallax:
            self.r = CastedLinear(config.model_dim, hdim)
            gain_shape = {"head": (config.num_heads, 1), "channel": (config.num_heads, config.head_dim)}
            if config.r_gain in gain_shape:
                self.r_gain = nn.Parameter(torch.full(gain_shape[config.r_gain], config.r_gain_init))
        self.c_proj = CastedLinear(hdim, config.model_dim, zero_init=True)
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # mix of v and the value embedding

    def forward(self, x: Tensor, ve: Tensor | None, rope, attend) -> Tensor:
        B, T, _ = x.shape
        # q, k, v (and r) in one matmul; their weights stay separate matrices for Muon
        projections = [self.q, self.k, self.v] + ([self.r] if self.r is not None else [])
        weights = torch.cat([p.weight for p in projections]).type_as(x)
        qkvr = F.linear(x, weights).view(B, T, len(projections), self.num_heads, self.head_dim)
        q, k, v, r = attention_inputs(qkvr, rope, self.lambdas, ve, self.r_gain, self.r_norm, self.r_rotary)
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
        self.rotary = RotaryTables(config.head_dim)

    def embeddings_to(self, dtype: torch.dtype) -> "GPT":
        """Activations in dtype from the embeddings on; the linear weights stay fp32 for the optimizers."""
        self.embed.to(dtype)
        self.value_embeds.to(dtype)
        return self

    def layer_windows(self, long_window: int | None = None) -> list:
        """Per-layer windows, a Python int each (torch.compile specializes on them): long on every 4th layer
        counted from the outside in (records: L S S S L S | S L S S S L), half as long elsewhere. The
        default long window is the last one of training."""
        if long_window is None:
            long_window = self.config.final_window
        L = self.config.num_layers
        short_window = max(1, long_window // 2)
        return [long_window if min(i, L - 1 - i) % 4 == 0 else short_window for i in range(L)]

    def hidden_states(self, tokens: Tensor, rope: tuple, attend) -> Tensor:
        """The trunk: tokens (B, T) with their rotary cos, sin (from self.rotary) -> final-normed states
        (B, T, model_dim)."""
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
        logits = fp8_lm_head(x, self.lm_head.weight) if self.fp8_head_active(x) else self.lm_head(x)
        return self.config.logit_cap * torch.tanh(logits.float() / self.config.logit_cap)

    def fp8_head_active(self, x: Tensor) -> bool:
        """LM_HEAD_FP8 applies to training steps on CUDA: validation (no grad) and sampling (eval) keep bf16."""
        return self.config.lm_head_fp8 and self.training and torch.is_grad_enabled() and x.is_cuda

    def packed_attention(self, cu_seqlens: Tensor, T: int, window: int | None = None, doc_ids: Tensor | None = None):
        """attend(layer, q, r, k, v) for T packed tokens (see parallax_kernels.packed_attention and forward)."""
        # FlexAttention only when compiled: eager flex materializes every (T, T) score matrix.
        use_flex = cu_seqlens.is_cuda and T % FLEX_BLOCK == 0 and torch.compiler.is_compiling()
        return packed_attention(self.config.parallax, cu_seqlens, T, self.layer_windows(window),
                                self.config.attn_scale, use_flex=use_flex, doc_ids=doc_ids)

    def forward(self, input_seq: Tensor, target_seq: Tensor | None = None, *, cu_seqlens: Tensor,
                window: int | None = None, doc_ids: Tensor | None = None):
        """Packed documents input_seq (T,) with boundaries cu_seqlens -> mean cross-entropy against
        target_seq, or the (T, vocab) logits when no targets are given. window: the long window (see
        layer_windows; default the last of training). doc_ids: document_ids(cu_seqlens, T), which a
        compiled softmax model needs as an input (see packed_attention)."""
        T = input_seq.numel()
        attend = self.packed_attention(cu_seqlens, T, window, doc_ids)
        rope = self.rotary.prefix(T, input_seq.device)
        logits = self.logits(self.hidden_states(input_seq[None], rope, attend)[0])
        if target_seq is None:
            return logits
        return F.cross_entropy(logits, target_seq)


# ----------------------------------------------------------------------------------------------
# Checkpoints (written and read by safeguards.py; here the model they rebuild)


def load_checkpoint(path: str) -> tuple:
    """(GPT on the CPU, the checkpoint dict); CheckpointError with one line on any problem."""
    payload = read_checkpoint(path)
    try:
        model = GPT(GPTConfig(**payload["model_config"]))
    except TypeError as err:
        raise CheckpointError(f"{path}: its model config does not fit this train_gpt.py's GPTConfig ({err})") from None
    if mismatch := state_dict_mismatch(model, payload["model"]):
        raise CheckpointError(f"{path}: does not match this train_gpt.py's model: {mismatch}")
    model.load_state_dict(payload["model"])
    return model, payload


def load_resume_checkpoint(hp: Hyperparameters, world_size: int) -> dict:
    """The checkpoint RESUME names, loaded and checked (see check_resumable) before anything is written."""
    return check_resumable(load_checkpoint(hp.resume)[1], hp, world_size)


# ----------------------------------------------------------------------------------------------
# Training


def make_optimizers(model: GPT, hp: Hyperparameters, device: torch.device):
    """Returns (optimizers, the params whose gradients the loop averages across ranks, the Muon or None).

    Muon averages its own parameters' gradients; under optimizer="adamw" the hidden matrices go to
    torch.optim.AdamW at adamw_lr with the Adam groups' betas and eps, everything else unchanged.
    Parallax's r gains get an Adam group at r_gain_lr, and W_r its matrix optimizer's rate x r_lr_mult."""
    from muon import build_optimizers

    # muon_check_finite: a host sync per step; training_loop stops on a non-finite loss instead
    adam, muon = build_optimizers(model, muon_lr=hp.muon_lr, embed_lr=hp.embed_lr, head_lr=hp.head_lr,
                                  scalar_lr=hp.scalar_lr, muon_momentum=hp.muon_momentum,
                                  weight_decay=hp.weight_decay, muon_check_finite=False)
    attentions = [block.attn for block in model.blocks]
    r_gains = [attn.r_gain for attn in attentions if attn.r_gain is not None]
    r_weights = [attn.r.weight for attn in attentions if attn.r is not None]
    regroup(adam, r_gains, hp.r_gain_lr)
    adam_params = [p for group in adam.param_groups for p in group["params"]]
    if hp.optimizer == "muon":
        regroup(muon, r_weights, hp.muon_lr * hp.r_lr_mult)
        return [adam, muon], adam_params, muon
    matrices = [p for group in muon.param_groups for p in group["params"]]
    adamw = torch.optim.AdamW(matrices, lr=hp.adamw_lr, betas=adam.defaults["betas"], eps=adam.defaults["eps"],
                              weight_decay=hp.weight_decay, fused=device.type == "cuda")
    adamw.param_groups[0]["initial_lr"] = hp.adamw_lr
    regroup(adamw, r_weights, hp.adamw_lr * hp.r_lr_mult)
    return [adam, adamw], adam_params + matrices, None


def regroup(optimizer: torch.optim.Optimizer, params: list, lr: float):
    """Move params (not stepped yet) out of their groups into one of their own at lr; no-op for none."""
    if not params:
        return
    moved = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in moved]
    optimizer.param_groups = [group for group in optimizer.param_groups if group["params"]]
    optimizer.add_param_group(dict(params=list(params), lr=lr, initial_lr=lr))


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


def configure_compile():
    """torch.compile keeps one graph per window stage, grad mode and batch shape: more than its default 8.
    The window reaches GPT.forward as a Python int: specialize on it (a graph per window stage, windows
    stay ints for the kernels) instead of turning it symbolic once it changes."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.specialize_int = True


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


# The code a training run executes: this file and the project modules it trains with.
LOGGED_SOURCES = ("train_gpt.py", "attention_inputs.py", "gpt2_data.py", "parallax_kernels.py",
                  "parallax_attn_triton.py", "parallax_reference.py", "muon.py", "safeguards.py", "generate.py",
                  "lm_head_fp8.py")


def open_run_log(hp: Hyperparameters, resumed: dict | None, master: bool) -> RunLog:
    """A new log with the header; a run resumed under its own name appends to its log instead."""
    path = run_paths(hp.run_name)[0]
    appending = resumed is not None and hp.run_name == resumed["hyperparameters"]["run_name"]
    log = RunLog(path if master else None, append=appending)
    if master:
        print(f"logging to {path}", flush=True)
    if not appending:
        write_log_header(log, hp, LOGGED_SOURCES)
    if resumed is not None:
        log.write(f"resumed from {hp.resume} at step {resumed['step']}", echo=True)
    return log


def skip_batches(batches, count: int):
    """Consume count batches: the loader is deterministic, so a resumed run's data position is its step."""
    for _ in itertools.islice(batches, count):
        pass


def training_device(hp: Hyperparameters, local_rank: int) -> torch.device:
    """This rank's GPU (made current), or the CPU when there is none or SMOKE=1 asks for it."""
    if not torch.cuda.is_available() or hp.smoke:
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def train(hp: Hyperparameters) -> int:
    """Run one training job (a torchrun worker, or a lone process without a process group); 0, 1 when the
    run diverged, 128 + the signal's number when interrupted (after saving a checkpoint)."""
    distributed = "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    check_hyperparameters(hp, world_size)
    device = training_device(hp, int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = device.type == "cuda"
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


class Trainer:
    """One rank's model, compiled step and optimizers: a training step, validation, the warm-up, and the
    checkpoints that resume them."""

    def __init__(self, hp: Hyperparameters, rank: int, world_size: int, device: torch.device):
        self.hp, self.rank, self.world_size, self.device = hp, rank, world_size, device
        self.grad_accum = hp.micro_batches // world_size
        torch.manual_seed(hp.seed)
        self.model = GPT(model_config(hp)).to(device)
        if device.type == "cuda":
            self.model.embeddings_to(torch.bfloat16)
        if world_size > 1:
            for param in self.model.parameters():
                dist.broadcast(param.detach(), 0)
        self.optimizers, self.averaged_params, self.muon = make_optimizers(self.model, hp, device)
        self.compiled = self.model
        if device.type == "cuda" and hp.compile:
            configure_compile()
            self.model.rotary.prefix(hp.seq_len, self.model.lm_head.weight.device)  # built before tracing
            self.compiled = torch.compile(self.model)

    def train_batches(self):
        hp = self.hp
        return distributed_data_generator(hp.train_files, hp.seq_len, self.rank, self.world_size,
                                          max_doc_len=hp.max_doc_len, device=self.device, vocab_size=hp.vocab_size)

    def loss(self, batch: Batch, step: int) -> Tensor:
        if self.compiled is not self.model:
            torch._dynamo.maybe_mark_dynamic(batch.cu_seqlens, 0)  # the number of documents changes every batch
        # Only softmax attention reads document ids (see packed_attention); Parallax takes cu_seqlens.
        doc_ids = None if self.model.config.parallax else document_ids(batch.cu_seqlens, batch.inputs.numel())
        return self.compiled(batch.inputs, batch.targets, cu_seqlens=batch.cu_seqlens,
                             window=window_at(step, self.hp), doc_ids=doc_ids)

    def train_step(self, step: int, batches) -> Tensor:
        """One optimizer step, queued without waiting for the device; returns the loss averaged over the
        global batch, a device scalar. The step is applied whatever the loss: the caller reads it (a
        host sync) and stops on a non-finite one before saving anything."""
        hp, model = self.hp, self.model
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(self.grad_accum):
            loss = self.loss(next(batches), step)
            (loss / self.grad_accum).backward()
            loss_sum += loss.detach()
        mean_loss = loss_sum / self.grad_accum
        all_reduce_mean_([mean_loss] + [p.grad for p in self.averaged_params if p.grad is not None],
                         self.world_size)
        multiplier = lr_multiplier(step, hp)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * multiplier
        if self.muon is not None:
            warmup = min(step / hp.muon_momentum_warmup_steps, 1) if hp.muon_momentum_warmup_steps else 1
            for group in self.muon.param_groups:
                group["momentum"] = (1 - warmup) * hp.muon_momentum_start + warmup * hp.muon_momentum
        for optimizer in self.optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        return mean_loss

    @torch.no_grad()
    def evaluate(self, step: int, max_batches=None) -> float:
        hp = self.hp
        batches = validation_batches(hp.val_files, hp.val_tokens, hp.seq_len, self.rank, self.world_size,
                                     device=self.device, vocab_size=hp.vocab_size)
        val_loss = torch.stack([self.loss(batch, step) for batch in itertools.islice(batches, max_batches)]).mean()
        all_reduce_mean_([val_loss], self.world_size)
        return val_loss.item()

    def warm_up(self, master: bool):
        """Compile every graph the run will use (a training step and a validation batch per window stage)
        on the first batches, outside the timed region; then restore the initial weights and optimizer
        states, as the records do."""
        initial_model = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
        initial_optimizers = [optimizer.state_dict() for optimizer in self.optimizers]
        batches = self.train_batches()
        first_batches = [next(batches) for _ in range(self.grad_accum)]
        stage_steps = {}  # window -> the first step that uses it (validation at the last step included)
        for step in range(self.hp.num_iterations + 1):
            stage_steps.setdefault(window_at(step, self.hp), step)
        start = time.perf_counter()
        for i, (window, step) in enumerate(stage_steps.items()):
            if master:
                print(f"warm-up: window {window} ({i + 1}/{len(stage_steps)}), {time.perf_counter() - start:.0f}s "
                      "so far", flush=True)
            self.train_step(step, iter(first_batches))
            self.evaluate(step, max_batches=1)
        self.model.load_state_dict(initial_model)
        for optimizer, state in zip(self.optimizers, initial_optimizers):
            optimizer.load_state_dict(state)
        synchronize(self.device)
        if master:
            print(f"warm-up done in {time.perf_counter() - start:.0f}s", flush=True)

    def optimizer_states(self) -> list | None:
        """Collective. On rank 0, per rank, the state dict of each optimizer (None on the other ranks).
        Muon's momentum is split over the ranks (see muon.py), so every rank's Muon state is kept; the
        other optimizers hold the same state on every rank and are kept from rank 0 only (None elsewhere).
        The r gains' and W_r's groups (see regroup) are ordinary groups of these state dicts, in an order
        that make_optimizers builds the same way every time."""
        local = [cpu_copy(optimizer.state_dict()) if optimizer is self.muon or self.rank == 0 else None
                 for optimizer in self.optimizers]
        if self.world_size == 1:
            return [local]
        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        return gathered

    def save(self, step: int, **training_state) -> str:
        """Collective: the resumable checkpoint of this step (the model, every rank's optimizer states and
        training_state), written by rank 0; returns its path."""
        states = self.optimizer_states()
        path = checkpoint_path(self.hp, step)
        if self.rank == 0:
            save_checkpoint(path, self.model, self.hp, step, dict(optimizers=states, **training_state))
        return path

    def restore(self, checkpoint: dict):
        """The model and optimizer states of a checkpoint that save wrote (after the warm-up, which restores
        the states it found)."""
        self.model.load_state_dict(checkpoint["model"])
        for i, optimizer in enumerate(self.optimizers):
            optimizer.load_state_dict(checkpoint["optimizers"][self.rank if optimizer is self.muon else 0][i])


def _train(hp: Hyperparameters, rank: int, world_size: int, device: torch.device, log: RunLog, resumed: dict | None,
           interrupts: InterruptRequests) -> int:
    master = rank == 0
    trainer = Trainer(hp, rank, world_size, device)
    model = trainer.model
    log.write(f"model: {sum(p.numel() for p in model.parameters()):,} parameters "
              f"({sum(p.numel() for p in model.blocks.parameters()):,} in the blocks); {hp.attention} attention, "
              f"MLP hidden {model.config.mlp_hidden}; {world_size} rank(s) x {trainer.grad_accum} micro-batches "
              f"of {hp.seq_len} tokens per step; device {device}", echo=True)
    if trainer.compiled is not model:
        trainer.warm_up(master)
    if resumed is not None:
        trainer.restore(resumed)
    status = training_loop(trainer, log, master, interrupts, resumed)
    if status == 0:
        allocated, reserved = peak_memory(device)
        log.write(f"peak memory allocated: {allocated // 2**20} MiB reserved: {reserved // 2**20} MiB", echo=True)
    return status


class StepEnd:
    """A queued step's loss on its way to the host and, on CUDA, an event at the step's end: waiting on the
    event waits for this step only. (Reading the loss tensor itself would also wait for every step queued
    after it, so a log line would carry the next step's time.)"""

    def __init__(self, loss: Tensor):
        self.loss, self.done = loss, None
        if loss.is_cuda:
            self.loss = torch.empty_like(loss, device="cpu", pin_memory=True)  # pinned: the copy does not block
            self.loss.copy_(loss, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()

    def wait(self) -> float:
        if self.done is not None:
            self.done.synchronize()
        return self.loss.item()


def training_loop(trainer: Trainer, log: RunLog, master: bool, interrupts: InterruptRequests,
                  resumed: dict | None) -> int:
    """Validate at step 0, every val_every steps and at the end, train num_iterations steps (from a
    resumed checkpoint's step on), checkpoint every save_every and at the end; the clock (train_time)
    stops for validation and checkpoints. 0 when done, 1 when the run diverged (see divergence) or the
    loss is not finite, 128 + the signal's number when interrupted (after checkpointing the step)."""
    hp, device = trainer.hp, trainer.device
    batches = trainer.train_batches()
    start_step = resumed["step"] if resumed else 0
    skip_batches(batches, start_step * trainer.grad_accum)  # the loader is deterministic
    untrained_val_loss = resumed["untrained_val_loss"] if resumed else None  # measured at step 0
    training_time_ms = resumed["train_time_ms"] if resumed else 0.0
    last_checkpoint = last_good_checkpoint = hp.resume or None
    no_checkpoint = "none saved (set SAVE_EVERY to keep some)"

    def save(step: int) -> str:
        return trainer.save(step, untrained_val_loss=untrained_val_loss, train_time_ms=training_time_ms)

    def logged(step: int, end: StepEnd) -> bool:
        """Reads a step's loss (waiting for the device to finish the step) and logs it with the time then;
        False after logging the stop when it is not finite."""
        loss = end.wait()
        elapsed_ms = training_time_ms + 1000 * (time.perf_counter() - t0)
        if not math.isfinite(loss):
            log.write(f"stopped: step:{step + 1}/{hp.num_iterations} train_loss:{loss} is not finite; stopping. Last "
                      f"good checkpoint: {last_checkpoint or no_checkpoint}", echo=True)
            return False
        log.write(f"step:{step + 1}/{hp.num_iterations} train_loss:{loss:.4f} train_time:{elapsed_ms:.0f}ms "
                  f"step_avg:{elapsed_ms / (step + 1):.2f}ms", echo=True)
        return True

    # A step's loss is read once the next step is queued, so the device never waits for the host; it is
    # read at once before anything that needs the step's result (validation, a checkpoint, the end).
    unread = None  # (step, StepEnd)
    synchronize(device)
    t0 = time.perf_counter()
    for step in range(start_step, hp.num_iterations + 1):
        last_step = step == hp.num_iterations
        if last_step or step == 0 or (hp.val_every > 0 and step % hp.val_every == 0):
            synchronize(device)
            training_time_ms += 1000 * (time.perf_counter() - t0)
            val_loss = trainer.evaluate(step)
            log.write(f"step:{step}/{hp.num_iterations} val_loss:{val_loss:.4f} train_time:{training_time_ms:.0f}ms "
                      f"step_avg:{training_time_ms / max(step, 1):.2f}ms", echo=True)
            if step == 0:
                untrained_val_loss = val_loss
            if why := divergence(step, val_loss, untrained_val_loss, hp.num_iterations):
                log.write(f"stopped: step:{step}/{hp.num_iterations} val_loss:{val_loss:.4f} {why}: diverged. Last "
                          f"good checkpoint: {last_good_checkpoint or no_checkpoint}", echo=True)
                return 1
            last_good_checkpoint = last_checkpoint
            synchronize(device)
            t0 = time.perf_counter()
        if last_step:
            path = save(step)
            if master:
                print(f"checkpoint: {path}", flush=True)
            return 0

        try:
            end = StepEnd(trainer.train_step(step, batches))
        except StopIteration:
            raise RuntimeError(f"{hp.train_files}: ran out of training tokens at step {step + 1}") from None
        if unread is not None and not logged(*unread):
            return 1
        unread = (step, end)
        saving = hp.save_every > 0 and (step + 1) % hp.save_every == 0 and step + 1 < hp.num_iterations
        signal_number = step + 1 < hp.num_iterations and interrupts.agreed(step + 1)
        validating = step + 1 == hp.num_iterations or (hp.val_every > 0 and (step + 1) % hp.val_every == 0)
        if saving or signal_number or validating:
            if not logged(*unread):
                return 1
            unread = None

        if saving:
            synchronize(device)
            training_time_ms += 1000 * (time.perf_counter() - t0)
            last_checkpoint = save(step + 1)
            t0 = time.perf_counter()
        if signal_number:
            synchronize(device)
            training_time_ms += 1000 * (time.perf_counter() - t0)
            path = last_checkpoint if last_checkpoint == checkpoint_path(hp, step + 1) else save(step + 1)
            log.write(f"stopped: step:{step + 1}/{hp.num_iterations} interrupted by "
                      f"{signal.Signals(signal_number).name}; saved {path}; continue with RESUME={path}", echo=True)
            return 128 + signal_number


def checkpoint_path(hp: Hyperparameters, step: int) -> str:
    return os.path.join(run_paths(hp.run_name)[1], f"state_step{step:06d}.pt")


def peak_memory(device: torch.device) -> tuple:
    """(allocated, reserved) peak bytes: the CUDA allocator's, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak, peak


# ----------------------------------------------------------------------------------------------
# Command line: train (no command) and sample


def sample_main(args) -> int:
    """The sample command: the checkpoint's model (load_checkpoint), then generate.sample_from."""
    try:
        model, checkpoint = load_checkpoint(args.checkpoint)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return sample_from(model, checkpoint, args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train the Parallax speedrun GPT (no command; run it under torchrun, "
                                                 "settings through environment variables), or sample from it.")
    commands = parser.add_subparsers(dest="command")
    add_sample_arguments(commands.add_parser("sample", help="generate text from a checkpoint"))
    args = parser.parse_args(argv)
    if args.command == "sample":
        if problem := sampling_arguments_problem(args):
            parser.error(problem)
        return sample_main(args)
    try:
        return train(hyperparameters_from_env(os.environ))
    except (ValueError, FileNotFoundError) as err:  # settings and data: one line says it
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
