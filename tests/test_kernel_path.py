"""The model, training loop and sampler run through the Triton kernels on the CPU (interpreter, fp16),
against the same runs through the reference.

On the CPU the model calls parallax_reference for training attention (in parallax_kernels.packed_attention)
and parallax_decode's reference backend for decode; these tests replace those two names in parallax_kernels
and generate with stand-ins that run the kernels instead (parallax_attn for training and prefill,
parallax_decode_triton for decode), so the model's calls (arguments, layout, scale, window, documents)
reach the kernels unchanged."""
from dataclasses import replace

import pytest
import torch

import parallax_decode
import parallax_kernels
import generate as gen
import train_gpt as tg
from records.compare import parse_log
from test_sample import PROMPTS, tiny_model
from test_train import packed_batch, randomized, smoke_run, tiny_config  # noqa: F401  (smoke_run: a fixture)


def route_through_kernels(monkeypatch):
    """Route the model's CPU attention through the Triton kernels; counts the calls that reached them."""
    calls = {"attn": 0, "decode": 0}

    def attn(q, r, k, v, **kwargs):  # in place of parallax_reference (float32 on the CPU)
        calls["attn"] += 1
        return parallax_kernels.parallax_attn(*(x.half() for x in (q, r, k, v)), **kwargs).to(q.dtype)

    def decode(q, r, k_cache, v_cache, lengths, *, window=None, scale=None):  # in place of parallax_decode
        calls["decode"] += 1
        half = (x.half() for x in (q, r, k_cache, v_cache))
        return parallax_decode.parallax_decode_triton(*half, lengths, window=window, scale=scale).to(q.dtype)

    monkeypatch.setattr(parallax_kernels, "parallax_reference", attn)
    monkeypatch.setattr(gen, "parallax_decode", decode)
    return calls


def loss_and_grads(model, tokens, cu_seqlens):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, tokens.roll(-1).long(), cu_seqlens=cu_seqlens)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter path")
def test_model_gradients_through_kernels_match_reference(monkeypatch):
    """A randomized model (r, scale 0.12, window 48 = 3 interpreter tiles, packed documents): loss and
    every parameter's gradient through the kernels equal those through the reference."""
    model = randomized(tg.GPT(tiny_config("parallax")), seed=3)
    assert model.config.attn_scale == 0.12
    tokens, cu_seqlens = packed_batch([70, 5, 53])
    want_loss, want = loss_and_grads(model, tokens, cu_seqlens)
    calls = route_through_kernels(monkeypatch)
    loss, got = loss_and_grads(model, tokens, cu_seqlens)
    assert calls["attn"] == model.config.num_layers
    assert abs(loss.item() - want_loss.item()) < 2e-3 * abs(want_loss.item())
    assert got.keys() == want.keys() and any(".attn.r." in name for name in got)
    for name in want:
        err = ((got[name] - want[name]).norm() / want[name].norm()).item()
        assert err < 2e-2, f"{name}: relative error {err:.2e}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter path")
def test_training_steps_through_kernels_match_reference(smoke_run, monkeypatch):  # noqa: F811
    """Three optimizer steps of train_gpt.train with the kernels on, against the same run on the reference."""
    hp = replace(smoke_run, seq_len=128, micro_batches=1, num_iterations=3, val_tokens=128, val_every=3,
                 window_schedule=(17, 34), save_every=0)  # windows: one tile + 1, two tiles + 2 (interpreter)
    assert tg.train(replace(hp, run_name="reference")) == 0
    calls = route_through_kernels(monkeypatch)
    assert tg.train(replace(hp, run_name="kernels")) == 0
    assert calls["attn"] >= 3 * hp.num_layers  # every step, every layer (and validation)
    reference, kernels = parse_log("logs/reference.txt"), parse_log("logs/kernels.txt")
    assert kernels["status"] == "complete" and [s for s, _ in kernels["train"]] == [1, 2, 3]
    for (step, got), (_, want) in zip(kernels["train"] + kernels["val"], reference["train"] + reference["val"]):
        assert abs(got - want) < 1e-2, (step, got, want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter path")
def test_generation_through_kernels_matches_reference(monkeypatch):
    """Prefill through parallax_attn and decode through the Triton decode kernel give the tokens the
    reference gives (greedy, prompts of different lengths, past the 48-key window)."""
    model = tiny_model("parallax", seed=4)
    short = [PROMPTS[0], PROMPTS[2]] + [[tg.BOS] + list(range(200, 240))]
    want = gen.generate(model, short, 14, stop_token=None).tokens  # the reference first
    calls = route_through_kernels(monkeypatch)
    got = gen.generate(model, short, 14, stop_token=None).tokens
    assert calls["attn"] == model.config.num_layers and calls["decode"] == 13 * model.config.num_layers
    assert got == want
