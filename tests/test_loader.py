"""The shard reader (gpt2_data.py) and the distributed loader of train_gpt.py, on synthetic shards written here."""
import itertools

import numpy as np
import pytest
import torch

import train_gpt as tg
from gpt2_data import SHARD_MAGIC, SHARD_VERSION, load_shard


def write_shard(path, tokens, *, magic=SHARD_MAGIC, version=SHARD_VERSION, count=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def unique_token_corpus(num_tokens, seed):
    """Documents (BOS + 5 to 300 tokens) whose non-BOS tokens are all distinct: where every served token
    came from is unambiguous."""
    rng = np.random.default_rng(seed)
    tokens, next_id = [], 0
    while len(tokens) < num_tokens:
        length = int(rng.integers(5, 300))
        ids = [(next_id + i) % tg.BOS for i in range(length)]
        next_id += length
        tokens += [tg.BOS] + ids
    return np.array(tokens[:num_tokens])


@pytest.fixture
def two_shards(tmp_path):
    """A 3,000-token shard then a 9,000-token one (batches span the boundary), and their stream."""
    stream = unique_token_corpus(12_000, seed=1)
    write_shard(tmp_path / "toy_000001.bin", stream[:3000])
    write_shard(tmp_path / "toy_000002.bin", stream[3000:])
    return str(tmp_path / "toy_*.bin"), stream


def test_load_shard_reads_tokens(tmp_path):
    tokens = unique_token_corpus(1000, seed=0)
    write_shard(tmp_path / "ok.bin", tokens)
    loaded = load_shard(tmp_path / "ok.bin")
    assert loaded.dtype == torch.uint16
    assert np.array_equal(loaded.numpy(), tokens)


@pytest.mark.parametrize("problem, write, message", [
    ("bad magic", lambda p: write_shard(p, [1, 2, 3], magic=12345), "bad magic"),
    ("wrong version", lambda p: write_shard(p, [1, 2, 3], version=2), "wrong version"),
    ("truncated tokens", lambda p: write_shard(p, [1, 2, 3], count=4), "truncated"),
    ("truncated header", lambda p: p.write_bytes(b"\0" * 100), "truncated"),
    ("trailing bytes", lambda p: write_shard(p, [1, 2, 3], count=2), "trailing bytes"),
])
def test_bad_shards_are_rejected_naming_the_file(tmp_path, problem, write, message):
    path = tmp_path / "broken_shard.bin"
    write(path)
    with pytest.raises(ValueError, match=message) as err:
        load_shard(path)
    assert str(path) in str(err.value), problem


def test_missing_shard_says_how_to_get_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="cached_fineweb10B.py") as err:
        load_shard(tmp_path / "nowhere.bin")
    assert "nowhere.bin" in str(err.value)
    with pytest.raises(FileNotFoundError, match="TRAIN_FILES"):
        next(tg.distributed_data_generator(str(tmp_path / "none_*.bin"), 128, 0, 1))


def one_pass(pattern, seq_len, world_size, **kwargs):
    """Every rank's batches until the data runs out: {rank: [Batch, ...]}."""
    return {rank: list(tg.distributed_data_generator(pattern, seq_len, rank, world_size, **kwargs))
            for rank in range(world_size)}


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_get_disjoint_tokens_none_invented(two_shards, world_size):
    pattern, stream = two_shards
    seq_len = 256
    batches = one_pass(pattern, seq_len, world_size)
    steps = (len(stream) - 1) // (world_size * seq_len)
    assert all(len(b) == steps for b in batches.values())
    served = []
    for step in range(steps):
        for rank in range(world_size):
            batch = batches[rank][step]
            start = (step * world_size + rank) * seq_len  # where this rank's tokens sit in the stream
            assert batch.inputs.dtype == torch.int32 and batch.targets.dtype == torch.int64
            assert np.array_equal(batch.inputs.numpy(), stream[start:start + seq_len])
            assert np.array_equal(batch.targets.numpy(), stream[start + 1:start + seq_len + 1])  # shifted by one
            served.append(batch.inputs.numpy())
    served = np.concatenate(served)
    content = served[served != tg.BOS]
    assert len(np.unique(content)) == len(content), "a token was served twice"
    assert set(content) <= set(stream), "a token was invented"
    assert len(served) == steps * world_size * seq_len


def test_every_world_size_sees_the_same_micro_batches(two_shards):
    """The global batch: micro-batch i of a step is the same tokens at world sizes 1, 2 and 4."""
    pattern, _ = two_shards
    orders = []
    for world_size in (1, 2, 4):
        batches = one_pass(pattern, 256, world_size)
        steps = min(len(b) for b in batches.values())
        orders.append(torch.cat([batches[r][s].inputs for s in range(steps) for r in range(world_size)]))
    shortest = min(len(o) for o in orders)
    assert all(torch.equal(o[:shortest], orders[0][:shortest]) for o in orders)


def test_cu_seqlens_mark_exactly_the_document_starts(two_shards):
    pattern, _ = two_shards
    for batch in itertools.chain(*one_pass(pattern, 384, 2).values()):
        bos = set(torch.nonzero(batch.inputs == tg.BOS).flatten().tolist())
        cu = batch.cu_seqlens
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 384
        assert (torch.diff(cu) > 0).all()
        assert set(cu[1:-1].tolist()) | {0} == bos | {0}  # a document cut at the start is a segment of its own


def test_max_doc_len_splits_long_documents(two_shards):
    pattern, _ = two_shards
    for batch in itertools.chain(*one_pass(pattern, 512, 1, max_doc_len=64).values()):
        cu = batch.cu_seqlens.tolist()
        lengths = np.diff(cu)
        assert lengths.max() <= 64 and lengths.min() > 0
        bos = torch.nonzero(batch.inputs == tg.BOS).flatten().tolist()
        assert set(bos) <= set(cu)
        # splits only where a document is longer than the cap: each piece but a document's last is 64 long
        starts = sorted(set(bos) | {0, 512})
        for a, b in zip(starts, starts[1:]):
            pieces = [c for c in cu if a <= c <= b]
            assert pieces == list(range(a, b, 64)) + [b]


def test_loader_is_deterministic(two_shards):
    pattern, _ = two_shards
    first, second = (list(itertools.islice(tg.distributed_data_generator(pattern, 256, 1, 2), 5)) for _ in range(2))
    for a, b in zip(first, second):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_validation_budget(two_shards):
    pattern, stream = two_shards
    batches = list(tg.validation_batches(pattern, 4096, 256, 1, 2))
    assert len(batches) == 4096 // (2 * 256)
    assert np.array_equal(batches[0].inputs.numpy(), stream[256:512])
    with pytest.raises(ValueError, match="multiple of world_size"):
        tg.validation_batches(pattern, 4000, 256, 0, 2)
