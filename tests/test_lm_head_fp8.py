"""The FP8 LM head (LM_HEAD_FP8): its two custom ops against fp32 products of the same quantized inputs, on
the CPU (where torch._scaled_mm also takes float8; the ops' bodies run eagerly) and on CUDA (compiled), their
fakes against the real ops, and where the model uses it (training steps on CUDA only)."""
import math
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import lm_head_fp8 as fp8
import train_gpt as tg
from bench.steptime import bench_hyperparameters
from test_train import SMOKE, packed_batch, randomized

# N, d, V: multiples of 16, none a power of two; on CUDA a larger one too
SHAPES = [(48, 80, 112), (16, 208, 48)]
CUDA_SHAPES = SHAPES + [(1040, 768, 4112)]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE_SHAPES = [("cpu", *shape) for shape in SHAPES] + [pytest.param("cuda", *shape, marks=cuda)
                                                          for shape in CUDA_SHAPES]
# opcheck's schema and AOT-dispatch tests sum or compare outputs, which float8 tensors do not support on the CPU
FAKE_CHECKS = ("test_faketensor", "test_autograd_registration")


def head_inputs(N, d, V, device="cpu"):
    """A unit-RMS x, trained-size weights, and a logits gradient as a mean cross entropy over N rows makes it."""
    x = tg.norm(torch.randn(N, d)).bfloat16()
    w = torch.randn(V, d) * 0.5
    targets = torch.randint(0, V, (N,))
    grad = ((torch.randn(N, V) * 3).softmax(-1) - F.one_hot(targets, V)) / N
    return x.to(device), w.to(device), grad.bfloat16().to(device)


def scales(N, d):
    """(x_scale, w_scale, grad_scale) as fp8_lm_head picks them."""
    return 2.0 ** math.floor(math.log2(448 / d**0.5)), fp8.W_SCALE, 2.0 ** math.floor(math.log2(2**14 * N))


def dequantized(t, scale, dtype):
    """t as the op quantizes it, in float64 on the CPU (where the reference products are exact enough)."""
    return (t.float() * scale).to(dtype).cpu().double() / scale


def assert_product_close(got, want, device, rtol, atol):
    """Elementwise on the CPU, which sums in fp32; on CUDA normwise: Hopper's FP8 products round their
    partial sums in fewer bits between fp32 promotions, which leaves a few near-cancelling elements off."""
    got = got.cpu().double()
    if device == "cpu":
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    else:
        assert (got - want).norm() <= 2**-8 * want.norm()


@pytest.mark.parametrize("device, N, d, V", DEVICE_SHAPES)
def test_forward_is_the_product_of_the_fp8_inputs(device, N, d, V):
    x, w, _ = head_inputs(N, d, V, device)
    x_scale, w_scale, grad_scale = scales(N, d)
    logits, x_f8, w_f8 = fp8.fp8_head(x, w, x_scale, w_scale, grad_scale)
    assert logits.shape == (N, V) and logits.dtype == torch.bfloat16
    x_q, w_q = dequantized(x, x_scale, torch.float8_e4m3fn), dequantized(w, w_scale, torch.float8_e4m3fn)
    assert torch.equal(x_f8.cpu().double() / x_scale, x_q) and torch.equal(w_f8.cpu().double() / w_scale, w_q)
    # tight against the quantized inputs' product (only the bf16 output rounds), loose against the exact one
    assert_product_close(logits, x_q @ w_q.t(), device, rtol=2**-8, atol=1e-3)
    exact = x.cpu().double() @ w.cpu().double().t()
    assert (logits.cpu().double() - exact).norm() < 0.1 * exact.norm()


@pytest.mark.parametrize("device, N, d, V", DEVICE_SHAPES)
def test_gradients_are_those_of_the_fp8_product(device, N, d, V):
    x, w, grad = head_inputs(N, d, V, device)
    x_scale, w_scale, grad_scale = scales(N, d)
    x, w = x.requires_grad_(), w.requires_grad_()
    fp8.fp8_head(x, w, x_scale, w_scale, grad_scale)[0].backward(grad)
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32 and w.grad.is_contiguous()
    x_q, w_q = dequantized(x, x_scale, torch.float8_e4m3fn), dequantized(w, w_scale, torch.float8_e4m3fn)
    g_q = dequantized(grad, grad_scale, torch.float8_e5m2)
    assert_product_close(x.grad, g_q @ w_q, device, rtol=2**-7, atol=1e-5)
    assert_product_close(w.grad, g_q.t() @ x_q, device, rtol=1e-5, atol=1e-7)
    exact_w_grad = grad.cpu().double().t() @ x.detach().cpu().double()
    assert (w.grad.cpu().double() - exact_w_grad).norm() < 0.2 * exact_w_grad.norm()


def test_the_head_scales_keep_extreme_values_in_range():
    """fp8_lm_head's scales at their bounds: a unit-RMS row with all its weight in one component (|x_i| =
    sqrt(d)) does not saturate (what lies beyond does, to no NaN), and the gradient at initialization (uniform
    predictions: |g| = 1/N almost) does not overflow."""
    N, d, V = 32, 80, 64
    x = tg.norm(torch.randn(N, d))
    x[0] = F.one_hot(torch.tensor(3), d) * d**0.5
    x = x.bfloat16().requires_grad_()
    w = torch.randn(V, d)
    w_q = dequantized(w, fp8.W_SCALE, torch.float8_e4m3fn)
    torch.testing.assert_close(fp8.fp8_lm_head(x, w)[0].double(), d**0.5 * w_q[:, 3], rtol=2**-4, atol=0)
    assert fp8.to_e4m3(torch.tensor([1e4, -1e4, float("inf")]), 1.0).float().tolist() == [448, -448, 448]
    zero_head = torch.zeros(V, d, requires_grad=True)
    F.cross_entropy(fp8.fp8_lm_head(x, zero_head).float(), torch.arange(N)).backward()
    assert x.grad.isfinite().all() and zero_head.grad.isfinite().all()
    exact = (torch.full((N, V), 1 / V) - torch.eye(N, V)).t() @ x.detach().float() / N
    assert (zero_head.grad - exact).norm() < 0.1 * exact.norm()  # no underflow either


@pytest.mark.parametrize("N, d, V", [(17, 64, 64), (32, 72, 64), (32, 64, 40)])
def test_shapes_fp8_matmuls_cannot_take_are_refused(N, d, V):
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8.fp8_head(torch.zeros(N, d, dtype=torch.bfloat16), torch.zeros(V, d), 1.0, 1.0, 1.0)


def test_the_fakes_match_the_ops():
    x, w, grad = head_inputs(48, 80, 112)
    x_scale, w_scale, grad_scale = scales(48, 80)
    opcheck(torch.ops.gpt.fp8_head.default, (x, w, x_scale, w_scale, grad_scale))  # no gradient: the schema too
    opcheck(torch.ops.gpt.fp8_head.default, (x.requires_grad_(), w.requires_grad_(), x_scale, w_scale, grad_scale),
            test_utils=FAKE_CHECKS)
    _, x_f8, w_f8 = fp8.fp8_head(x, w, x_scale, w_scale, grad_scale)
    opcheck(torch.ops.gpt.fp8_head_backward.default, (grad, x_f8, w_f8, x_scale, w_scale, grad_scale),
            test_utils=FAKE_CHECKS)


def test_the_head_compiles_with_its_gradients():
    """Through AOTAutograd, which traces the fakes and calls the ops: the eager gradients again."""
    x, w, _ = head_inputs(48, 80, 112)

    def loss(x, w):
        return fp8.fp8_lm_head(x.view(3, 16, 80), w).float().logsumexp(-1).mean()

    grads = []
    for run in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        leaves = x.detach().requires_grad_(), w.detach().requires_grad_()
        run(*leaves).backward()
        grads.append([leaf.grad for leaf in leaves])
    for eager, compiled in zip(*grads):
        assert torch.equal(eager, compiled)


def tiny_model(lm_head_fp8):
    config = tg.model_config(replace(SMOKE, window_schedule=(48,), lm_head_fp8=lm_head_fp8))
    return randomized(tg.GPT(config))


def test_the_setting_reaches_the_model():
    assert tg.hyperparameters_from_env({"LM_HEAD_FP8": "1"}).lm_head_fp8
    assert bench_hyperparameters({"LM_HEAD_FP8": "1"}).lm_head_fp8  # LM_HEAD_FP8=1 python -m bench.steptime
    assert tg.GPT(tg.model_config(replace(SMOKE, lm_head_fp8=True))).config.lm_head_fp8
    older = asdict(tiny_model(lm_head_fp8=True).config)
    del older["lm_head_fp8"]  # a checkpoint written before the setting existed
    assert not tg.GPTConfig(**older).lm_head_fp8


def test_only_training_steps_on_cuda_use_it():
    model = tiny_model(lm_head_fp8=True)
    on_cuda, on_cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert model.fp8_head_active(on_cuda) and not model.fp8_head_active(on_cpu)
    with torch.no_grad():  # validation
        assert not model.fp8_head_active(on_cuda)
    assert not model.eval().fp8_head_active(on_cuda)  # sampling
    assert not tiny_model(lm_head_fp8=False).fp8_head_active(on_cuda)


def test_the_model_computes_its_head_in_fp8_when_active(monkeypatch):
    """Training on the CPU with the gate forced open: the head's op runs, the loss and gradients stay close
    to the bf16 head's; in eval mode the logits are the bf16 head's exactly."""
    tokens, cu_seqlens = packed_batch([40, 24])
    targets = torch.roll(tokens, -1)
    runs = {}
    for lm_head_fp8 in (False, True):
        model = tiny_model(lm_head_fp8).embeddings_to(torch.bfloat16)
        if lm_head_fp8:  # the gate as it is, but for a CUDA tensor
            monkeypatch.setattr(model, "fp8_head_active",
                                lambda x, model=model: tg.GPT.fp8_head_active(model, SimpleNamespace(is_cuda=True)))
        loss = model(tokens, targets, cu_seqlens=cu_seqlens)
        loss.backward()
        model.eval()
        with torch.no_grad():
            eval_logits = model(tokens, cu_seqlens=cu_seqlens)
        runs[lm_head_fp8] = loss.detach(), model.lm_head.weight.grad, model.embed.weight.grad.float(), eval_logits
    (loss, head_grad, embed_grad, eval_logits), (fp8_loss, fp8_head_grad, fp8_embed_grad, fp8_eval_logits) = \
        runs[False], runs[True]
    assert fp8_loss != loss and fp8_loss == pytest.approx(loss, rel=0.01)
    assert (fp8_head_grad - head_grad).norm() < 0.1 * head_grad.norm()
    assert (fp8_embed_grad - embed_grad).norm() < 0.1 * embed_grad.norm()
    assert torch.equal(fp8_eval_logits, eval_logits)
