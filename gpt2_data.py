"""The token data format, stated once for train_gpt.py (whose logs carry this file) and the data/
scripts: GPT-2's tokenizer and the modded-nanoGPT shard.

A shard is 256 little-endian int32 of header, [0] = 20240520 (magic), [1] = 1 (version), [2] = the
token count, the rest 0; then that many uint16 GPT-2 token ids. Every document starts with BOS.
"""
import os

import numpy as np

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
