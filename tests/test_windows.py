"""Sliding windows whose edge falls exactly on, one before and one after a tile boundary, in every kernel
(forward, dQ/dR, dK/dV, Triton decode, CuTe DSL decode), at non-default scales, against the reference.

The tile sizes come from the kernel modules, so the windows follow the tiles the kernels really run
(the interpreter's small tiles on the CPU, the tuned ones on the GPU)."""
import pytest
import torch

import parallax_attn_triton
import parallax_decode
from parallax_decode import parallax_decode_triton
from test_decode import make_inputs, reference, rel_error
from test_parallax_kernels import check_against_reference

CUDA = torch.cuda.is_available()
HOPPER = CUDA and torch.cuda.get_device_capability()[0] == 9
KERNELS = ("fwd", "dq", "dkdv")
TILES = {name: parallax_attn_triton._tile(name) for name in KERNELS}
# scale multiplies q.k only; its default is D**-0.5 (0.125 at D = 64, 0.088 at D = 128). Training uses 0.12
# (QK-normed heads, D = 128); at D = 64 a scale far from 0.125 makes ignoring it plainly visible.
SCALE = {64: 0.3, 128: 0.12}


def edge_windows(block, multiples):
    """Windows w = c * block + e, e in 0..3, for each c in multiples.

    Query i sees keys i - w < j <= i. In the forward and dQ/dR kernels (query blocks of BLOCK_M rows,
    key tiles of BLOCK_N), the first row of a block has its first key on a key-tile boundary when
    w = 1 (mod BLOCK_N), the last row when w = 0; e = 0..3 puts those edges on, one before and one after a
    boundary. In the dK/dV kernel (key blocks, query tiles of BLOCK_M) the last query that sees a block's
    last key is w - 1 rows below it: the last row of a query tile when w = 1 (mod BLOCK_M), the first row
    of the next one when w = 2, the second when w = 3."""
    return sorted({c * block + e for c in multiples for e in range(4)})


def training_windows(multiples):
    blocks = {TILES[name][key] for name in KERNELS for key in ("BLOCK_M", "BLOCK_N")}
    return sorted({w for block in blocks for w in edge_windows(block, multiples)})


def test_edge_windows_straddle_every_tile_boundary():
    """The windows land each kernel's edge on, just before and just after its tiles' boundaries."""
    for name in KERNELS:
        for key in ("BLOCK_M", "BLOCK_N"):
            block = TILES[name][key]
            residues = {w % block for w in training_windows((1,))}
            assert {0, 1, 2, 3} <= residues, (name, key, block)
    assert TILES["dq"]["BLOCK_N"] % TILES["dq"]["BLOCK_M"] == 0 or \
        TILES["dq"]["BLOCK_M"] % TILES["dq"]["BLOCK_N"] == 0


# -- the training kernels on the CPU (interpreter, fp16) ---------------------------------------------

CPU_WINDOWS = training_windows((1, 2))  # 16..19 and 32..35 with the interpreter's 16-row tiles


@pytest.mark.skipif(CUDA, reason="CPU interpreter case; the GPU runs its own")
@pytest.mark.parametrize("window", CPU_WINDOWS)
def test_window_edges_cpu(window):
    # long enough that later query blocks have their whole window inside the sequence
    T = window + 3 * max(TILES[name]["BLOCK_M"] for name in KERNELS) + 5
    check_against_reference(1, T, T, 1, 1, 64, dtype=torch.float16, device="cpu", tol=2e-3, window=window,
                            scale=SCALE[64])


@pytest.mark.skipif(CUDA, reason="CPU interpreter case")
def test_window_edges_with_documents_and_gqa_cpu():
    """A document start (not the window) bounds the first rows; the window edge on a boundary after it."""
    block = TILES["dkdv"]["BLOCK_M"]
    doc_lens = [block + 3, 2 * block + 5, block - 1]
    check_against_reference(1, sum(doc_lens), sum(doc_lens), 2, 1, 64, dtype=torch.float16, device="cpu",
                            tol=2e-3, window=block + 2, doc_lens=doc_lens, scale=SCALE[64])


# -- the training kernels on the GPU (tuned tiles, bf16 and fp16) -------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_window_edges_gpu(head_dim, dtype):
    for window in training_windows((1, 2, 5)):
        T = window + 4 * 64 + 7
        check_against_reference(2, T, T, 2, 1, head_dim, dtype=dtype, device="cuda", tol=1e-2, window=window,
                                scale=SCALE[head_dim])


# -- decode -----------------------------------------------------------------------------------------

def decode_inputs(lengths, kv_heads, group, head_dim, dtype, device):
    """test_decode's inputs, drawn from a seed of torch's generator (seeded per test by the conftest)."""
    return make_inputs(lengths, kv_heads, group, head_dim, dtype, device, seed=int(torch.randint(0, 2**31, ())))


def decode_edges(block):
    """Cache lengths around a two-tile boundary and windows whose first key (length - window) lands on,
    one before or one after a tile boundary in one of the rows."""
    lengths = [2 * block - 1, 2 * block, 2 * block + 1, 2 * block + 2]
    windows = [block - 1, block, block + 1, block + 2]
    return lengths, windows


def decode_error(out, q, r, k, v, lengths, window, scale):
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    return rel_error(out, reference(q, r, k, v, lengths, window, scale))


@pytest.mark.skipif(CUDA, reason="CPU interpreter case")
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_window_edges_cpu(num_splits):
    lengths, windows = decode_edges(parallax_decode.TRITON_BLOCK_N)
    q, r, k, v, seqlens = decode_inputs(lengths, 1, 2, 64, torch.float16, "cpu")
    for window in windows + [None]:
        out = parallax_decode_triton(q, r, k, v, seqlens, window=window, scale=SCALE[64], num_splits=num_splits)
        err = decode_error(out, q, r, k, v, seqlens, window, SCALE[64])
        assert err < 2e-3, (window, err)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim, dtype", [(128, torch.bfloat16), (64, torch.float16)])
def test_decode_window_edges_triton_gpu(head_dim, dtype):
    lengths, windows = decode_edges(parallax_decode.TRITON_BLOCK_N)
    q, r, k, v, seqlens = decode_inputs(lengths, 2, 4, head_dim, dtype, "cuda")
    for window in windows + [None]:
        out = parallax_decode_triton(q, r, k, v, seqlens, window=window, scale=SCALE[head_dim])
        assert decode_error(out, q, r, k, v, seqlens, window, SCALE[head_dim]) <= 1e-2, window


@pytest.mark.skipif(not HOPPER, reason="the CuTe DSL kernel targets SM90")
@pytest.mark.parametrize("paired", [False, True])
def test_decode_window_edges_cute_gpu(paired):
    import parallax_decode_cute
    # unpaired: TILE_ROWS keys of one KV head per stage; paired: half as many keys of each of two heads
    block = parallax_decode_cute.TILE_ROWS // (2 if paired else 1)
    lengths, windows = decode_edges(block)
    q, r, k, v, seqlens = decode_inputs(lengths, 2, 2, 128, torch.bfloat16, "cuda")
    for window in windows + [None]:
        out = parallax_decode_cute.parallax_decode_cute(q, r, k, v, seqlens, window, SCALE[128],
                                                        torch.empty_like(q), paired=paired)
        assert decode_error(out, q, r, k, v, seqlens, window, SCALE[128]) <= 1e-2, (paired, window)
