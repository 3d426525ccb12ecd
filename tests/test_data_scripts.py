"""data/: the shard header check, the text tokenizer (round trip) and the FineWeb downloader (no network)."""

import base64
import json
import os
import shutil
import sys

import numpy as np
import pytest
import tiktoken

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
import cached_fineweb10B as fineweb  # noqa: E402
import tokenize_text  # noqa: E402
from gpt2_data import BOS, GPT2_SPLIT_PATTERN, HEADER_BYTES, read_shard_header  # noqa: E402


def tiny_encoding(pattern=GPT2_SPLIT_PATTERN):
    """A byte-level BPE with GPT-2's split pattern and end-of-text id, small enough to build in a test."""
    ranks = {bytes([i]): i for i in range(256)}
    for merged in (b"th", b"the", b" t", b" the", b"in", b"ing", b"er", b" d", b"oc"):
        ranks[merged] = len(ranks)
    return tiktoken.Encoding("tiny", pat_str=pattern, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": BOS})


def read_shard_tokens(path):
    return np.fromfile(path, dtype="<u2", offset=HEADER_BYTES)


def shard_documents(path, encoding):
    tokens = read_shard_tokens(path)
    assert tokens[0] == BOS, f"{path} does not start with BOS"
    starts = list(np.flatnonzero(tokens == BOS)) + [len(tokens)]
    return [encoding.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts[:-1], starts[1:])]


# ---- the header check ----

def test_read_header_accepts_a_written_shard(tmp_path):
    path = str(tmp_path / "ok.bin")
    assert tokenize_text.write_shard(path, [BOS, 1, 2, 65535]) == 4
    assert read_shard_header(path) == 4
    assert read_shard_tokens(path).tolist() == [BOS, 1, 2, 65535]
    assert [name for name in os.listdir(tmp_path)] == ["ok.bin"]  # no temp file left behind


@pytest.mark.parametrize("damage, problem", [
    (lambda header, body: (np.r_[1234, header[1:]], body), "bad magic"),
    (lambda header, body: (np.r_[header[:1], 2, header[2:]], body), "wrong version"),
    (lambda header, body: (header, body[:-2]), "truncated"),
    (lambda header, body: (header, body + b"\0\0"), "too long"),
    (lambda header, body: (header[:100], b""), "truncated"),
])
def test_read_header_rejects_damaged_shards(tmp_path, damage, problem):
    good = str(tmp_path / "good.bin")
    tokenize_text.write_shard(good, np.arange(10))
    with open(good, "rb") as f:
        header, body = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4"), f.read()
    header, body = damage(header, body)
    bad = str(tmp_path / "damaged_shard.bin")
    with open(bad, "wb") as f:
        f.write(header.astype("<i4").tobytes() + body)
    with pytest.raises(ValueError, match=problem) as err:
        read_shard_header(bad)
    assert "damaged_shard.bin" in str(err.value)


def test_write_shard_rejects_ids_beyond_uint16(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        tokenize_text.write_shard(str(tmp_path / "x.bin"), [1, 70000])


# ---- the tokenizer ----

@pytest.fixture
def corpus(tmp_path):
    """Text and markdown files in nested folders, a JSON-lines file, and files to be left out."""
    root = tmp_path / "corpus"
    (root / "notes" / "deep").mkdir(parents=True)
    documents = {
        "notes/a.txt": "the thing in the thermos\nis ringing.\n",
        "notes/deep/b.md": "# Title\n\nThe doc says: <|endoftext|> is just text here. Ünïcödé ✓ 日本\r\n",
        "notes/c.txt": "   leading spaces, trailing tabs\t\t",
    }
    for name, text in documents.items():
        (root / name).write_bytes(text.encode("utf-8"))
    (root / "notes" / "skip.csv").write_text("not,a,document\n")
    (root / "notes" / "empty.txt").write_text("")  # nothing to learn: dropped
    lines = [f"doc {i}: the {'inner ' * (i % 7)}thing ending {i}." for i in range(40)]
    lines += ["", "a \"quoted\"\nmulti-line"]
    with open(root / "lines.jsonl", "w") as f:
        for text in lines:
            f.write(json.dumps({"id": len(text), "text": text}) + "\n")
        f.write("\n")  # blank lines are not documents
    return root, list(documents.values()) + [text for text in lines if text]


def test_tokenizer_round_trip(corpus, tmp_path, capsys):
    root, expected = corpus
    out = tmp_path / "shards"
    encoding = tiny_encoding()
    shards = tokenize_text.tokenize_to_shards([str(root)], str(out), "corpus", encoding=encoding, shard_tokens=200,
                                              val_fraction=0.1, seed=3)
    assert [os.path.basename(p) for p in shards["val"]] == ["corpus_val_000000.bin"]
    assert [os.path.basename(p) for p in shards["train"]][:2] == ["corpus_train_000001.bin", "corpus_train_000002.bin"]
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in shards["val"] + shards["train"])

    val = [doc for path in shards["val"] for doc in shard_documents(path, encoding)]
    train = [doc for path in shards["train"] for doc in shard_documents(path, encoding)]
    assert len(val) == round(0.1 * (len(expected) + 2))  # the empty documents count in the fraction
    assert sorted(val + train) == sorted(expected)  # every document exactly once, byte for byte
    for path in shards["val"] + shards["train"]:
        tokens = read_shard_tokens(path)
        assert read_shard_header(path) == len(tokens)
        assert len(tokens) <= 200 or np.count_nonzero(tokens == BOS) == 1  # whole documents, within the cap
    assert "documents/s" in capsys.readouterr().out


def test_tokenizer_is_deterministic_and_independent_of_workers(corpus, tmp_path):
    root, _ = corpus
    outputs = {}
    for name, seed, workers in (("one", 5, 1), ("two", 5, 2), ("other_seed", 6, 1)):
        shards = tokenize_text.tokenize_to_shards([str(root)], str(tmp_path / name), encoding=tiny_encoding(),
                                                  shard_tokens=300, val_fraction=0.2, seed=seed, workers=workers)
        outputs[name] = [open(path, "rb").read() for path in shards["val"] + shards["train"]]
    assert outputs["one"] == outputs["two"]
    assert outputs["one"] != outputs["other_seed"]


def test_tokenizer_val_tokens_and_text_field(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    texts = [f"the document {i} " * (i + 1) for i in range(30)]
    jsonl.write_text("".join(json.dumps({"body": text}) + "\n" for text in texts))
    encoding = tiny_encoding()
    shards = tokenize_text.tokenize_to_shards([str(jsonl)], str(tmp_path / "out"), encoding=encoding,
                                              text_field="body", val_tokens=500, seed=0)
    val_docs = shard_documents(shards["val"][0], encoding)
    val_lengths = [1 + len(encoding.encode_ordinary(doc)) for doc in val_docs]
    assert sum(val_lengths) >= 500 > sum(val_lengths[:-1])  # documents until the budget is reached, no more
    train_docs = [doc for path in shards["train"] for doc in shard_documents(path, encoding)]
    assert sorted(val_docs + train_docs) == sorted(texts)


def test_tokenizer_errors_name_the_problem(tmp_path, corpus):
    root, _ = corpus
    encoding = tiny_encoding()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3: not a JSON line"):
        tokenize_text.tokenize_to_shards([str(bad)], str(tmp_path / "o1"), encoding=encoding, val_fraction=0.3)
    with pytest.raises(ValueError, match="no string field 'body'"):
        tokenize_text.tokenize_to_shards([str(root / "lines.jsonl")], str(tmp_path / "o2"), encoding=encoding,
                                         text_field="body", val_fraction=0.1)
    with pytest.raises(ValueError, match="no such file or folder"):
        tokenize_text.tokenize_to_shards([str(tmp_path / "nowhere")], str(tmp_path / "o3"), encoding=encoding,
                                         val_fraction=0.1)
    one = tmp_path / "one.txt"
    one.write_text("a single document")
    with pytest.raises(ValueError, match="both need at least one"):
        tokenize_text.tokenize_to_shards([str(one)], str(tmp_path / "o4"), encoding=encoding, val_fraction=0.1)
    tokenize_text.tokenize_to_shards([str(root)], str(tmp_path / "o5"), encoding=encoding, val_fraction=0.1)
    with pytest.raises(ValueError, match="already holds text shards"):  # old shards would mix with new ones
        tokenize_text.tokenize_to_shards([str(root)], str(tmp_path / "o5"), encoding=encoding, val_fraction=0.1)


def test_gpt2_split_pattern_matches_tiktokens():
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    ours, theirs = tiny_encoding(), tiny_encoding(openai_public.r50k_pat_str)
    text = ("The thing's   in  there; they'll say 'ok' -- 1234 apples\n\n\t  don't\r\n ünïcode 日本語 "
            "x  \n  end   ")
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)


def test_main_explains_how_to_work_offline(tmp_path, capsys, monkeypatch):
    def unreachable(name):
        raise ConnectionError("Failed to resolve host")

    monkeypatch.setattr(tiktoken, "get_encoding", unreachable)
    (tmp_path / "a.txt").write_text("text")
    assert tokenize_text.main([str(tmp_path / "a.txt"), "--out-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--bpe-file" in err and "TIKTOKEN_CACHE_DIR" in err and "gpt2.tiktoken" in err

    # A ranks file in tiktoken's format that is not GPT-2's is refused, in one line.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file directly, cache nothing
    ranks_file = tmp_path / "tiny.tiktoken"
    ranks_file.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    assert tokenize_text.main([str(tmp_path / "a.txt"), "--out-dir", str(tmp_path / "out"),
                               "--bpe-file", str(ranks_file)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not GPT-2's BPE ranks" in err


def test_main_end_to_end(corpus, tmp_path, monkeypatch):
    root, expected = corpus
    monkeypatch.setattr(tokenize_text, "load_gpt2_encoding", lambda bpe_file=None: tiny_encoding())
    out = tmp_path / "out"
    assert tokenize_text.main([str(root), "--out-dir", str(out), "--prefix", "mine", "--val-tokens", "50",
                               "--workers", "1"]) == 0
    names = sorted(os.listdir(out))
    assert names[0] == "mine_train_000001.bin" and names[-1] == "mine_val_000000.bin"
    docs = [doc for name in names for doc in shard_documents(str(out / name), tiny_encoding())]
    assert sorted(docs) == sorted(expected)


# ---- the downloader, with the hub replaced ----

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """hf_hub_download replaced by a copy of a small valid shard; records the files asked for."""
    source = str(tmp_path / "source.bin")
    tokenize_text.write_shard(source, [BOS, 10, 11, 12])
    calls = []

    def fake_download(repo_id, filename, *, repo_type, local_dir):
        assert (repo_id, repo_type) == ("kjj0/fineweb10B-gpt2", "dataset")
        calls.append(filename)
        shutil.copy(source, os.path.join(local_dir, filename))
        return os.path.join(local_dir, filename)

    monkeypatch.setattr(fineweb, "hf_hub_download", fake_download)
    return calls


def test_download_fetches_val_and_train_shards(hub, tmp_path):
    out = tmp_path / "fineweb"
    assert fineweb.main(["2", "--dir", str(out)]) == 0
    assert hub == ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert all(read_shard_header(str(out / name)) == 4 for name in hub)
    assert fineweb.DEFAULT_DIR == os.path.join(os.path.dirname(os.path.abspath(fineweb.__file__)), "fineweb10B")


def test_download_skips_complete_files_and_replaces_corrupt_ones(hub, tmp_path, capsys):
    out = tmp_path / "fineweb"
    out.mkdir()
    tokenize_text.write_shard(str(out / "fineweb_val_000000.bin"), [BOS, 1, 2])
    tokenize_text.write_shard(str(out / "fineweb_train_000001.bin"), [BOS, 1, 2])
    tokenize_text.write_shard(str(out / "fineweb_train_000002.bin"), [BOS, 1, 2, 3, 4])
    with open(out / "fineweb_train_000002.bin", "r+b") as f:
        f.truncate(HEADER_BYTES + 4)  # an interrupted copy
    assert fineweb.main(["2", "--dir", str(out)]) == 0
    assert hub == ["fineweb_train_000002.bin"]
    assert read_shard_header(str(out / "fineweb_val_000000.bin")) == 3  # kept, not replaced
    assert read_shard_header(str(out / "fineweb_train_000002.bin")) == 4
    assert "truncated" in capsys.readouterr().out


@pytest.mark.parametrize("error", [
    fineweb.LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub..."),
    ConnectionError("[Errno -2] Name or service not known"),
    TimeoutError("timed out"),
])
def test_download_without_network_says_so_in_one_line(tmp_path, monkeypatch, capsys, error):
    def unreachable(*args, **kwargs):
        raise error

    monkeypatch.setattr(fineweb, "hf_hub_download", unreachable)
    assert fineweb.main(["--dir", str(tmp_path / "fineweb")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "unreachable" in err and "TRAIN_FILES" in err and "VAL_FILES" in err


def test_download_rejects_a_corrupt_arrival(tmp_path, monkeypatch, capsys):
    def corrupt_download(repo_id, filename, *, repo_type, local_dir):
        with open(os.path.join(local_dir, filename), "wb") as f:
            f.write(b"<html>proxy error</html>")

    monkeypatch.setattr(fineweb, "hf_hub_download", corrupt_download)
    assert fineweb.main(["0", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fineweb_val_000000.bin" in err and "truncated" in err
