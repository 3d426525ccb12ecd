"""Random-token shards whose documents have FineWeb-like lengths (bench.attention's fineweb_like_doc_lens:
log-normal, mean 762, clipped to [16, 4096]), to time the step on FineWeb's document lengths.

    python fineweb_like_shards.py OUT_DIR
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.getcwd())
from bench.attention import fineweb_like_doc_lens  # noqa: E402
from data.tokenize_text import write_shard  # noqa: E402
from gpt2_data import BOS  # noqa: E402

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(0)
for seed, (name, n) in enumerate((("fwlike_train_000001.bin", 20_000_000), ("fwlike_val_000000.bin", 1_100_000))):
    tokens = rng.integers(0, 50000, n).astype(np.uint16)
    starts = np.cumsum([0] + fineweb_like_doc_lens(n, seed=seed)[:-1])
    tokens[starts] = BOS  # each document starts with it
    write_shard(os.path.join(out, name), tokens)
    print(name, n, "tokens,", len(starts), "documents, mean", n // len(starts))
