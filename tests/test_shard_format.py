"""The token shard format, pinned byte for byte, and a shard written by data/tokenize_text.py read back
through train_gpt.py's loader."""
import os
import struct
import sys

import numpy as np
import torch

import gpt2_data
import train_gpt as tg

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
import cached_fineweb10B as fineweb  # noqa: E402
import tokenize_text  # noqa: E402
from test_data_scripts import tiny_encoding  # noqa: E402  (a small BPE: tiktoken cannot download here)

# modded-nanoGPT's format: 256 little-endian int32 (magic, version, token count, zeros), then uint16 tokens
MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256


def test_format_constants_are_pinned():
    """gpt2_data states the format once; train_gpt.py and the data scripts read and write through it."""
    assert (gpt2_data.SHARD_MAGIC, gpt2_data.SHARD_VERSION, gpt2_data.HEADER_INTS, gpt2_data.HEADER_BYTES) == \
        (MAGIC, VERSION, HEADER_INTS, 4 * HEADER_INTS)
    assert fineweb.read_shard_header is gpt2_data.read_shard_header
    assert tg.BOS == tokenize_text.BOS == 50256  # GPT-2's end-of-text begins every document


def hand_written_shard(path, tokens):
    """A shard built with struct, from the format's description alone."""
    header = struct.pack("<256i", MAGIC, VERSION, len(tokens), *([0] * 253))
    path.write_bytes(header + struct.pack(f"<{len(tokens)}H", *tokens))


def test_a_hand_written_shard_reads_in_both_readers(tmp_path):
    tokens = [50256, 0, 1, 65535, 50256, 300]
    hand_written_shard(tmp_path / "hand.bin", tokens)
    assert gpt2_data.read_shard_header(tmp_path / "hand.bin") == len(tokens)
    assert gpt2_data.load_shard(tmp_path / "hand.bin").tolist() == tokens
    assert fineweb.read_shard_header(str(tmp_path / "hand.bin")) == len(tokens)


def test_tokenize_text_writes_the_format_byte_for_byte(tmp_path):
    tokens = [50256, 7, 65535, 0, 1234]
    path = tmp_path / "written.bin"
    tokenize_text.write_shard(str(path), tokens)
    raw = path.read_bytes()
    assert len(raw) == 4 * HEADER_INTS + 2 * len(tokens)
    assert struct.unpack("<3i", raw[:12]) == (MAGIC, VERSION, len(tokens))
    assert raw[12:4 * HEADER_INTS] == bytes(4 * HEADER_INTS - 12)
    assert list(struct.unpack(f"<{len(tokens)}H", raw[4 * HEADER_INTS:])) == tokens


def test_tokenized_text_trains_through_the_loader(tmp_path):
    """Text -> tokenize_text.py's shards -> train_gpt.py's loader: every batch holds the tokens of the
    documents in order, each starting with BOS, and the batch boundaries follow the documents."""
    root = tmp_path / "corpus"
    root.mkdir()
    documents = [f"the {i}th thing in the doc, ringing {'ing ' * (i % 5)}" for i in range(30)]
    for i, text in enumerate(documents):
        (root / f"doc{i:02d}.txt").write_text(text)
    encoding = tiny_encoding()
    shards = tokenize_text.tokenize_to_shards([str(root)], str(tmp_path / "shards"), "corpus", encoding=encoding,
                                              shard_tokens=400, val_fraction=0.1, seed=0, workers=1)
    assert len(shards["train"]) >= 2  # the loader crosses a shard boundary

    def decoded(tokens):
        assert tokens[0] == tg.BOS
        return [encoding.decode(p[1:].tolist()) for p in np.split(tokens, np.flatnonzero(tokens == tg.BOS)[1:])]
    stream = torch.cat([gpt2_data.load_shard(p) for p in shards["train"]]).numpy()
    val = torch.cat([gpt2_data.load_shard(p) for p in shards["val"]]).numpy()
    assert sorted(decoded(stream) + decoded(val)) == sorted(documents)  # every document, once, intact

    pattern = str(tmp_path / "shards" / "corpus_train_*.bin")
    assert sorted(gpt2_data.shard_files(pattern)) == sorted(shards["train"])
    gpt2_data.check_enough_tokens(pattern, len(stream), "the test")
    seq_len = 64
    served = list(tg.distributed_data_generator(pattern, seq_len, rank=0, world_size=1))
    assert len(served) == (len(stream) - 1) // seq_len
    for n, batch in enumerate(served):
        window = stream[n * seq_len:(n + 1) * seq_len + 1]
        assert batch.inputs.tolist() == window[:-1].tolist()
        assert batch.targets.tolist() == window[1:].tolist()
        starts = [0] + [i for i in np.flatnonzero(window[:-1] == tg.BOS).tolist() if i > 0]
        assert batch.cu_seqlens.tolist() == starts + [seq_len]
