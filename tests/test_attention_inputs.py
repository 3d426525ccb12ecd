"""The attention's inputs (attention_inputs.py): the Triton kernels against the torch code they replace,
forward and every gradient (qkvr, v's mix, the value embedding, r's gain), on the CPU under TRITON_INTERPRET=1
in fp16 and on the GPU in bf16; the model through either path; the ops' registrations and input checks."""
from dataclasses import replace

import pytest
import torch

import attention_inputs as ai
import train_gpt as tg
from test_parallax_kernels import rel_err
from test_train import randomized, tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter case")

# (projections, value embedding, r's gain, r_norm, r_rotary): softmax's three projections, Parallax's default
# probe, and the R_* settings the study compared
CASES = [(3, True, None, True, True), (4, True, "head", True, True), (4, False, "channel", True, True),
         (4, True, None, False, True), (4, False, "head", True, False), (4, True, "channel", False, False)]


def make_inputs(B, T, P, H, D, has_ve, gain, dtype, device):
    """qkvr, ve, v_mix and r_gain, random (a zero gain would hide r's gradient), and the rotary tables."""
    qkvr = 2 * torch.randn(B, T, P, H, D, dtype=dtype, device=device)
    ve = torch.randn(B, T, H * D, dtype=dtype, device=device) if has_ve else None
    v_mix = torch.tensor([0.7, -0.4], device=device)
    r_gain = None if gain is None else torch.randn(H, 1 if gain == "head" else D, device=device)
    rope = tg.RotaryTables(D).prefix(T, torch.device(device))
    return qkvr, ve, v_mix, r_gain, rope


def check_against_torch(B, T, P, H, D, has_ve, gain, r_norm, r_rotary, *, dtype, device, tol):
    qkvr, ve, v_mix, r_gain, rope = make_inputs(B, T, P, H, D, has_ve, gain, dtype, device)
    leaves = [x.requires_grad_() for x in (qkvr, v_mix, ve, r_gain) if x is not None]
    outputs = ai.attention_inputs_triton(qkvr, rope, v_mix, ve, r_gain, r_norm, r_rotary)
    outputs = [x for x in outputs if x is not None]
    assert len(outputs) == P and all(x.shape == (B, T, H, D) and x.dtype == dtype for x in outputs)
    grads_out = [torch.randn_like(x) for x in outputs]
    grads = torch.autograd.grad(outputs, leaves, grads_out)

    ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
    ref_qkvr, ref_mix, *rest = ref_leaves
    ref_ve = rest.pop(0) if has_ve else None
    ref_gain = rest.pop(0) if gain is not None else None
    ref = [x for x in ai.attention_inputs_reference(ref_qkvr, rope, ref_mix, ref_ve, ref_gain, r_norm, r_rotary)
           if x is not None]
    ref_grads = torch.autograd.grad(ref, ref_leaves, [g.float() for g in grads_out])
    names = ["q", "k", "v", "r"][:P] + ["dqkvr", "dv_mix"] + ["dve"] * has_ve + ["dr_gain"] * (gain is not None)
    for name, x, want in zip(names, outputs + list(grads), ref + list(ref_grads)):
        assert x.shape == want.shape, f"{name}: shape {tuple(x.shape)}, want {tuple(want.shape)}"
        assert rel_err(x, want) < tol, f"{name}: relative error {rel_err(x, want):.2e}"


@interpreter
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_torch_cpu(case):
    """19 positions: blocks of 8 with a partial last one; two batch rows."""
    check_against_torch(2, 19, *case[:1], 3, 16, *case[1:], dtype=torch.float16, device="cpu", tol=2e-3)


@interpreter
def test_q_k_r_round_where_the_torch_code_rounds():
    """Rounded to fp16 after the norm and after rotary (before r's gain), as the torch code is: q, k and r
    agree with it to the last bit but for rare one-ulp flips (its fp32 sums run in another order)."""
    qkvr, ve, v_mix, r_gain, rope = make_inputs(2, 64, 4, 3, 32, True, "head", torch.float16, "cpu")
    kernels = ai.attention_inputs_triton(qkvr, rope, v_mix, ve, r_gain)
    torch_code = ai.attention_inputs_reference(qkvr, rope, v_mix, ve, r_gain)
    for name, x, want in zip("qkvr", kernels, torch_code):
        if name != "v":  # v's mix: the kernels round once, torch after each product
            ulps = (x.float() - want.float()).abs() / (want.float().abs().clamp_min(2**-14) * 2**-10)
            assert ulps.max() <= 1 and (ulps > 0).float().mean() < 0.01, name


@cuda
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_torch_gpu(case):
    check_against_torch(1, 1000, *case[:1], 6, 128, *case[1:], dtype=torch.bfloat16, device="cuda", tol=1e-2)


@cuda
def test_cuda_training_shapes_take_the_kernels_and_decode_steps_torch():
    qkvr, ve, v_mix, r_gain, rope = make_inputs(1, 64, 4, 6, 128, True, "head", torch.bfloat16, "cuda")
    assert ai.fused_kernels_apply(qkvr, rope)
    assert torch.equal(ai.attention_inputs(qkvr, rope, v_mix, ve, r_gain)[3],
                       ai.attention_inputs_triton(qkvr, rope, v_mix, ve, r_gain)[3])
    per_sequence = tuple(t[:4, None] for t in rope)  # a decode step: one position per batch row
    assert not ai.fused_kernels_apply(qkvr[:4, :1], per_sequence)
    assert not ai.fused_kernels_apply(qkvr.float(), rope)


def test_cpu_takes_torch():
    qkvr, _, _, _, rope = make_inputs(1, 8, 4, 2, 16, False, None, torch.float16, "cpu")
    assert not ai.fused_kernels_apply(qkvr, rope)


@interpreter
def test_model_through_the_kernels_matches_torch(monkeypatch):
    """A Parallax model with value embeddings, a per-channel gain and r not rotated, run with the kernels in
    place of the torch code: the same loss and gradients (fp16 activations)."""
    config = replace(tiny_config("parallax", r_gain="channel", r_rotary=False), num_value_embeds=1)
    model = randomized(tg.GPT(config)).embeddings_to(torch.float16)
    tokens = torch.randint(0, config.vocab_size, (41,))
    cu_seqlens = torch.tensor([0, 1, 30, 40], dtype=torch.int32)
    runs = []
    for route in (ai.attention_inputs_reference, ai.attention_inputs_triton):
        monkeypatch.setattr(tg, "attention_inputs", route)
        model.zero_grad()
        loss = model(tokens[:-1], tokens[1:], cu_seqlens=cu_seqlens)
        loss.backward()
        runs.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (loss_torch, grads_torch), (loss_kernels, grads_kernels) = runs
    assert abs(loss_torch - loss_kernels) < 1e-3 * loss_torch
    for name, grad in grads_torch.items():
        assert rel_err(grads_kernels[name], grad) < 2e-2, name


@interpreter
def test_custom_ops_pass_opcheck_cpu():
    """Schemas, fake functions, autograd registration and AOT dispatch, as torch.compile uses them."""
    qkvr, ve, v_mix, r_gain, (cos, sin) = make_inputs(1, 10, 4, 2, 16, True, "head", torch.float16, "cpu")
    args = (qkvr, cos, sin, v_mix.requires_grad_(), ve.view(1, 10, 2, 16), r_gain.requires_grad_(), True, True)
    forward = torch.library.opcheck(torch.ops.gpt.attention_inputs.default, args)
    grads = [torch.randn(1, 10, 2, 16, dtype=torch.float16) for _ in range(4)]
    args = (grads, qkvr, cos, sin, v_mix.detach(), ve.view(1, 10, 2, 16), r_gain.detach(), True, True)
    backward = torch.library.opcheck(torch.ops.gpt.attention_inputs_backward.default, args)
    assert set(forward.values()) == set(backward.values()) == {"SUCCESS"}


@pytest.mark.parametrize("change, message", [
    (dict(qkvr=torch.zeros(1, 8, 2, 2, 16)), "3 .q, k, v. or 4"),
    (dict(ve=torch.zeros(1, 8, 16)), "ve must hold"),
    (dict(r_gain=torch.zeros(2, 3)), r"r_gain must be \(2, 1\) or \(2, 16\)"),
])
def test_bad_inputs_raise_value_error(change, message):
    qkvr, ve, v_mix, r_gain, rope = make_inputs(1, 8, 4, 2, 16, True, "head", torch.float16, "cpu")
    args = dict(qkvr=qkvr, rope=rope, v_mix=v_mix, ve=ve, r_gain=r_gain) | change
    with pytest.raises(ValueError, match=message):
        ai.attention_inputs_triton(**args)
