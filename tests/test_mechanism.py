"""The references (parallax_reference, parallax_decode_reference) against the mechanism stated another
way: softmax attention minus r^T Cov_p(k, v), with the covariance written out from its means in float64,
one query row at a time; and against values worked out by hand on three keys."""
import math

import pytest
import torch

from parallax_decode import parallax_decode_reference
from parallax_kernels import parallax_reference


def visible_keys(i, Tq, Tk, window, doc_of):
    """Keys query row i sees: causal and end-aligned, inside the window, in its own document."""
    pos = Tk - Tq + i
    keys = [j for j in range(Tk) if j <= pos and (window is None or j > pos - window)]
    return [j for j in keys if doc_of is None or doc_of[j] == doc_of[pos]]


def mechanism(q, r, k, v, *, window=None, doc_lens=None, scale=None):
    """o_i = E_p[v] - r_i^T (E_p[k v^T] - E_p[k] E_p[v]^T), p = softmax over visible j of scale q_i.k_j.

    Float64, loops over batch, head and row; shares no code with the library."""
    q, r, k, v = (x.detach().double() for x in (q, r, k, v))
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    doc_of = None
    if doc_lens is not None:
        doc_of = [d for d, n in enumerate(doc_lens) for _ in range(n)]
    out = torch.zeros(B, Tq, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)  # query heads share KV heads in consecutive groups
            for i in range(Tq):
                js = visible_keys(i, Tq, Tk, window, doc_of)
                K, V = k[b, js, hk], v[b, js, hk]  # (n, D)
                logits = scale * (K @ q[b, i, h])
                p = torch.exp(logits - logits.max())
                p = p / p.sum()
                mean_k, mean_v = p @ K, p @ V
                second_moment = (p[:, None, None] * K[:, :, None] * V[:, None, :]).sum(0)  # E_p[k v^T]
                covariance = second_moment - torch.outer(mean_k, mean_v)
                out[b, i, h] = mean_v - r[b, i, h] @ covariance
    return out


def random_qrkv(B, Tq, Tk, Hq, Hkv, D, r_scale=0.5):
    q, r = torch.randn(B, Tq, Hq, D), torch.randn(B, Tq, Hq, D) * r_scale
    k, v = torch.randn(B, Tk, Hkv, D), torch.randn(B, Tk, Hkv, D)
    return q, r, k, v


CASES = {
    "dense": dict(B=2, Tq=9, Tk=9, Hq=2, Hkv=2),
    "prefill Tq < Tk, GQA 3:1": dict(B=1, Tq=4, Tk=11, Hq=3, Hkv=1),
    "window 3": dict(B=1, Tq=10, Tk=10, Hq=2, Hkv=1, window=3),
    "documents 1, 4, 6 + window 4": dict(B=1, Tq=11, Tk=11, Hq=2, Hkv=2, doc_lens=[1, 4, 6], window=4),
}


@pytest.mark.parametrize("scale", [None, 0.12, 0.7])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_reference_is_softmax_minus_probed_covariance(case, scale):
    c = dict(CASES[case])
    window, doc_lens = c.pop("window", None), c.pop("doc_lens", None)
    q, r, k, v = random_qrkv(**c, D=8, r_scale=2.0)  # a large r: the covariance term is a large part of o
    cu = None if doc_lens is None else torch.tensor([0] + doc_lens).cumsum(0).to(torch.int32)
    want = mechanism(q, r, k, v, window=window, doc_lens=doc_lens, scale=scale)
    got = parallax_reference(q.double(), r.double(), k.double(), v.double(), cu_seqlens=cu, window=window,
                             scale=scale)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    # float32 in, float32 out, to float32 accuracy
    torch.testing.assert_close(parallax_reference(q, r, k, v, cu_seqlens=cu, window=window, scale=scale),
                               want.float(), atol=2e-5, rtol=2e-5)
    # the covariance term is not negligible here: softmax attention alone is far from o
    softmax_only = mechanism(q, torch.zeros_like(r), k, v, window=window, doc_lens=doc_lens, scale=scale)
    assert (softmax_only - want).abs().max() > 0.5


def hand_case(scale):
    """Three keys, D = 2, q = (1, 0) and r = (0, 1) at every row, so s_j = scale k_j[0] and u_j = k_j[1].
    k[0] = (0, ln 2, ln 5) / scale gives exp(s) = (1, 2, 5); u = (1, 0, -1)."""
    k = torch.tensor([[0.0, 1.0], [math.log(2) / scale, 0.0], [math.log(5) / scale, -1.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    q = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(3, 2)
    r = torch.tensor([0.0, 1.0], dtype=torch.float64).expand(3, 2)
    return [x.reshape(1, 3, 1, 2).contiguous() for x in (q, r, k, v)]


# Worked by hand, weights w_j = p_j (1 + t - u_j) with t = sum_j p_j u_j:
# row 0: one key, w = (1)                                    o = v_0 = (1, 0)
# row 1: p = (1/3, 2/3), t = 1/3, w = (1/9, 8/9)             o = (1/9, 8/9)
# row 2: p = (1/8, 2/8, 5/8), t = -1/2, w = (-1/16, 2/16, 15/16)   o = (29/16, 47/16)
# (with the covariance's sign flipped, row 2 would be w = (5/16, 6/16, 5/16), o = (15/16, 21/16))
HAND_OUTPUT = [[1.0, 0.0], [1 / 9, 8 / 9], [29 / 16, 47 / 16]]


@pytest.mark.parametrize("scale", [1.0, 0.12])
def test_reference_on_three_keys_by_hand(scale):
    q, r, k, v = hand_case(scale)
    want = torch.tensor(HAND_OUTPUT, dtype=torch.float64).reshape(1, 3, 1, 2)
    torch.testing.assert_close(parallax_reference(q, r, k, v, scale=scale), want, atol=1e-12, rtol=0)
    torch.testing.assert_close(mechanism(q, r, k, v, scale=scale), want, atol=1e-12, rtol=0)
    # row 2 with a window of 2 sees keys 1 and 2: p = (2/7, 5/7), u = (0, -1), t = -5/7,
    # w = p (2/7 - u) = (4/49, 45/49), o = (90/49, 4/49 + 135/49)
    windowed = parallax_reference(q, r, k, v, scale=scale, window=2)[0, 2, 0]
    torch.testing.assert_close(windowed, torch.tensor([90 / 49, 139 / 49], dtype=torch.float64), atol=1e-12, rtol=0)


def test_decode_reference_on_three_keys_by_hand():
    """The decode reference's one query is the last position: row 2 of the hand case, per cache row,
    whatever lies in the cache past each row's length."""
    scale = 0.12
    q, r, k, v = hand_case(scale)
    garbage = torch.full((1, 2, 1, 2), 1e3, dtype=torch.float64)
    k_cache = torch.cat([torch.cat([k, garbage], 1), torch.cat([k[:, :2], garbage, garbage[:, :1]], 1)])
    v_cache = torch.cat([torch.cat([v, garbage], 1), torch.cat([v[:, :2], garbage, garbage[:, :1]], 1)])
    lengths = torch.tensor([3, 2], dtype=torch.int32)  # row 1 holds keys 0 and 1 only
    out = parallax_decode_reference(torch.cat([q[:, 2:]] * 2), torch.cat([r[:, 2:]] * 2), k_cache, v_cache,
                                    lengths, None, scale)
    want = torch.tensor([HAND_OUTPUT[2], HAND_OUTPUT[1]], dtype=torch.float64).reshape(2, 1, 1, 2)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("window", [None, 1, 5, 17])
@pytest.mark.parametrize("scale", [None, 0.12])
def test_decode_reference_is_the_mechanism_at_the_last_position(window, scale):
    lengths = [1, 6, 17, 30]
    q, r, _, _ = random_qrkv(4, 1, 1, 4, 2, 8, r_scale=2.0)
    _, _, k, v = random_qrkv(4, 1, 32, 4, 2, 8)
    out = parallax_decode_reference(q, r, k, v, torch.tensor(lengths, dtype=torch.int32), window, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    for b, n in enumerate(lengths):
        want = mechanism(q[b:b + 1], r[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], window=window, scale=scale)
        torch.testing.assert_close(out[b:b + 1].double(), want, atol=2e-5, rtol=2e-5)
