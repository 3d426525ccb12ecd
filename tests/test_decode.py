"""Parallax decode over a KV cache: Triton (interpreter on CPU) and CuTe DSL kernels vs the reference."""
import pytest
import torch

from parallax_kernels import decode_backend, parallax_decode, parallax_decode_reference, parallax_decode_triton

CUDA = torch.cuda.is_available()
HOPPER = CUDA and torch.cuda.get_device_capability()[0] == 9
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def make_inputs(lengths, kv_heads, group, head_dim, dtype, device, max_len=None, seed=0):
    """Random q, r (B, 1, Hkv * group, D), caches (B, Lmax, Hkv, D) and int32 lengths."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, Lmax = len(lengths), max_len or max(lengths)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    q, r = randn(B, 1, kv_heads * group, head_dim), randn(B, 1, kv_heads * group, head_dim)
    k, v = randn(B, Lmax, kv_heads, head_dim), randn(B, Lmax, kv_heads, head_dim)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return q, r, k, v, seqlens


def reference(q, r, k, v, seqlens, window=None, scale=None):
    return parallax_decode_reference(*(x.float() for x in (q, r, k, v)), seqlens, window, scale)


def rel_error(x, ref):
    return ((x.float() - ref).norm() / ref.norm()).item()


def fill_past_lengths(cache, seqlens, value):
    cache = cache.clone()
    for b, length in enumerate(seqlens.tolist()):
        cache[b, length:] = value
    return cache


# ----------------------------------------------------------------------------------------------
# CPU (CI): the Triton kernel under TRITON_INTERPRET=1, the reference backend, validation

INTERPRETER_LENGTHS = [[64], [1, 65, 130], [5, 130, 1]]


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 7, 100])  # inside one 64-key tile, across tiles
@pytest.mark.parametrize("lengths", INTERPRETER_LENGTHS)
def test_triton_matches_reference(lengths, window, group):
    if CUDA:
        pytest.skip("interpreter test; the GPU tests below cover the compiled kernel")
    q, r, k, v, seqlens = make_inputs(lengths, 2, group, 64, torch.float16, "cpu", max_len=131)
    # one program per row at the default scale (D**-0.5 = 0.125), a split-KV combine at another scale
    for num_splits, scale in ((1, None), (3, 0.3)):
        ref = reference(q, r, k, v, seqlens, window, scale)
        out = parallax_decode_triton(q, r, k, v, seqlens, window=window, scale=scale, num_splits=num_splits)
        assert out.dtype == q.dtype and out.shape == q.shape
        assert rel_error(out, ref) < 2e-3, (scale, num_splits, rel_error(out, ref))


def test_triton_ignores_cache_past_lengths():
    device = "cuda" if CUDA else "cpu"
    q, r, k, v, seqlens = make_inputs([1, 65, 130], 2, 2, 64, torch.float16, device, max_len=150)
    clean = parallax_decode_triton(q, r, k, v, seqlens, num_splits=2)
    k2, v2 = (fill_past_lengths(x, seqlens, 3e4) for x in (k, v))
    assert torch.equal(parallax_decode_triton(q, r, k2, v2, seqlens, num_splits=2), clean)


def test_cpu_uses_reference_backend(monkeypatch):
    """On the CPU parallax_decode runs parallax_decode_reference (a spy counts the calls), and what it
    returns is the mechanism computed independently in float64 (test_mechanism.mechanism)."""
    from test_mechanism import mechanism
    import parallax_decode as module

    assert decode_backend("cpu") == "reference"
    calls = []
    real = module.parallax_decode_reference
    monkeypatch.setattr(module, "parallax_decode_reference", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    lengths = [3, 9]
    q, r, k, v, seqlens = make_inputs(lengths, 2, 2, 64, torch.float32, "cpu")
    out = torch.empty_like(q)
    result = parallax_decode(q, r, k, v, seqlens, window=4, scale=0.3, out=out)
    assert result is out and len(calls) == 1
    for b, n in enumerate(lengths):
        want = mechanism(q[b:b + 1], r[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], window=4, scale=0.3)
        torch.testing.assert_close(out[b:b + 1].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_one_visible_key_returns_its_value(scale):
    """With one visible key p = 1 and t = u, so o is that key's value whatever q, r and the scale are:
    the first key of a 1-long row, the last key of longer rows under window 1, at lengths on and next to
    a tile boundary (the hi/lo split of P*U keeps this exact to fp16 rounding even though |u| is ~10)."""
    device = "cuda" if CUDA else "cpu"
    lengths = [1, 17, 64, 65]
    q, r, k, v, seqlens = make_inputs(lengths, 1, 2, 64, torch.float16, device, max_len=80,
                                      seed=int(torch.randint(0, 2**31, ())))
    last = v[torch.arange(len(lengths)), seqlens.long() - 1]  # (B, Hkv = 1, D): each row's last value
    for num_splits in (1, 2):
        out = parallax_decode_triton(q, r, k, v, seqlens, window=1, scale=scale, num_splits=num_splits)
        torch.testing.assert_close(out, last[:, None].expand(-1, 1, 2, -1), atol=2e-3, rtol=2e-3)
    single = parallax_decode_triton(q[:1], r[:1], k[:1], v[:1], seqlens[:1], scale=scale)
    torch.testing.assert_close(single, v[:1, :1].expand(-1, 1, 2, -1), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(cache_seqlens=torch.tensor([0, 5], dtype=torch.int32)), "cache_seqlens"),
    (lambda a: a.update(cache_seqlens=torch.tensor([5, 21], dtype=torch.int32)), "cache_seqlens"),
    (lambda a: a.update(cache_seqlens=torch.tensor([5, 6], dtype=torch.int64)), "cache_seqlens"),
    (lambda a: a.update(cache_seqlens=torch.tensor([5], dtype=torch.int32)), "cache_seqlens"),
    (lambda a: a.update(q=a["q"].to(torch.float64)), "q has dtype"),
    (lambda a: a.update(r=a["r"].half()), "r has dtype"),
    (lambda a: a.update(q=a["q"].repeat(1, 2, 1, 1)), "one query"),
    (lambda a: a.update(r=a["r"][:, :, :2]), "r must have"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :10]), "v_cache"),
    (lambda a: a.update(k_cache=a["k_cache"][..., :32], v_cache=a["v_cache"][..., :32]), "k_cache"),
    (lambda a: a.update(q=a["q"][:, :, :3], r=a["r"][:, :, :3]), "multiple"),
    (lambda a: a.update(q=a["q"][..., :32], r=a["r"][..., :32], k_cache=a["k_cache"][..., :32],
                        v_cache=a["v_cache"][..., :32]), "head dim"),
    (lambda a: a.update(k_cache=a["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
     "unit stride"),
    (lambda a: a.update(window=0), "window"),
    (lambda a: a.update(scale=float("nan")), "scale"),
    (lambda a: a.update(out=torch.empty(2, 1, 4, 64, dtype=torch.float16)), "out"),
])
def test_validation(change, match):
    q, r, k, v, seqlens = make_inputs([5, 20], 2, 2, 64, torch.float32, "cpu")
    args = dict(q=q, r=r, k_cache=k, v_cache=v, cache_seqlens=seqlens)
    change(args)
    with pytest.raises(ValueError, match=match):
        parallax_decode(**args)


# (dtype, head dim, q heads per KV head, splits, warpgroups, paired KV heads): every code path of
# the kernel's trace (one split and a cluster, one and two warpgroups, paired and not).
CUTE_VARIANTS = [
    ("bfloat16", 128, 1, 1, 2, False), ("bfloat16", 128, 2, 3, 2, False), ("float16", 64, 4, 8, 1, False),
    ("bfloat16", 128, 1, 4, 1, True), ("bfloat16", 64, 8, 2, 2, False), ("float16", 128, 2, 6, 2, True),
]


@pytest.mark.skipif(CUDA, reason="the GPU tests run the kernel itself")
@pytest.mark.parametrize("variant", CUTE_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_cute_kernel_compiles_for_hopper_without_a_gpu(variant, monkeypatch):
    """The CuTe DSL kernel traces and compiles to sm_90a code on a CPU, so every change to it is
    checked by the DSL on every test run, not only on a Hopper machine."""
    monkeypatch.setenv("CUTE_DSL_ARCH", "sm_90a")
    cute_decode = pytest.importorskip("parallax_decode_cute")
    cutlass = cute_decode.cutlass
    Int32, Int64, Float32 = cutlass.Int32, cutlass.Int64, cutlass.Float32
    dtype, head_dim, group, num_splits, warpgroups, paired = variant
    dtype = cute_decode._TORCH_TO_CUTE[getattr(torch, dtype)]
    batch, max_len, kv_heads = 2, 1024, 4
    row = kv_heads * head_dim  # elements per cache position

    def pointer(element, align):  # a made-up address: nothing runs
        return cute_decode.make_ptr(element, 1 << 20, cute_decode.cute.AddressSpace.gmem, assumed_align=align)

    args = (pointer(dtype, 2), pointer(dtype, 2), pointer(dtype, 16), pointer(dtype, 16), pointer(Int32, 4),
            pointer(dtype, 2), Int32(batch), Int32(max_len), Int32(kv_heads),
            Int64(max_len * row), Int32(row), Int32(head_dim), Int64(max_len * row), Int32(row), Int32(head_dim),
            Int32(max_len), Float32(0.1), cute_decode.cuda.CUstream(0))
    kernel = cute_decode.ParallaxDecodeSm90(dtype, head_dim, group, num_splits, warpgroups, paired)
    assert cute_decode.cute.compile(kernel, *args) is not None


# ----------------------------------------------------------------------------------------------
# GPU: both kernels against the reference, garbage past the lengths, CUDA-graph replay

GPU_LENGTHS = [1, 63, 64, 65, 1000, 4096, 16384]
# (lengths per row, head ratio, head dim, dtype, window): every ratio, both head dims and dtypes,
# windows inside one tile and across tiles, B = 32 with every length; few compiled variants.
GPU_CASES = [
    ([16384], 1, 128, torch.bfloat16, None),
    ([65], 4, 64, torch.bfloat16, 33),
    ([16384, 1, 1000], 2, 128, torch.bfloat16, 100),
    ([63, 4096, 64], 4, 128, torch.bfloat16, None),
    ([1000, 65, 16384], 8, 128, torch.bfloat16, 7),
    ([4096, 63, 1], 2, 64, torch.float16, None),
    ([GPU_LENGTHS[i % 7] for i in range(32)], 1, 128, torch.bfloat16, None),
    ([GPU_LENGTHS[i % 7] for i in range(3, 35)], 8, 64, torch.float16, 1000),
]


def gpu_decode(backend):
    if backend == "cute":
        if not HOPPER:
            pytest.skip("the CuTe DSL kernel targets SM90")
        import parallax_decode_cute

        def run(q, r, k, v, seqlens, window=None, scale=None, **overrides):  # num_splits, warpgroups, paired
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            return parallax_decode_cute.parallax_decode_cute(
                q, r, k, v, seqlens, window, scale, torch.empty_like(q), **overrides)
        return run
    return lambda q, r, k, v, seqlens, window=None, scale=None: parallax_decode_triton(q, r, k, v, seqlens,
                                                                                        window=window, scale=scale)


@needs_cuda
@pytest.mark.parametrize("backend", ["cute", "triton"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"B{len(c[0])}-G{c[1]}-D{c[2]}-{str(c[3])[6:]}-w{c[4]}")
@pytest.mark.parametrize("scale", [None, 0.12])  # 0.12: training's attn_scale
def test_gpu_matches_reference(backend, case, scale):
    lengths, group, head_dim, dtype, window = case
    q, r, k, v, seqlens = make_inputs(lengths, 2, group, head_dim, dtype, "cuda", seed=group)
    k, v = (fill_past_lengths(x, seqlens, float("nan")) for x in (k, v))  # never read past L
    out = gpu_decode(backend)(q, r, k, v, seqlens, window, scale)
    ref = reference(q, r, k, v, seqlens, window, scale)
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = rel_error(out, ref)
    assert err <= 1e-2, f"{backend}: relative error {err:.2e}"


@needs_cuda
@pytest.mark.parametrize("backend", ["cute", "triton"])
def test_gpu_graph_replay_with_new_lengths(backend):
    decode = gpu_decode(backend)
    q, r, k, v, seqlens = make_inputs([4096, 1, 300], 2, 4, 128, torch.bfloat16, "cuda", max_len=5000)
    out = torch.empty_like(q)
    decode(q, r, k, v, seqlens)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(decode(q, r, k, v, seqlens, 64))
    for lengths in ([4096, 1, 300], [17, 4999, 64], [5000, 2, 1]):
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        eager = decode(q, r, k, v, seqlens, 64)
        torch.cuda.synchronize()
        assert torch.equal(out, eager), lengths
        assert rel_error(out, reference(q, r, k, v, seqlens, 64)) <= 1e-2


@needs_cuda
@pytest.mark.parametrize("backend", ["cute", "triton"])
@pytest.mark.parametrize("ramp", ["steep", "gentle", "falling"])
def test_gpu_moving_maximum(backend, ramp):
    """Keys scaled along the cache: scores that grow tile after tile move the running maximum
    (and rescale the partial output) again and again, scores that shrink never after the
    first tile."""
    q, r, k, v, seqlens = make_inputs([4096, 700, 64], 2, 4, 128, torch.bfloat16, "cuda", seed=5)
    position = torch.arange(k.shape[1], device="cuda", dtype=torch.float32).view(1, -1, 1, 1)
    scale = {"steep": 1 + position / 32, "gentle": 0.5 + position / 1024,
             "falling": 1 + position.flip(1) / 32}[ramp]
    k = (k.float() * scale).to(k.dtype)
    out = gpu_decode(backend)(q, r, k, v, seqlens)
    assert torch.isfinite(out).all()
    assert rel_error(out, reference(q, r, k, v, seqlens)) <= 1e-2


@needs_cuda
@pytest.mark.parametrize("num_splits", range(1, 9))  # 1 .. parallax_decode_cute.MAX_SPLITS (checked below)
@pytest.mark.parametrize("warpgroups", [1, 2])
@pytest.mark.parametrize("window", [None, 100])
def test_gpu_cute_split_counts(num_splits, warpgroups, window):
    """Every cluster size and warpgroup count merges right, including splits that get no tile
    (the 1-key row) and warpgroups that get different tile counts."""
    decode = gpu_decode("cute")
    import parallax_decode_cute
    assert parallax_decode_cute.MAX_SPLITS == 8  # the parametrization covers every split count
    q, r, k, v, seqlens = make_inputs([1, 130, 4096, 700], 2, 2, 128, torch.bfloat16, "cuda", seed=3)
    k, v = (fill_past_lengths(x, seqlens, float("nan")) for x in (k, v))
    out = decode(q, r, k, v, seqlens, window, 0.12, num_splits=num_splits, warpgroups=warpgroups)
    assert torch.isfinite(out).all()
    assert rel_error(out, reference(q, r, k, v, seqlens, window, 0.12)) <= 1e-2


@needs_cuda
@pytest.mark.parametrize("group, head_dim, dtype, window, num_splits, warpgroups", [
    (1, 128, torch.bfloat16, None, 1, 1),
    (2, 64, torch.float16, 100, 1, 2),
    (4, 128, torch.bfloat16, 7, 3, 2),
    (1, 64, torch.bfloat16, 33, 8, 1),
])
def test_gpu_cute_paired_heads(group, head_dim, dtype, window, num_splits, warpgroups):
    """Two KV heads per CTA with their rows interleaved in a tile: every q head sees only its
    own KV head's keys, at odd lengths and windows, under splits and both warpgroup counts."""
    decode = gpu_decode("cute")
    q, r, k, v, seqlens = make_inputs([1, 63, 64, 65, 1000, 4099], 4, group, head_dim, dtype,
                                      "cuda", seed=group)  # the last tile runs past the cache
    k, v = (fill_past_lengths(x, seqlens, float("nan")) for x in (k, v))
    out = decode(q, r, k, v, seqlens, window, num_splits=num_splits, warpgroups=warpgroups,
                 paired=True)
    assert torch.isfinite(out).all()
    assert rel_error(out, reference(q, r, k, v, seqlens, window)) <= 1e-2
    with pytest.raises(ValueError, match="even KV head count"):
        decode(*make_inputs([5], 3, 1, head_dim, dtype, "cuda"), paired=True)


@needs_cuda
def test_gpu_public_api_backend():
    expected = "cute" if HOPPER else "triton"
    assert decode_backend("cuda") == expected
    q, r, k, v, seqlens = make_inputs([70, 3], 2, 2, 128, torch.bfloat16, "cuda")
    out = parallax_decode(q, r, k, v, seqlens)
    assert decode_backend("cuda") == expected  # the CuTe DSL kernel did not fall back
    assert rel_error(out, reference(q, r, k, v, seqlens)) <= 1e-2
