"""train_gpt.train's loop, watched from its optimizers: the learning rates and Muon momentum each step
follow the schedules, and the first step's gradients are the mean over the micro-batches of the
gradients computed here."""
import itertools
import time
from dataclasses import replace

import pytest
import torch

import train_gpt as tg
from test_train import smoke_run  # noqa: F401  (a fixture)


@pytest.fixture
def watched(monkeypatch):
    """Wraps make_optimizers: every optimizer step records its groups' lr (and momentum) and, at the
    first step, the model's gradients."""
    record = {"steps": [], "grads": None, "model": None, "start": None}
    make = tg.make_optimizers

    def make_optimizers(model, hp, device):
        optimizers, averaged, muon = make(model, hp, device)
        record["model"] = model
        record["start"] = {name: p.detach().clone() for name, p in model.named_parameters()}
        for optimizer in optimizers:
            step = optimizer.step

            def watched_step(*args, optimizer=optimizer, step=step, **kwargs):
                if record["grads"] is None:
                    record["grads"] = {name: p.grad.clone() for name, p in model.named_parameters()
                                       if p.grad is not None}
                record["steps"].append((optimizer, [(g["lr"], g["initial_lr"], g.get("momentum"))
                                                    for g in optimizer.param_groups]))
                return step(*args, **kwargs)
            optimizer.step = watched_step
        return optimizers, averaged, muon

    monkeypatch.setattr(tg, "make_optimizers", make_optimizers)
    return record


def test_schedules_and_gradient_accumulation(smoke_run, watched):  # noqa: F811
    hp = replace(smoke_run, seq_len=128, micro_batches=2, num_iterations=4, val_tokens=128, val_every=0,
                 lr_warmup_steps=1, cooldown_frac=0.6, final_lr_frac=0.2, muon_momentum_warmup_steps=3,
                 muon_momentum_start=0.5, muon_momentum=0.9)
    assert tg.train(hp) == 0

    # two optimizers (Adam, Muon) step once per training step
    assert len(watched["steps"]) == 2 * hp.num_iterations
    muon_groups = 0
    for i, (optimizer, groups) in enumerate(watched["steps"]):
        step = i // 2
        multiplier = tg.lr_multiplier(step, hp)
        assert 0 < multiplier <= 1
        for lr, initial_lr, momentum in groups:
            assert lr == pytest.approx(initial_lr * multiplier), (step, lr, initial_lr)
            if type(optimizer).__name__ == "Muon":
                warmup = min(step / 3, 1)
                assert momentum == pytest.approx((1 - warmup) * 0.5 + warmup * 0.9), (step, momentum)
                muon_groups += 1
    assert muon_groups >= hp.num_iterations
    multipliers = sorted({tg.lr_multiplier(step, hp) for step in range(hp.num_iterations)})
    assert len(multipliers) >= 3  # warmup, stable and cooldown all happen in these steps

    # the first step's gradients: the mean over its two micro-batches, from the starting weights
    model = watched["model"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(watched["start"][name])
    model.zero_grad(set_to_none=True)
    batches = tg.distributed_data_generator(hp.train_files, hp.seq_len, 0, 1)
    losses = [model(b.inputs, b.targets, cu_seqlens=b.cu_seqlens) for b in itertools.islice(batches, 2)]
    (sum(losses) / 2).backward()
    got = watched["grads"]
    assert got.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if name in got:
            torch.testing.assert_close(got[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_step_end_reads_the_loss_of_its_step_on_the_cpu():
    end = tg.StepEnd(torch.tensor(2.5))
    assert end.done is None and end.wait() == 2.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_end_waits_for_its_step_only():
    """The loop logs a step once the next one is queued: its StepEnd must neither block when made nor,
    when waited on, wait for the work queued after it (whose time the log line would otherwise carry)."""
    cycles = 400_000_000  # 0.2-0.4 s of device time at 1-2 GHz
    loss = torch.full((), 3.25, device="cuda")  # allocated first: a cudaMalloc may wait for the device
    tg.StepEnd(loss).wait()  # the pinned host allocator's first block, outside the timed part; later ones reuse it
    torch.cuda._sleep(cycles)  # this step
    start = time.perf_counter()
    end = tg.StepEnd(loss)
    assert time.perf_counter() - start < 0.05 and not end.done.query()
    torch.cuda._sleep(cycles)  # the next step
    later = torch.cuda.Event()
    later.record()
    assert end.wait() == 3.25
    assert end.done.query() and not later.query()
    torch.cuda.synchronize()
