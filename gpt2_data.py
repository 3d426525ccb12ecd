"""The token data format, stated once for train_gpt.py (whose logs carry this file) and the data/
scripts: GPT-2's tokenizer and the modded-nanoGPT shard; and the shard reading under train_gpt.py's
loader (checked shards, the token stream over a list of them).

A shard is 256 little-endian int32 of header, [0] = 20240520 (magic), [1] = 1 (version), [2] = the
token count, the rest 0; then that many uint16 GPT-2 token ids. Every document starts with BOS.
"""
import glob
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

BOS = 50256  # GPT-2's <|endoftext|>: every document starts with it
GPT2_VOCAB = 50257
# GPT-2's pre-tokenizer split (from its encoder.py); tiktoken's "gpt2" uses an equivalent, faster form.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
DATA_HINT = ("fetch FineWeb with `python data/cached_fineweb10B.py`, or point TRAIN_FILES / VAL_FILES "
             "at your shards")


def read_shard_header(path) -> int:
    """Check a shard's header against its size; return its token count (ValueError naming the file and
    the problem: bad magic, wrong version, truncated, or too long for the announced token count)."""
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
        raise ValueError(f"{path}: too long: {size - expected} trailing bytes after the {num_tokens} tokens "
                         "its header announces")
    return num_tokens


def load_shard(path, pin_memory=False, vocab_size: int | None = None) -> Tensor:
    """The uint16 tokens of one shard (its header checked by read_shard_header); with vocab_size, every
    token id must be below it (an embedding lookup would fail mid-run)."""
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


def check_enough_tokens(pattern: str, needed: int, what: str):
    available = sum(read_shard_header(f) for f in shard_files(pattern))
    if available < needed:
        raise ValueError(f"{pattern}: {available:,} tokens, but {what} needs {needed:,}")


def load_gpt2_encoding(bpe_file=None):
    """GPT-2's encoding from tiktoken (which downloads and caches its files once), or built offline
    from a local GPT-2 ranks file in tiktoken's format (such as gpt2.tiktoken)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    if bpe_file is None:
        return tiktoken.get_encoding("gpt2")
    encoding = tiktoken.Encoding("gpt2", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=load_tiktoken_bpe(bpe_file),
                                 special_tokens={"<|endoftext|>": BOS})
    if encoding.n_vocab != GPT2_VOCAB or encoding.encode_ordinary("Hello world") != [15496, 995]:
        raise ValueError(f"{bpe_file}: not GPT-2's BPE ranks ({encoding.n_vocab} tokens; GPT-2 has {GPT2_VOCAB})")
    return encoding
