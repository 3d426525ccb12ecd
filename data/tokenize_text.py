"""Turn any text into GPT-2 token shards that train_gpt.py reads (the format of the FineWeb shards).

    python data/tokenize_text.py notes/ books.jsonl --out-dir data/mytext --prefix mytext
    python data/tokenize_text.py corpus.jsonl --out-dir data/corpus --val-tokens 1048576 --bpe-file gpt2.tiktoken

Inputs are text files (one document each), folders (searched recursively for *.txt and *.md, one
document per file, and *.jsonl / *.json read as JSON lines), or JSON-lines files holding one
document per line in a string field (--text-field, default "text"). Every document becomes the
end-of-text token 50256 (it serves as BOS) followed by its GPT-2 tokens; documents are encoded as
ordinary text, so 50256 never occurs inside one.

The documents are shuffled with --seed; the first ones of that order form the validation split
(--val-fraction of the documents, or --val-tokens), the rest the train split. Shards hold whole
documents, at most --shard-tokens tokens each (a longer document gets a shard of its own), and are
named <prefix>_val_000000.bin, <prefix>_val_000001.bin, ... and <prefix>_train_000001.bin, ...
The output does not depend on --workers.
"""

import argparse
import json
import multiprocessing
import os
import sys
import time
from array import array
from typing import NamedTuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the data format's module
from gpt2_data import (BOS, HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, load_gpt2_encoding,  # noqa: E402
                       read_shard_header)

TEXT_SUFFIXES = (".txt", ".md")
JSON_LINES_SUFFIXES = (".jsonl", ".json")
WHOLE_FILE = -1  # document offset of a text file that is one document


class Documents(NamedTuple):
    """Where each document is: files[file_ids[i]] at byte offsets[i] (a JSON line) or the whole file."""
    files: list
    file_ids: array
    offsets: array


def find_documents(inputs):
    """Index the documents of files and folders (folders in sorted order, so the index is reproducible)."""
    files, file_ids, offsets = [], array("q"), array("q")
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names
                           if name.endswith(TEXT_SUFFIXES + JSON_LINES_SUFFIXES))
        elif os.path.isfile(path):
            found = [path]
        else:
            raise ValueError(f"{path}: no such file or folder")
        for file in found:
            files.append(file)
            if file.endswith(JSON_LINES_SUFFIXES):
                line_offsets = _json_line_offsets(file)
            else:
                line_offsets = [WHOLE_FILE]
            file_ids.extend([len(files) - 1] * len(line_offsets))
            offsets.extend(line_offsets)
    if not offsets:
        raise ValueError(f"no documents in {', '.join(inputs)} (folders are searched for "
                         f"{', '.join('*' + s for s in TEXT_SUFFIXES + JSON_LINES_SUFFIXES)})")
    return Documents(files, file_ids, offsets)


def _json_line_offsets(path):
    offsets, offset = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(offset)
            offset += len(line)
    return offsets


def read_document(path, offset, text_field="text"):
    """The text of one document: a whole file, or the text field of the JSON line at a byte offset."""
    with open(path, "rb") as f:
        if offset == WHOLE_FILE:
            try:
                return f.read().decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: not UTF-8 text ({err})") from None
        f.seek(offset)
        line = f.readline()
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{_line_name(f, offset)}: not a JSON line ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"{_line_name(f, offset)}: no string field {text_field!r} (choose one with --text-field)")
        return record[text_field]


def _line_name(f, offset):
    """'file line N' for the line at a byte offset (counted only for error messages)."""
    f.seek(0)
    line_number = f.read(offset).count(b"\n") + 1
    return f"{f.name} line {line_number}"


# Each worker process gets the encoding and the text field once, through the pool's initializer.
_worker_encoding = None
_worker_text_field = None


def _init_worker(encoding, text_field):
    global _worker_encoding, _worker_text_field
    _worker_encoding, _worker_text_field = encoding, text_field


def _encode_document(location):
    """[BOS] + tokens of one document as uint16, or None for an empty document (nothing to learn)."""
    text = read_document(*location, _worker_text_field)
    if not text:
        return None
    return np.array([BOS] + _worker_encoding.encode_ordinary(text), dtype="<u2")


def write_shard(path, tokens):
    """Write one shard atomically (temp file, then rename) and check it back; return its token count."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must fit in uint16, got {tokens.min()}..{tokens.max()}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    tmp_path = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp_path, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2").tobytes())
        os.replace(tmp_path, path)
    except BaseException:
        os.remove(tmp_path)
        raise
    written = read_shard_header(path)
    if written != tokens.size:
        raise ValueError(f"{path}: holds {written} tokens after writing {tokens.size}")
    return written


class ShardWriter:
    """Collects whole documents of one split and writes a shard whenever the next would overflow it."""

    def __init__(self, out_dir, prefix, split, first_index, shard_tokens):
        self.out_dir, self.prefix, self.split = out_dir, prefix, split
        self.next_index, self.shard_tokens = first_index, shard_tokens
        self.pending, self.pending_tokens = [], 0
        self.paths, self.num_tokens, self.num_documents = [], 0, 0

    def add(self, document):
        if self.pending and self.pending_tokens + len(document) > self.shard_tokens:
            self.flush()
        self.pending.append(document)
        self.pending_tokens += len(document)
        self.num_tokens += len(document)
        self.num_documents += 1

    def flush(self):
        if not self.pending:
            return
        path = os.path.join(self.out_dir, f"{self.prefix}_{self.split}_{self.next_index:06d}.bin")
        write_shard(path, np.concatenate(self.pending))
        print(f"wrote {path}: {self.pending_tokens:,} tokens, {len(self.pending):,} documents", flush=True)
        self.paths.append(path)
        self.next_index += 1
        self.pending, self.pending_tokens = [], 0


def tokenize_to_shards(inputs, out_dir, prefix="text", *, encoding, text_field="text", shard_tokens=100_000_000,
                       val_fraction=None, val_tokens=None, seed=0, workers=1, progress_every=2.0):
    """Encode the documents of `inputs` with `encoding` into val and train shards under out_dir.

    The validation split is the first documents of the seeded shuffle: round(val_fraction * documents)
    of them (at least one), or as many as it takes to reach val_tokens tokens. Give exactly one of the
    two. Returns {"val": [paths], "train": [paths]}.
    """
    if (val_fraction is None) == (val_tokens is None):
        raise ValueError("give exactly one of val_fraction and val_tokens")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if val_tokens is not None and val_tokens < 1:
        raise ValueError(f"val_tokens must be positive, got {val_tokens}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if encoding.max_token_value >= 2**16:
        raise ValueError(f"encoding {encoding.name} has token ids up to {encoding.max_token_value}; shards hold uint16")
    os.makedirs(out_dir, exist_ok=True)
    # Shards left from an earlier run would mix into the new ones through the loader's glob patterns.
    stale = sorted(name for name in os.listdir(out_dir)
                   if name.startswith((f"{prefix}_val_", f"{prefix}_train_")) and name.endswith(".bin"))
    if stale:
        raise ValueError(f"{out_dir} already holds {prefix} shards ({stale[0]}, ...); "
                         f"remove them or choose another prefix")

    documents = find_documents(inputs)
    num_documents = len(documents.offsets)
    order = np.random.default_rng(seed).permutation(num_documents)
    num_val_documents = max(1, round(val_fraction * num_documents)) if val_fraction is not None else None
    print(f"{num_documents:,} documents in {len(documents.files):,} files; encoding with {workers} worker(s)",
          flush=True)

    locations = ((documents.files[documents.file_ids[i]], documents.offsets[i]) for i in order)
    val = ShardWriter(out_dir, prefix, "val", 0, shard_tokens)
    train = ShardWriter(out_dir, prefix, "train", 1, shard_tokens)
    start = last_report = time.perf_counter()
    done = total_tokens = 0
    pool = multiprocessing.Pool(workers, _init_worker, (encoding, text_field)) if workers > 1 else None
    try:
        if pool is None:
            _init_worker(encoding, text_field)
            encoded = map(_encode_document, locations)
        else:
            encoded = pool.imap(_encode_document, locations, chunksize=64)  # imap keeps the shuffled order
        for tokens in encoded:
            done += 1
            if tokens is not None:
                in_val = val.num_documents < num_val_documents if val_tokens is None else val.num_tokens < val_tokens
                (val if in_val else train).add(tokens)
                total_tokens += len(tokens)
            now = time.perf_counter()
            if now - last_report >= progress_every or done == num_documents:
                last_report, elapsed = now, now - start
                print(f"{done:,}/{num_documents:,} documents, {total_tokens:,} tokens "
                      f"({done / elapsed:,.0f} documents/s, {total_tokens / elapsed:,.0f} tokens/s)", flush=True)
    finally:
        if pool is not None:
            pool.terminate()
    if val.num_documents == 0 or train.num_documents == 0:
        raise ValueError(f"the split left {val.num_documents} validation and {train.num_documents} train documents; "
                         f"both need at least one (adjust the validation size, or give more text)")
    val.flush()
    train.flush()
    print(f"val: {val.num_tokens:,} tokens, {val.num_documents:,} documents in {len(val.paths)} shard(s); "
          f"train: {train.num_tokens:,} tokens, {train.num_documents:,} documents in {len(train.paths)} shard(s)")
    return {"val": val.paths, "train": train.paths}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Tokenize text files, folders or JSON lines into GPT-2 token shards.")
    parser.add_argument("inputs", nargs="+", help="text files, folders, or JSON-lines files")
    parser.add_argument("--out-dir", required=True, help="folder for the shards")
    parser.add_argument("--prefix", default="text", help="shard name prefix (default: text)")
    parser.add_argument("--text-field", default="text", help="field of the JSON lines holding the text (default: text)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000,
                        help="tokens per shard at most (default: 100M)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, help="fraction of the documents for validation (default: 0.01)")
    split.add_argument("--val-tokens", type=int, help="validation documents until they hold this many tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document shuffle (default: 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="encoding processes (default: all cores)")
    parser.add_argument("--bpe-file",
                        help="local GPT-2 ranks file in tiktoken's format, to work offline (e.g. gpt2.tiktoken)")
    args = parser.parse_args(argv)
    if args.val_fraction is None and args.val_tokens is None:
        args.val_fraction = 0.01

    try:
        encoding = load_gpt2_encoding(args.bpe_file)
    except (OSError, ValueError) as err:
        if args.bpe_file is not None:
            print(f"error: cannot use --bpe-file: {err}", file=sys.stderr)
            return 1
        # any failure to fetch tiktoken's GPT-2 files (network, proxy, cache) has the same remedies
        print(f"error: cannot load tiktoken's GPT-2 encoding ({type(err).__name__}); offline, pass --bpe-file PATH "
              f"to a GPT-2 ranks file in tiktoken's format (e.g. whisper/assets/gpt2.tiktoken of the openai-whisper "
              f"source distribution), or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached GPT-2 files",
              file=sys.stderr)
        return 1
    try:
        tokenize_to_shards(args.inputs, args.out_dir, args.prefix, encoding=encoding, text_field=args.text_field,
                           shard_tokens=args.shard_tokens, val_fraction=args.val_fraction, val_tokens=args.val_tokens,
                           seed=args.seed, workers=max(1, args.workers))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
