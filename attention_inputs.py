"""The attention's inputs from the layer's q/k/v(/r) projection: RMS norm and rotary on q and k, Parallax's
probe r (norm, rotary, gain: train_gpt.py's R_* settings), v mixed with the value embedding.

    q, k, v, r = attention_inputs(qkvr, rope, v_mix, ve, r_gain, r_norm, r_rotary)

On CUDA (bf16/fp16, D / 2 a power of two, one rotary table row per position) one Triton kernel does it all
forward and one backward, behind the custom ops gpt::attention_inputs(_backward); elsewhere the same math runs in
torch (attention_inputs_reference). Inductor compiled the torch code into kernels that took 0.98 ms of GPU time per
layer, forward and backward, for Parallax's q, k, v, r at T = 65536 (H200); these take 0.56 ms, against 0.49 ms
for a copy of the bytes they move (`python -m bench.attention_inputs`). Softmax's q, k, v: 0.62 against 0.38 ms.
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NORM_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default for bf16/fp16 inputs (it computes in fp32)
_BLOCK_T = 8 if INTERPRET else 16  # positions per program (16, 32, 64 timed on an H200: 16 fastest)


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: Tensor, rope) -> Tensor:
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


def probe(r: Tensor, rope, r_gain: Tensor | None, r_norm: bool, r_rotary: bool) -> Tensor:
    """Parallax's r from its projection: u = r.k is not scaled, so r's size sets how far the output moves
    from softmax's."""
    if r_norm:
        r = norm(r)
    if r_rotary:
        r = apply_rotary(r, rope)
    return r if r_gain is None else r_gain.type_as(r) * r


def attention_inputs_reference(qkvr: Tensor, rope, v_mix: Tensor, ve: Tensor | None, r_gain: Tensor | None,
                               r_norm: bool = True, r_rotary: bool = True) -> tuple:
    """q, k, v, r (None without an r projection) from qkvr (B, T, P, H, D), P = 3 (q, k, v) or 4 (and r):
    q and k normed and rotated; v = v_mix[0] v + v_mix[1] ve (ve: (B, T, H * D) or None)."""
    q, k, v, *r = qkvr.unbind(2)
    q, k = apply_rotary(norm(q), rope), apply_rotary(norm(k), rope)
    v = v_mix[0] * v
    if ve is not None:
        v = v + v_mix[1] * ve.view(v.shape)
    return q, k, v, probe(r[0], rope, r_gain, r_norm, r_rotary) if r else None


def attention_inputs(qkvr: Tensor, rope, v_mix: Tensor, ve: Tensor | None, r_gain: Tensor | None,
                     r_norm: bool = True, r_rotary: bool = True) -> tuple:
    """attention_inputs_reference's result, through the Triton kernels where fused_kernels_apply."""
    if not fused_kernels_apply(qkvr, rope):
        return attention_inputs_reference(qkvr, rope, v_mix, ve, r_gain, r_norm, r_rotary)
    return attention_inputs_triton(qkvr, rope, v_mix, ve, r_gain, r_norm, r_rotary)


def fused_kernels_apply(qkvr: Tensor, rope) -> bool:
    """CUDA, half precision, D / 2 a power of two, and rotary tables (T, 1, D / 2): one row per position,
    shared by the batch rows (a decode step's per-sequence positions take the torch path). The CPU tests call
    attention_inputs_triton under TRITON_INTERPRET=1."""
    B, T, P, H, D = qkvr.shape
    half = D // 2
    return (qkvr.is_cuda and qkvr.dtype in (torch.bfloat16, torch.float16) and D % 2 == 0
            and half >= 4 and half & (half - 1) == 0 and all(t.shape == (T, 1, half) for t in rope))


def attention_inputs_triton(qkvr: Tensor, rope, v_mix: Tensor, ve: Tensor | None, r_gain: Tensor | None,
                            r_norm: bool = True, r_rotary: bool = True) -> tuple:
    """attention_inputs through the Triton kernels (see fused_kernels_apply for what they take)."""
    B, T, P, H, D = qkvr.shape
    if P not in (3, 4):
        raise ValueError(f"qkvr must stack 3 (q, k, v) or 4 (q, k, v, r) projections in dim 2, got shape "
                         f"{tuple(qkvr.shape)}")
    if ve is not None and ve.numel() != B * T * H * D:
        raise ValueError(f"ve must hold B * T * H * D = {B * T * H * D} values, got shape {tuple(ve.shape)}")
    if r_gain is not None and r_gain.shape not in ((H, 1), (H, D)):
        raise ValueError(f"r_gain must be ({H}, 1) or ({H}, {D}), got {tuple(r_gain.shape)}")
    cos, sin = rope
    outputs = _forward_op(qkvr, cos, sin, v_mix, None if ve is None else ve.reshape(B, T, H, D), r_gain,
                          r_norm, r_rotary)
    return *outputs[:3], outputs[3] if P == 4 else None


# ----------------------------------------------------------------------------------------------
# Triton kernels: one program per BLOCK_T positions of one (batch row, head), every projection of it. Each
# row of D values is handled as its two halves, the pairs rotary turns. A program issues all its loads before
# its first store: the compiler may not move a load past a store to a pointer that could alias it.


@triton.jit
def _load_halves(ptr, offs, ok, HALF: tl.constexpr):
    return tl.load(ptr + offs, mask=ok[:, None], other=0.0), tl.load(ptr + offs + HALF, mask=ok[:, None], other=0.0)


@triton.jit
def _store_halves(ptr, offs, ok, lo, hi, HALF: tl.constexpr):
    tl.store(ptr + offs, lo.to(ptr.dtype.element_ty), mask=ok[:, None])
    tl.store(ptr + offs + HALF, hi.to(ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x rounded to dtype where the torch code rounds, kept in fp32 for what follows."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _mix_weight(V_MIX, i, dtype: tl.constexpr):
    """v_mix[i], rounded to v's dtype as torch's product of a 0-dim fp32 tensor and a half tensor rounds it."""
    return _rounded(tl.load(V_MIX + i), dtype)


@triton.jit
def _rms_scale(lo, hi, eps, D: tl.constexpr):
    """Per row, 1 / sqrt(mean of squares + eps)."""
    return tl.rsqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / D + eps)


@triton.jit
def _rotate(lo, hi, cos, sin):
    return lo * cos + hi * sin, hi * cos - lo * sin


@triton.jit
def _norm_rotary(lo, hi, cos, sin, eps, dtype: tl.constexpr, D: tl.constexpr, NORM: tl.constexpr,
                 ROTARY: tl.constexpr):
    """rotary(norm(x)) in fp32, rounded to dtype where the torch code rounds (after the norm, after rotary)."""
    lo, hi = lo.to(tl.float32), hi.to(tl.float32)
    if NORM:
        rstd = _rms_scale(lo, hi, eps, D)[:, None]
        lo, hi = _rounded(lo * rstd, dtype), _rounded(hi * rstd, dtype)
    if ROTARY:
        lo, hi = _rotate(lo, hi, cos, sin)
    return _rounded(lo, dtype), _rounded(hi, dtype)


@triton.jit
def _norm_rotary_grad(x_lo, x_hi, g_lo, g_hi, cos, sin, eps, D: tl.constexpr, NORM: tl.constexpr,
                      ROTARY: tl.constexpr):
    """The gradient of rotary(norm(x)) at x, given g (fp32): rotary turns back, then the norm's
    rstd (g - n mean(g n)) with n = x rstd."""
    if ROTARY:
        g_lo, g_hi = _rotate(g_lo, g_hi, cos, -sin)
    if NORM:
        x_lo, x_hi = x_lo.to(tl.float32), x_hi.to(tl.float32)
        rstd = _rms_scale(x_lo, x_hi, eps, D)[:, None]
        n_lo, n_hi = x_lo * rstd, x_hi * rstd
        mean_gn = ((tl.sum(g_lo * n_lo, axis=1) + tl.sum(g_hi * n_hi, axis=1)) / D)[:, None]
        g_lo, g_hi = rstd * (g_lo - n_lo * mean_gn), rstd * (g_hi - n_hi * mean_gn)
    return g_lo, g_hi


@triton.jit
def _gain_halves(R_GAIN, h, stride_gh, stride_gd, dtype: tl.constexpr, HALF: tl.constexpr):
    """Head h's gain over the two halves (stride_gd 0: one gain per head), rounded to dtype as torch's
    gain.type_as(r) is."""
    gain = R_GAIN + h * stride_gh + tl.arange(0, HALF)[None, :] * stride_gd
    return _rounded(tl.load(gain), dtype), _rounded(tl.load(gain + HALF * stride_gd), dtype)


@triton.jit
def _block(COS, SIN, T, n_heads, stride_xb, stride_xt, D: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's positions: their validity, offsets into qkvr's (head, first half) and into the
    (B, T, H, D) outputs, their rotary rows; the program's index and its head. The heads of a block of
    positions are neighbours in the grid, so they read the same rotary rows from L2."""
    HALF: tl.constexpr = D // 2
    pid_bh, pid_t = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < T
    cols = tl.arange(0, HALF)[None, :]
    x_offs = b * stride_xb + rows[:, None] * stride_xt + h * D + cols
    out_offs = ((b * T + rows[:, None]) * n_heads + h) * D + cols
    cos = tl.load(COS + rows[:, None] * HALF + cols, mask=ok[:, None], other=1.0)
    sin = tl.load(SIN + rows[:, None] * HALF + cols, mask=ok[:, None], other=0.0)
    return ok, x_offs, out_offs, cos, sin, pid_t * tl.num_programs(0) + pid_bh, h


@triton.jit
def _inputs_forward_kernel(X, COS, SIN, V_MIX, VE, R_GAIN, Q, K, V, R,
                           stride_xb, stride_xt, stride_xp, stride_gh, stride_gd, T, n_heads, eps,
                           D: tl.constexpr, HAS_VE: tl.constexpr, HAS_R: tl.constexpr, HAS_GAIN: tl.constexpr,
                           R_NORM: tl.constexpr, R_ROTARY: tl.constexpr, BLOCK_T: tl.constexpr):
    HALF: tl.constexpr = D // 2
    ok, x_offs, out_offs, cos, sin, _, h = _block(COS, SIN, T, n_heads, stride_xb, stride_xt, D, BLOCK_T)
    dtype = Q.dtype.element_ty
    q_lo, q_hi = _load_halves(X, x_offs, ok, HALF)
    k_lo, k_hi = _load_halves(X + stride_xp, x_offs, ok, HALF)
    v_lo, v_hi = _load_halves(X + 2 * stride_xp, x_offs, ok, HALF)
    if HAS_VE:
        ve_lo, ve_hi = _load_halves(VE, out_offs, ok, HALF)
    if HAS_R:
        r_lo, r_hi = _load_halves(X + 3 * stride_xp, x_offs, ok, HALF)

    q_lo, q_hi = _norm_rotary(q_lo, q_hi, cos, sin, eps, dtype, D, True, True)
    _store_halves(Q, out_offs, ok, q_lo, q_hi, HALF)
    k_lo, k_hi = _norm_rotary(k_lo, k_hi, cos, sin, eps, dtype, D, True, True)
    _store_halves(K, out_offs, ok, k_lo, k_hi, HALF)
    # v = v_mix[0] v + v_mix[1] ve
    mix_v = _mix_weight(V_MIX, 0, dtype)
    v_lo, v_hi = mix_v * v_lo.to(tl.float32), mix_v * v_hi.to(tl.float32)
    if HAS_VE:
        mix_ve = _mix_weight(V_MIX, 1, dtype)
        v_lo, v_hi = v_lo + mix_ve * ve_lo.to(tl.float32), v_hi + mix_ve * ve_hi.to(tl.float32)
    _store_halves(V, out_offs, ok, v_lo, v_hi, HALF)
    if HAS_R:
        r_lo, r_hi = _norm_rotary(r_lo, r_hi, cos, sin, eps, dtype, D, R_NORM, R_ROTARY)
        if HAS_GAIN:
            gain_lo, gain_hi = _gain_halves(R_GAIN, h, stride_gh, stride_gd, dtype, HALF)
            r_lo, r_hi = r_lo * gain_lo, r_hi * gain_hi
        _store_halves(R, out_offs, ok, r_lo, r_hi, HALF)


@triton.jit
def _inputs_backward_kernel(GQ, GK, GV, GR, X, COS, SIN, V_MIX, VE, R_GAIN, DX, DVE, MIX_PARTS, GAIN_PARTS,
                            stride_xb, stride_xt, stride_xp, stride_gh, stride_gd, T, n_heads, eps,
                            D: tl.constexpr, HAS_VE: tl.constexpr, HAS_R: tl.constexpr, HAS_GAIN: tl.constexpr,
                            R_NORM: tl.constexpr, R_ROTARY: tl.constexpr, BLOCK_T: tl.constexpr):
    """dqkvr (qkvr's layout), dve, and per program the sums the mix and gain gradients add up (MIX_PARTS:
    2 per program; GAIN_PARTS: D per program, this program's head's channels)."""
    HALF: tl.constexpr = D // 2
    ok, x_offs, out_offs, cos, sin, program, h = _block(COS, SIN, T, n_heads, stride_xb, stride_xt, D, BLOCK_T)
    dtype = X.dtype.element_ty
    gq_lo, gq_hi = _load_halves(GQ, out_offs, ok, HALF)
    q_lo, q_hi = _load_halves(X, x_offs, ok, HALF)
    gk_lo, gk_hi = _load_halves(GK, out_offs, ok, HALF)
    k_lo, k_hi = _load_halves(X + stride_xp, x_offs, ok, HALF)
    gv_lo, gv_hi = _load_halves(GV, out_offs, ok, HALF)
    v_lo, v_hi = _load_halves(X + 2 * stride_xp, x_offs, ok, HALF)
    if HAS_VE:
        ve_lo, ve_hi = _load_halves(VE, out_offs, ok, HALF)
    if HAS_R:
        gr_lo, gr_hi = _load_halves(GR, out_offs, ok, HALF)
        r_lo, r_hi = _load_halves(X + 3 * stride_xp, x_offs, ok, HALF)

    gq_lo, gq_hi = _norm_rotary_grad(q_lo, q_hi, gq_lo.to(tl.float32), gq_hi.to(tl.float32), cos, sin, eps, D,
                                     True, True)
    _store_halves(DX, x_offs, ok, gq_lo, gq_hi, HALF)
    gk_lo, gk_hi = _norm_rotary_grad(k_lo, k_hi, gk_lo.to(tl.float32), gk_hi.to(tl.float32), cos, sin, eps, D,
                                     True, True)
    _store_halves(DX + stride_xp, x_offs, ok, gk_lo, gk_hi, HALF)
    gv_lo, gv_hi = gv_lo.to(tl.float32), gv_hi.to(tl.float32)
    mix_v = _mix_weight(V_MIX, 0, dtype)
    _store_halves(DX + 2 * stride_xp, x_offs, ok, mix_v * gv_lo, mix_v * gv_hi, HALF)
    tl.store(MIX_PARTS + 2 * program, tl.sum(gv_lo * v_lo.to(tl.float32) + gv_hi * v_hi.to(tl.float32)))
    if HAS_VE:
        mix_ve = _mix_weight(V_MIX, 1, dtype)
        _store_halves(DVE, out_offs, ok, mix_ve * gv_lo, mix_ve * gv_hi, HALF)
        tl.store(MIX_PARTS + 2 * program + 1, tl.sum(gv_lo * ve_lo.to(tl.float32) + gv_hi * ve_hi.to(tl.float32)))
    if HAS_R:
        gr_lo, gr_hi = gr_lo.to(tl.float32), gr_hi.to(tl.float32)
        if HAS_GAIN:
            # r = gain * n: the gain's gradient sums g n over the positions, n's gradient is gain * g
            n_lo, n_hi = _norm_rotary(r_lo, r_hi, cos, sin, eps, dtype, D, R_NORM, R_ROTARY)
            cols = tl.arange(0, HALF)
            tl.store(GAIN_PARTS + program * D + cols, tl.sum(gr_lo * n_lo, axis=0))
            tl.store(GAIN_PARTS + program * D + HALF + cols, tl.sum(gr_hi * n_hi, axis=0))
            gain_lo, gain_hi = _gain_halves(R_GAIN, h, stride_gh, stride_gd, dtype, HALF)
            gr_lo, gr_hi = gr_lo * gain_lo, gr_hi * gain_hi
        gr_lo, gr_hi = _norm_rotary_grad(r_lo, r_hi, gr_lo, gr_hi, cos, sin, eps, D, R_NORM, R_ROTARY)
        _store_halves(DX + 3 * stride_xp, x_offs, ok, gr_lo, gr_hi, HALF)


def _launch(qkvr, r_gain, r_norm, r_rotary, has_ve):
    """Grid and the arguments both kernels share (qkvr's strides, the gain's, the flags)."""
    B, T, P, H, D = qkvr.shape
    gain_strides = (0, 0) if r_gain is None else (r_gain.stride(0), r_gain.stride(1) if r_gain.size(1) > 1 else 0)
    grid = (B * H, triton.cdiv(T, _BLOCK_T))
    return grid, dict(stride_xb=qkvr.stride(0), stride_xt=qkvr.stride(1), stride_xp=qkvr.stride(2),
                      stride_gh=gain_strides[0], stride_gd=gain_strides[1], T=T, n_heads=H, eps=NORM_EPS, D=D,
                      HAS_VE=has_ve, HAS_R=P == 4, HAS_GAIN=r_gain is not None, R_NORM=r_norm, R_ROTARY=r_rotary,
                      BLOCK_T=_BLOCK_T, num_warps=4)


def _kernel_layout(*tensors):
    """Each tensor (or None) contiguous, as the kernels index them and lay out their gradients (a linear layer's
    output viewed (B, T, P, H, D) is already)."""
    return [x if x is None or x.is_contiguous() else x.contiguous() for x in tensors]


# ----------------------------------------------------------------------------------------------
# torch custom ops: opaque to torch.compile, with autograd


@torch.library.custom_op("gpt::attention_inputs", mutates_args=())
def _forward_op(qkvr: Tensor, cos: Tensor, sin: Tensor, v_mix: Tensor, ve: Tensor | None, r_gain: Tensor | None,
                r_norm: bool, r_rotary: bool) -> list[Tensor]:
    qkvr, ve, cos, sin = _kernel_layout(qkvr, ve, cos, sin)
    B, T, P, H, D = qkvr.shape
    outputs = [qkvr.new_empty(B, T, H, D) for _ in range(P)]
    grid, args = _launch(qkvr, r_gain, r_norm, r_rotary, ve is not None)
    q, k, v, r = outputs + outputs[:1] * (4 - P)  # without r, its pointer is never written
    _inputs_forward_kernel[grid](qkvr, cos, sin, v_mix, ve, r_gain, q, k, v, r, **args)
    return outputs


@_forward_op.register_fake
def _(qkvr, cos, sin, v_mix, ve, r_gain, r_norm, r_rotary):
    B, T, P, H, D = qkvr.shape
    return [qkvr.new_empty(B, T, H, D) for _ in range(P)]


@torch.library.custom_op("gpt::attention_inputs_backward", mutates_args=())
def _backward_op(grads: list[Tensor], qkvr: Tensor, cos: Tensor, sin: Tensor, v_mix: Tensor, ve: Tensor | None,
                 r_gain: Tensor | None, r_norm: bool, r_rotary: bool) -> list[Tensor]:
    """[dqkvr, dv_mix, dve (empty without ve), dr_gain (empty without a gain)]."""
    qkvr, ve, cos, sin, *grads = _kernel_layout(qkvr, ve, cos, sin, *grads)
    B, T, P, H, D = qkvr.shape
    dqkvr = torch.empty_like(qkvr)
    dve = torch.empty_like(ve) if ve is not None else qkvr.new_empty(0)
    grid, args = _launch(qkvr, r_gain, r_norm, r_rotary, ve is not None)
    programs = grid[0] * grid[1]
    mix_parts = torch.zeros(programs, 2, device=qkvr.device, dtype=torch.float32)
    gain_parts = torch.empty(programs, D if r_gain is not None else 0, device=qkvr.device, dtype=torch.float32)
    gq, gk, gv, gr = grads + grads[:1] * (4 - P)
    _inputs_backward_kernel[grid](gq, gk, gv, gr, qkvr, cos, sin, v_mix, ve, r_gain, dqkvr, dve, mix_parts, gain_parts,
                                  **args)
    dgain = qkvr.new_empty(0, dtype=torch.float32)
    if r_gain is not None:
        # program index = position block * (B * H) + b * H + h: sum over blocks and batch rows
        dgain = gain_parts.view(-1, H, D).sum(0)
        dgain = (dgain if r_gain.size(1) == D else dgain.sum(1, keepdim=True)).to(r_gain.dtype)
    return [dqkvr, mix_parts.sum(0).to(v_mix.dtype), dve, dgain]


@_backward_op.register_fake
def _(grads, qkvr, cos, sin, v_mix, ve, r_gain, r_norm, r_rotary):
    dve = torch.empty_like(ve, memory_format=torch.contiguous_format) if ve is not None else qkvr.new_empty(0)
    dgain = torch.empty_like(r_gain) if r_gain is not None else qkvr.new_empty(0, dtype=torch.float32)
    return [torch.empty_like(qkvr, memory_format=torch.contiguous_format), torch.empty_like(v_mix), dve, dgain]


def _setup_context(ctx, inputs, output):
    qkvr, cos, sin, v_mix, ve, r_gain, r_norm, r_rotary = inputs
    ctx.save_for_backward(qkvr, cos, sin, v_mix, ve, r_gain)
    ctx.flags = r_norm, r_rotary


def _backward_rule(ctx, grads):
    qkvr, cos, sin, v_mix, ve, r_gain = ctx.saved_tensors
    B, T, P, H, D = qkvr.shape
    grads = [qkvr.new_zeros(B, T, H, D) if g is None else g for g in grads]  # an output the loss did not use
    dqkvr, dv_mix, dve, dgain = _backward_op(grads, qkvr, cos, sin, v_mix, ve, r_gain, *ctx.flags)
    return (dqkvr, None, None, dv_mix, dve if ve is not None else None, dgain if r_gain is not None else None,
            None, None)


_forward_op.register_autograd(_backward_rule, setup_context=_setup_context)
