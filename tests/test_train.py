"""train_gpt.py's model and training loop, on the CPU: the smoke configuration on synthetic data."""
import itertools
import os
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

import attention_inputs
import train_gpt as tg
from gpt2_data import GPT2_VOCAB
from records.compare import parse_log
from test_loader import write_shard

SMOKE = replace(tg.Hyperparameters(), **tg.SMOKE_CONFIG)


def pattern_corpus(num_tokens, seed):
    """Documents that count upwards modulo 16 from a random start: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    tokens = []
    while len(tokens) < num_tokens:
        start, length = rng.integers(0, 16), rng.integers(20, 200)
        tokens += [tg.BOS] + [int((start + i) % 16) for i in range(length)]
    return tokens[:num_tokens]


@pytest.fixture
def smoke_run(tmp_path, monkeypatch):
    """Smoke hyperparameters on synthetic shards, run from tmp_path (logs/ and checkpoints/ land there)."""
    write_shard(tmp_path / "pattern_train_000001.bin", pattern_corpus(20_000, seed=0))
    write_shard(tmp_path / "pattern_val_000000.bin", pattern_corpus(4_096, seed=1))
    monkeypatch.chdir(tmp_path)
    for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    return replace(SMOKE, train_files=str(tmp_path / "pattern_train_*.bin"),
                   val_files=str(tmp_path / "pattern_val_*.bin"), run_name="smoke")


def tiny_config(attention, **changes):
    return tg.model_config(replace(SMOKE, attention=attention, window_schedule=(48,), **changes))


def randomized(model, seed=0):
    """Every parameter random (zero-initialized projections too), so no path is trivially zero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.5 if param.ndim < 2 else param.shape[-1] ** -0.5)
    return model


def packed_batch(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, GPT2_VOCAB - 1, (sum(lengths),), generator=generator)
    cu_seqlens = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    tokens[cu_seqlens[:-1].long()] = tg.BOS
    return tokens, cu_seqlens


def test_smoke_run_learns_and_its_log_parses(smoke_run):
    assert tg.train(smoke_run) == 0
    run = parse_log("logs/smoke.txt")
    assert run["status"] == "complete"
    assert run["attention"] == "parallax" and run["num_iterations"] == 30
    assert [step for step, _ in run["val"]] == [0, 10, 20, 30]
    assert [step for step, _ in run["train"]] == list(range(1, 31))
    first_val, final_val = run["val"][0][1], run["final_val_loss"]
    assert first_val == pytest.approx(np.log(GPT2_VOCAB + 47), abs=0.05)  # zero LM head: uniform over 50304
    assert final_val < 1.5 < first_val  # a mod-16 counter: the model has learned to count
    assert np.mean([loss for _, loss in run["train"][-5:]]) < np.mean([loss for _, loss in run["train"][:5]]) - 5
    assert run["peak_allocated_mib"] is not None
    log = open("logs/smoke.txt").read()
    for name in ("train_gpt.py", "gpt2_data.py", "parallax_kernels.py", "parallax_attn_triton.py",
                 "parallax_reference.py", "muon.py"):
        assert f"==== {name} ====" in log

    model, checkpoint = tg.load_checkpoint("checkpoints/smoke/state_step000030.pt")
    assert checkpoint["hyperparameters"]["attention"] == "parallax" and checkpoint["step"] == 30
    tokens, cu_seqlens = packed_batch([20, 44])
    assert torch.isfinite(model(tokens, cu_seqlens=cu_seqlens)).all()


def test_checkpoint_reloads_with_weights_only_and_reproduces_logits(tmp_path):
    model = randomized(tg.GPT(tiny_config("parallax")))
    path = str(tmp_path / "ckpt" / "state_step000007.pt")
    tg.save_checkpoint(path, model, SMOKE, step=7)
    assert os.listdir(tmp_path / "ckpt") == ["state_step000007.pt"]  # no temporary file left behind
    payload = torch.load(path, weights_only=True)
    assert payload["step"] == 7 and payload["model_config"]["attention"] == "parallax"
    reloaded, _ = tg.load_checkpoint(path)
    tokens, cu_seqlens = packed_batch([30, 70, 28])
    assert torch.equal(reloaded(tokens, cu_seqlens=cu_seqlens), model(tokens, cu_seqlens=cu_seqlens))


def test_parallax_with_zero_r_equals_softmax():
    parallax = randomized(tg.GPT(tiny_config("parallax")))
    softmax = tg.GPT(tiny_config("softmax"))
    state = {name: t for name, t in parallax.state_dict().items() if ".attn.r" not in name}  # r and its gain
    softmax.load_state_dict(state)  # strict: every other weight is shared
    tokens, cu_seqlens = packed_batch([100, 3, 90, 63])  # documents longer and shorter than the window (48)
    before = parallax(tokens, cu_seqlens=cu_seqlens)
    with torch.no_grad():
        for block in parallax.blocks:
            block.attn.r.weight.zero_()
    zero_r = parallax(tokens, cu_seqlens=cu_seqlens)
    reference = softmax(tokens, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(zero_r, reference, atol=2e-5, rtol=1e-5)
    assert (before - reference).abs().max() > 1e-2  # r matters when it is not zero


@pytest.mark.parametrize("r_gain", ["head", "channel"])
def test_zero_r_gain_starts_parallax_as_softmax(r_gain):
    """With the gain at 0, step 0 is exactly the softmax model, whatever W_r is; a gain makes r matter."""
    parallax = randomized(tg.GPT(tiny_config("parallax", r_gain=r_gain, r_gain_init=0.0)))
    softmax = tg.GPT(tiny_config("softmax"))
    softmax.load_state_dict({name: t for name, t in parallax.state_dict().items() if ".attn.r" not in name})
    for block in parallax.blocks:
        assert block.attn.r_gain.abs().max() > 0  # randomized, so reset below
        with torch.no_grad():
            block.attn.r_gain.zero_()
    tokens, cu_seqlens = packed_batch([100, 3, 90, 63])
    reference = softmax(tokens, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(parallax(tokens, cu_seqlens=cu_seqlens), reference, atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        parallax.blocks[0].attn.r_gain.fill_(0.3)
    assert (parallax(tokens, cu_seqlens=cu_seqlens) - reference).abs().max() > 1e-3


def test_r_gain_shapes_and_the_probe_settings():
    config = tiny_config("parallax", r_gain="channel", r_gain_init=0.25, r_norm=True, r_rotary=False)
    attn = tg.GPT(config).blocks[0].attn
    assert attn.r_gain.shape == (config.num_heads, config.head_dim) and torch.all(attn.r_gain == 0.25)
    x = torch.randn(1, 5, config.model_dim)
    shape = (1, 5, config.num_heads, config.head_dim)
    rope = tg.RotaryTables(config.head_dim).prefix(5, torch.device("cpu"))
    attended = {}

    def attend(layer, q, r, k, v):  # what the layer hands the attention
        attended["r"] = r
        return q

    attn(x, None, rope, attend)
    torch.testing.assert_close(attended["r"], 0.25 * tg.norm(attn.r(x).view(shape)))
    assert tg.GPT(tiny_config("parallax", r_gain="none")).blocks[0].attn.r_gain is None  # the authors' r
    default = tg.GPT(tiny_config("parallax")).blocks[0].attn.r_gain  # the study's winner: per head, from 0
    assert default.shape == (config.num_heads, 1) and torch.all(default == 0)
    with pytest.raises(ValueError, match="r_gain must be"):
        tg.check_hyperparameters(replace(SMOKE, r_gain="layer"), 1)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_r_learning_rates_get_groups_of_their_own(optimizer):
    hp = replace(SMOKE, r_gain="head", r_gain_lr=0.123, r_lr_mult=0.5, optimizer=optimizer)
    model = tg.GPT(tg.model_config(hp))
    optimizers, averaged, _ = tg.make_optimizers(model, hp, torch.device("cpu"))
    groups = [group for opt in optimizers for group in opt.param_groups]
    grouped = [p for group in groups for p in group["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))  # each param once
    matrix_lr = hp.muon_lr if optimizer == "muon" else hp.adamw_lr

    def lr_of(param):
        return next(group["initial_lr"] for group in groups if any(p is param for p in group["params"]))

    for block in model.blocks:
        assert lr_of(block.attn.r_gain) == 0.123
        assert lr_of(block.attn.r.weight) == 0.5 * matrix_lr
        assert lr_of(block.attn.q.weight) == matrix_lr
        assert any(p is block.attn.r_gain for p in averaged)  # Adam's gradients are averaged by the loop


def test_non_finite_loss_stops_with_exit_code_1(smoke_run, monkeypatch, capsys):
    forward, calls = tg.GPT.forward, itertools.count()

    def poisoned(self, *args, **kwargs):  # NaN from the 9th training micro-batch: step 5 (2 per step)
        loss = forward(self, *args, **kwargs)
        return loss * float("nan") if torch.is_grad_enabled() and next(calls) >= 8 else loss

    monkeypatch.setattr(tg.GPT, "forward", poisoned)
    assert tg.train(replace(smoke_run, save_every=2, val_every=0)) == 1
    output = capsys.readouterr().out
    assert re.search(r"step:5/30 train_loss:nan is not finite; stopping. Last good checkpoint: "
                     r"checkpoints/smoke/state_step000004.pt", output)
    assert sorted(os.listdir("checkpoints/smoke")) == ["state_step000002.pt", "state_step000004.pt"]
    assert parse_log("logs/smoke.txt")["status"] != "complete"


def test_param_matched_costs_what_r_adds():
    def count(attention, param_matched):
        hp = tg.Hyperparameters(attention=attention, param_matched=param_matched)
        with torch.device("meta"):
            return sum(p.numel() for p in tg.GPT(tg.model_config(hp)).parameters())

    softmax, drop_in, matched = count("softmax", False), count("parallax", False), count("parallax", True)
    assert drop_in - softmax == 12 * (768 * 768 + 6)  # one 768 x 768 r and 6 head gains per layer
    assert matched == softmax + 12 * 6
    assert tg.model_config(tg.Hyperparameters(param_matched=True)).mlp_hidden == 2688


def test_environment_overrides():
    hp = tg.hyperparameters_from_env({"SMOKE": "1", "NUM_ITERATIONS": "7", "ATTENTION": "softmax",
                                      "PARAM_MATCHED": "true", "VAL_TOKENS": "4096", "WINDOW_SCHEDULE": "64,128"})
    assert hp.smoke and hp.num_layers == 2 and hp.num_iterations == 7 and hp.attention == "softmax"
    assert hp.param_matched and hp.val_tokens == 4096 and hp.window_schedule == (64, 128)
    assert tg.hyperparameters_from_env({}) == tg.Hyperparameters()
    with pytest.raises(ValueError, match="NUM_ITERATIONS"):
        tg.hyperparameters_from_env({"NUM_ITERATIONS": "many"})
    with pytest.raises(ValueError, match="world size 3"):
        tg.check_hyperparameters(tg.Hyperparameters(), world_size=3)


def test_schedules():
    hp = tg.Hyperparameters(num_iterations=1000)
    multipliers = [tg.lr_multiplier(step, hp) for step in range(1001)]
    assert multipliers[0] == multipliers[600] == 1.0 and multipliers[1000] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(multipliers, multipliers[1:]))
    windows = [tg.window_at(step, hp) for step in range(1001)]
    assert sorted(set(windows)) == list(hp.window_schedule) and windows == sorted(windows)
    model = tg.GPT(tiny_config("softmax", num_layers=12, num_value_embeds=3))
    assert model.layer_windows(1792) == [1792, 896, 896, 896, 1792, 896, 896, 1792, 896, 896, 896, 1792]


@pytest.mark.parametrize("attention", ["parallax", "softmax"])
def test_compiled_forward_specializes_on_the_window(attention):
    """The window reaches GPT.forward as a Python int: as configured for training, torch.compile builds
    one graph per window with no symbolic scalar input (the kernels and masks take Python ints)."""
    graphs = []

    def record_scalar_inputs(gm, example_inputs):
        graphs.append([x for x in example_inputs if not isinstance(x, torch.Tensor)])
        return gm.forward

    model = tg.GPT(tiny_config(attention))
    tokens, cu_seqlens = packed_batch([100, 156])
    doc_ids = tg.document_ids(cu_seqlens, tokens.numel()) if attention == "softmax" else None
    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_int=False, recompile_limit=8):
        tg.configure_compile()
        compiled = torch.compile(model, backend=record_scalar_inputs)
        for window in (32, 64, 16):
            compiled(tokens, tokens.long(), cu_seqlens=cu_seqlens, window=window, doc_ids=doc_ids)
    torch._dynamo.reset()
    assert graphs == [[], [], []]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attention", ["parallax", "softmax"])
def test_compiled_model_matches_eager_gpu(attention):
    """The training path on a GPU: the model compiled in one graph (FlexAttention for softmax, the custom
    op for Parallax) gives eager's loss and gradients (dense-mask SDPA for softmax, the same kernel).
    fp16 activations: their rounding (about 1% here) leaves room to catch a wrong mask or gradient."""
    model = randomized(tg.GPT(tiny_config(attention, seq_len=512)).cuda()).embeddings_to(torch.float16)
    tokens, cu_seqlens = packed_batch([1, 200, 47, 264], seed=3)
    tokens, targets, cu_seqlens = tokens.cuda(), tokens.roll(-1).cuda(), cu_seqlens.cuda()

    def loss_and_grads(fn, **doc_ids):
        model.zero_grad()
        loss = fn(tokens, targets, cu_seqlens=cu_seqlens, **doc_ids)
        loss.backward()
        return loss.detach(), [p.grad.float().clone() for p in model.parameters() if p.grad is not None]

    eager_loss, eager_grads = loss_and_grads(model)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model, fullgraph=True),
                                                   doc_ids=tg.document_ids(cu_seqlens, tokens.numel()))
    assert torch.isfinite(compiled_loss) and torch.allclose(compiled_loss, eager_loss, rtol=1e-2)
    assert len(compiled_grads) == len(eager_grads)
    for compiled, eager in zip(compiled_grads, eager_grads):
        assert torch.isfinite(compiled).all()
        assert (compiled - eager).norm() <= 5e-2 * eager.norm() + 1e-6


def test_rotary_tables_are_the_closed_form_and_stay_fp32():
    tables = tg.RotaryTables(8)
    cos, sin = tables.prefix(5, torch.device("cpu"))
    freqs = torch.tensor([1.0, 1 / 1024, 0.0, 0.0])  # a quarter of the pairs from 1 to 1/1024, a quarter still
    theta = torch.arange(5.0)[:, None, None] * freqs
    torch.testing.assert_close(cos, theta.cos())
    torch.testing.assert_close(sin, theta.sin())
    grown, _ = tables.prefix(9, torch.device("cpu"))  # grows: the first rows unchanged
    assert grown.shape == (9, 1, 4) and torch.equal(grown[:5], cos)
    positions = torch.tensor([[3], [0], [8]])
    at_cos, at_sin = tables.at(positions, 9)
    assert at_cos.shape == (3, 1, 1, 4) and torch.equal(at_cos[:, 0], grown[positions[:, 0]])
    model = tg.GPT(tiny_config("parallax")).to(torch.bfloat16)
    assert model.rotary.prefix(4, torch.device("cpu"))[0].dtype == torch.float32  # not cast with the model
