"""Parallax training attention: the reference against autograd and SDPA, the Triton kernels
against the reference (CPU under TRITON_INTERPRET=1 in fp16, the GPU in bf16 at real sizes); and the
softmax masks of packed_attention (FlexAttention's block mask against the dense mask)."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import parallax_attn_triton
import parallax_kernels
from parallax_kernels import dense_visibility, document_ids, flex_block_mask, parallax_attn, parallax_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(x, ref):
    assert torch.isfinite(x).all(), "non-finite values"
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(B, Tq, Tk, Hq, Hkv, D, dtype, device, r_scale=0.5):
    # Drawn from torch's generator, which the conftest fixture seeds per test (the seed is in any failure).
    gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, ())))
    q, r = (torch.randn(B, Tq, Hq, D, dtype=dtype, device=device, generator=gen) for _ in range(2))
    k, v = (torch.randn(B, Tk, Hkv, D, dtype=dtype, device=device, generator=gen) for _ in range(2))
    return [x.requires_grad_() for x in (q, r * r_scale, k, v)]


def check_against_reference(B, Tq, Tk, Hq, Hkv, D, *, dtype, device, tol, window=None, doc_lens=None, scale=None):
    cu = None
    if doc_lens is not None:
        cu = torch.tensor([0] + doc_lens, device=device).cumsum(0).to(torch.int32)
        assert B == 1 and Tq == Tk == int(cu[-1])
    inputs = make_inputs(B, Tq, Tk, Hq, Hkv, D, dtype, device)
    out = parallax_attn(*inputs, cu_seqlens=cu, window=window, scale=scale)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_inputs = [x.detach().float().requires_grad_() for x in inputs]
    ref = parallax_reference(*ref_inputs, cu_seqlens=cu, window=window, scale=scale)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.float())
    assert out.dtype == dtype and out.shape == inputs[0].shape
    for name, x, want in zip(("o", "dq", "dr", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert rel_err(x, want) < tol, f"{name}: relative error {rel_err(x, want):.2e}"


# -- the reference ---------------------------------------------------------------------------------


def test_reference_matches_finite_differences():
    q, r, k, v = (x.detach().double().requires_grad_() for x in make_inputs(1, 7, 7, 2, 1, 4, torch.float64, "cpu"))
    cu = torch.tensor([0, 1, 4, 7], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda *x: parallax_reference(*x, cu_seqlens=cu, window=2), (q, r, k, v))


def test_reference_with_zero_r_is_softmax_attention():
    q, r, k, v = (x.detach().float() for x in make_inputs(2, 5, 9, 4, 2, 16, torch.float32, "cpu"))
    out = parallax_reference(q, torch.zeros_like(r), k, v)
    # End-aligned causal mask, GQA expanded for SDPA (which wants (B, H, T, D)).
    mask = torch.ones(5, 9, dtype=torch.bool).tril(diagonal=9 - 5)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2),
                                          v.repeat_interleave(2, 2).transpose(1, 2), attn_mask=mask)
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_reference_documents_do_not_see_each_other():
    q, r, k, v = (x.detach().float() for x in make_inputs(1, 10, 10, 2, 2, 8, torch.float32, "cpu"))
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    packed = parallax_reference(q, r, k, v, cu_seqlens=cu)
    second = parallax_reference(q[:, 3:], r[:, 3:], k[:, 3:], v[:, 3:])
    torch.testing.assert_close(packed[:, 3:], second)


def test_reference_weights_sum_to_one():
    # o is linear in v with weights summing to one: a constant v comes back unchanged.
    q, r, k, _ = (x.detach().float() for x in make_inputs(1, 6, 6, 1, 1, 8, torch.float32, "cpu"))
    v = torch.full((1, 6, 1, 8), 3.0)
    torch.testing.assert_close(parallax_reference(q, r, k, v, window=3), v)


# -- the Triton kernels on the CPU (interpreter, fp16) -------------------------------------------

# scale multiplies q.k (default D**-0.5 = 0.125 at D = 64); the cases alternate it with a non-default one.
# Windows on, before and after tile boundaries are in test_windows.py.
CPU_CASES = {
    "documents 1,7,64,130 + GQA 2:1": dict(B=1, T=202, Hq=2, Hkv=1, doc_lens=[1, 7, 64, 130]),
    "documents + window 5 (< tile), scale 0.3": dict(B=1, T=202, Hq=2, Hkv=2, doc_lens=[7, 130, 1, 64], window=5,
                                                    scale=0.3),
    "documents + window 37 (> tile)": dict(B=1, T=202, Hq=2, Hkv=2, doc_lens=[64, 1, 130, 7], window=37),
    "dense batch, MQA 3:1, T=50, scale 0.3": dict(B=2, T=50, Hq=3, Hkv=1, scale=0.3),
    "dense, window 23, scale 0.05": dict(B=1, T=70, Hq=2, Hkv=1, window=23, scale=0.05),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter case; the GPU runs its own")
@pytest.mark.parametrize("case", CPU_CASES, ids=list(CPU_CASES))
def test_triton_matches_reference_cpu(case):
    c = CPU_CASES[case]
    check_against_reference(c["B"], c["T"], c["T"], c["Hq"], c["Hkv"], 64, dtype=torch.float16, device="cpu",
                            tol=2e-3, window=c.get("window"), doc_lens=c.get("doc_lens"), scale=c.get("scale"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter case")
def test_triton_prefill_fewer_queries_than_keys_cpu():
    check_against_reference(2, 19, 45, 2, 1, 64, dtype=torch.float16, device="cpu", tol=2e-3, scale=0.3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter case")
@pytest.mark.parametrize("scale", [None, 0.3])
def test_triton_zero_r_is_softmax_cpu(scale):
    q, r, k, v = make_inputs(1, 33, 33, 2, 2, 64, torch.float16, "cpu")
    out = parallax_attn(q, torch.zeros_like(r), k, v, scale=scale)
    want = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v)), is_causal=True,
                                          scale=scale)
    assert rel_err(out, want.transpose(1, 2)) < 2e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter case")
def test_custom_ops_pass_opcheck_cpu():
    """Both ops' schemas, fake (meta) functions, autograd registration and AOT dispatch, as torch.compile uses
    them; on packed documents with a window and GQA."""
    q, r, k, v = make_inputs(1, 30, 30, 2, 1, 64, torch.float16, "cpu")
    doc_start, doc_end = parallax_attn_triton._document_bounds(torch.tensor([0, 9, 30], dtype=torch.int32), 30)
    bounds = (doc_start, doc_end, 7, 0.125)
    forward = torch.library.opcheck(torch.ops.parallax.forward.default, (q, r, k, v, *bounds))
    q, r, k, v = (x.detach() for x in (q, r, k, v))
    saved = torch.ops.parallax.forward.default(q, r, k, v, *bounds)
    backward = torch.library.opcheck(torch.ops.parallax.backward.default,
                                     (torch.randn_like(q), q, r, k, v, *saved, *bounds))
    assert set(forward.values()) == set(backward.values()) == {"SUCCESS"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter case")
def test_inputs_off_16_byte_alignment_give_the_aligned_results():
    """Tensor descriptors (TMA) need 16-byte aligned bases: contiguous inputs one element past an aligned address
    are copied, and the output and gradients equal those of aligned copies bit for bit."""
    shape = (2, 37, 2, 64)
    shifted = [torch.randn(torch.Size(shape).numel() + 1, dtype=torch.float16)[1:].view(shape) for _ in range(4)]
    assert all(x.is_contiguous() and x.data_ptr() % 16 for x in shifted)
    results = []
    for inputs in (shifted, [x.clone() for x in shifted]):
        xs = [x.detach().requires_grad_() for x in inputs]
        out = parallax_attn(*xs, window=20)
        results.append((out, *torch.autograd.grad(out, xs, torch.ones_like(out))))
    for misaligned, aligned in zip(*results):
        assert torch.equal(misaligned, aligned)


# -- validation ----------------------------------------------------------------------------------


def _valid():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, r, k, v = (x.detach() for x in make_inputs(1, 8, 8, 4, 2, 64, torch.float16, device))
    return dict(q=q, r=r, k=k, v=v)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(q=a["q"][0]), "q must have 4 dims"),
    (lambda a: a.update(r=a["r"][:, :4]), "r must have q's shape"),
    (lambda a: a.update(k=a["k"].float()), "k has dtype"),
    (lambda a: a.update(q=a["q"].float(), r=a["r"].float(), k=a["k"].float(), v=a["v"].float()), "q has dtype"),
    (lambda a: a.update(k=a["k"][:, :, :1].repeat(1, 1, 3, 1), v=a["v"][:, :, :1].repeat(1, 1, 3, 1)), "not a multiple"),
    (lambda a: a.update(q=a["q"][..., :32], r=a["r"][..., :32]), "batch and head dim"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 8], device=a["q"].device)), "int32"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32, device=a["q"].device)),
     "strictly increasing"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 5, 7], dtype=torch.int32, device=a["q"].device)), "end at T=8"),
    (lambda a: a.update(window=0), "window must be a positive int"),
])
def test_bad_input_raises_value_error(change, message):
    args = _valid()
    change(args)
    with pytest.raises(ValueError, match=message):
        parallax_attn(**args)


def test_unsupported_head_dim_raises():
    q, r, k, v = (torch.randn(1, 4, 2, 32, dtype=torch.float16) for _ in range(4))  # checked before device
    with pytest.raises(ValueError, match="head dim 32"):
        parallax_attn(q, r, k, v)


# -- the Triton kernels on the GPU (bf16, real sizes) -----------------------------------------------

GPU_CASES = {
    "dense T=2048 D=128": dict(B=2, T=2048, Hq=4, Hkv=4, D=128),
    "dense T=16384 D=64 window 1000": dict(B=1, T=16384, Hq=2, Hkv=1, D=64, window=1000),
    "dense T=4097 D=128 GQA 4:1": dict(B=1, T=4097, Hq=4, Hkv=1, D=128),
    "documents D=128 window 300": dict(B=1, T=None, Hq=4, Hkv=2, D=128, window=300,
                                       doc_lens=[1, 7, 64, 130, 2000, 1, 3000, 777]),
    "documents D=64": dict(B=1, T=None, Hq=2, Hkv=2, D=64, doc_lens=[4096, 1, 129, 3000, 63]),
}


@cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=list(GPU_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [None, 0.12])  # 0.12: training's attn_scale
def test_triton_matches_reference_gpu(case, dtype, scale):
    c = GPU_CASES[case]
    T = c["T"] or sum(c["doc_lens"])
    check_against_reference(c["B"], T, T, c["Hq"], c["Hkv"], c["D"], dtype=dtype, device="cuda", tol=1e-2,
                            window=c.get("window"), doc_lens=c.get("doc_lens"), scale=scale)


@cuda
def test_triton_prefill_gpu():
    check_against_reference(3, 300, 1000, 4, 2, 128, dtype=torch.bfloat16, device="cuda", tol=1e-2, window=257,
                            scale=0.12)


@cuda
def test_compiles_without_graph_break():
    """fullgraph compile through inductor, backward included (a data-dependent op there breaks it)."""
    q, r, k, v = make_inputs(1, 256, 256, 2, 1, 64, torch.bfloat16, "cuda")
    cu = torch.tensor([0, 100, 256], dtype=torch.int32, device="cuda")
    fn = torch.compile(lambda *x: parallax_attn(*x, cu_seqlens=cu, window=64, scale=0.12), fullgraph=True)
    out = fn(q, r, k, v)
    grads = torch.autograd.grad(out.float().square().sum(), (q, r, k, v))
    eager = parallax_attn(q, r, k, v, cu_seqlens=cu, window=64, scale=0.12)
    eager_grads = torch.autograd.grad(eager.float().square().sum(), (q, r, k, v))
    torch.testing.assert_close(out, eager)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


def listed_blocks(counts, indices):
    """(n, n) bool: the key blocks a BlockMask lists for each query block (the first count of its row)."""
    n = indices.shape[-1]
    listed = torch.arange(n)[None, :] < counts[0, 0][:, None]
    return torch.zeros(n, n, dtype=torch.bool).scatter_(-1, indices[0, 0].long(), listed)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("boundaries", [[0, 37, 200, 201, 390, 512], [0, 300, 512]])
def test_flex_block_mask_matches_the_dense_mask(boundaries):
    """The block summaries (full / partial / skipped) of the FlexAttention mask, checked on the CPU: block
    by block against the dense mask (eager flex_attention applies mask_mod everywhere, so its output
    alone would not show a wrong summary), and flex_attention's output against SDPA's."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 64) for _ in range(3))
    doc_ids = document_ids(torch.tensor(boundaries, dtype=torch.int32), 512)
    for window in (1, 50, 128, 129, 255, 256, 300, 1000):  # 255 | 256: a block 128 back turns full
        block_mask, visibility = flex_block_mask(doc_ids, window), dense_visibility(doc_ids, window)
        seen = visibility.view(4, 128, 4, 128)
        any_seen, all_seen = seen.any(3).any(1), seen.all(3).all(1)
        assert torch.equal(listed_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices), all_seen)
        assert torch.equal(listed_blocks(block_mask.kv_num_blocks, block_mask.kv_indices), any_seen & ~all_seen)
        y = flex_attention(q, k, v, block_mask=block_mask, scale=0.12)
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=visibility, scale=0.12)
        torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 5, 128])
def test_block_lists_put_each_rows_blocks_first_in_order(n):
    """A BlockMask reads the first count indices of each row: they must be the row's blocks, ascending,
    and the row must still be a permutation (as a stable descending argsort of the map gives)."""
    torch.manual_seed(n)
    for density in (0.0, 0.3, 1.0):
        block_map = torch.rand(n, n) < density
        counts, indices = parallax_kernels._block_lists(block_map)
        expected = torch.argsort(block_map.to(torch.int8), dim=-1, descending=True, stable=True)
        assert torch.equal(counts[0, 0], block_map.sum(-1).int())
        assert torch.equal(indices[0, 0], expected.int())
