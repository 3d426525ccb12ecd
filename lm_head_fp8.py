"""The FP8 LM head (LM_HEAD_FP8 in train_gpt.py): the head's three matmuls in FP8, as modded-nanoGPT's
record of 2025-01-16 computes them: x and w in e4m3, the logits' gradient in e5m2 (range over precision).

Two custom ops, gpt::fp8_head and gpt::fp8_head_backward, keep torch.compile from looking inside (their
fakes give the shapes and strides); on CUDA each op's body runs as its own inductor-compiled function, so
its casts, scales and transposes are fused kernels rather than one eager pass each. Every scale is a power
of two (exact to apply and to undo) chosen to keep every value inside FP8's range.
"""
import math

import torch
from torch import Tensor

E4M3_MAX = 448.0  # float8_e4m3fn's largest value, for x and w
E5M2_GRAD_MAX = 2.0**14  # bound on the scaled gradient, 3.5x under float8_e5m2's 57344 (beyond it: inf)
W_SCALE = 16.0  # |w| up to 28: Adam moves a weight < 1.6 x head_lr a step, < 15 in 1385 steps


def check_shapes(x: Tensor, w: Tensor):
    """FP8 matmuls (torch._scaled_mm) take only dimensions that are multiples of 16."""
    if x.dtype != torch.bfloat16 or x.ndim != 2 or w.ndim != 2 or x.size(1) != w.size(1) \
            or any(n % 16 for n in (*x.shape, w.size(0))):
        raise ValueError(f"the FP8 LM head needs x (N, d) in bf16 and w (V, d) with N, d and V multiples of 16; got "
                         f"x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)}")


def to_e4m3(t: Tensor, scale: float) -> Tensor:
    """t * scale in float8_e4m3fn, saturated: some torch versions cast what lies beyond 448 to NaN."""
    return (t * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).contiguous()


def inverse_scale(scale: float, like: Tensor) -> Tensor:
    return torch.full((), 1 / scale, dtype=torch.float32, device=like.device)  # a fill: no host-to-device copy


def compiled_on_cuda(body):
    """body compiled by inductor when its first argument is on CUDA (a graph per shape and scale), eager
    elsewhere (the CPU tests run the same body)."""
    compiled = torch.compile(body, dynamic=False, fullgraph=True)

    def run(*args):
        return (compiled if args[0].is_cuda else body)(*args)

    return run


@compiled_on_cuda
def _product(x: Tensor, w: Tensor, x_scale: float, w_scale: float):
    x_f8, w_f8 = to_e4m3(x, x_scale), to_e4m3(w, w_scale)
    logits = torch._scaled_mm(x_f8, w_f8.t(), scale_a=inverse_scale(x_scale, x), scale_b=inverse_scale(w_scale, x),
                              out_dtype=torch.bfloat16)
    return logits, x_f8, w_f8


@compiled_on_cuda
def _gradients(grad: Tensor, x_f8: Tensor, w_f8: Tensor, x_scale: float, w_scale: float, grad_scale: float):
    """_scaled_mm takes its first operand row-major and its second column-major: grad_w's product needs the
    gradient transposed (the one large copy; fused with its cast when compiled)."""
    g_f8 = (grad * grad_scale).to(torch.float8_e5m2)  # in range by grad_scale's choice: no clamp
    scale_g, scale_x, scale_w = (inverse_scale(s, grad) for s in (grad_scale, x_scale, w_scale))
    grad_x = torch._scaled_mm(g_f8, w_f8.t().contiguous().t(), scale_a=scale_g, scale_b=scale_w,
                              out_dtype=torch.bfloat16)
    grad_w = torch._scaled_mm(g_f8.t().contiguous(), x_f8.t().contiguous().t(), scale_a=scale_g, scale_b=scale_x,
                              out_dtype=torch.float32)
    return grad_x, grad_w


@torch.library.custom_op("gpt::fp8_head", mutates_args=())
def fp8_head(x: Tensor, w: Tensor, x_scale: float, w_scale: float, grad_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, d) @ w (V, d).T in e4m3 -> (logits (N, V) bf16, and x and w in e4m3 for the backward)."""
    check_shapes(x, w)
    return _product(x, w, x_scale, w_scale)


@fp8_head.register_fake
def _(x, w, x_scale, w_scale, grad_scale):
    check_shapes(x, w)
    return x.new_empty(x.size(0), w.size(0)), x.new_empty(x.shape, dtype=torch.float8_e4m3fn), \
        w.new_empty(w.shape, dtype=torch.float8_e4m3fn)


@torch.library.custom_op("gpt::fp8_head_backward", mutates_args=())
def fp8_head_backward(grad: Tensor, x_f8: Tensor, w_f8: Tensor, x_scale: float, w_scale: float,
                      grad_scale: float) -> tuple[Tensor, Tensor]:
    """The logits' gradient (N, V) -> (grad_x (N, d) bf16, grad_w (V, d) fp32)."""
    return _gradients(grad.contiguous(), x_f8, w_f8, x_scale, w_scale, grad_scale)


@fp8_head_backward.register_fake
def _(grad, x_f8, w_f8, x_scale, w_scale, grad_scale):
    return grad.new_empty(x_f8.shape), grad.new_empty(w_f8.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.scales = inputs[2:]
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero gradients made for x_f8 and w_f8


def _backward(ctx, grad_logits, *_):
    return *fp8_head_backward(grad_logits, *ctx.saved_tensors, *ctx.scales), None, None, None


fp8_head.register_autograd(_backward, setup_context=_setup_context)


def fp8_lm_head(x: Tensor, w: Tensor) -> Tensor:
    """x (..., d) @ w.T through gpt::fp8_head, for unit-RMS rows of x whose loss is a mean over them (as in
    train_gpt's GPT.forward): then |x_i| <= sqrt(d), and |d loss / d logit| <= 1 / rows (softcap,
    accumulation: less)."""
    rows = x.reshape(-1, x.size(-1))
    x_scale = 2.0 ** math.floor(math.log2(E4M3_MAX / math.sqrt(x.size(-1))))
    grad_scale = 2.0 ** math.floor(math.log2(E5M2_GRAD_MAX * rows.size(0)))
    return fp8_head(rows, w, x_scale, W_SCALE, grad_scale)[0].view(*x.shape[:-1], w.size(0))
