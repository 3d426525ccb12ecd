"""bench/anchor.py's adaptation of the record's code, on a stand-in record (the real one is not in this
repository): every change lands once, a record without one of the lines is refused by name, and the
timing and profile lines it appends print what the bench parses and bench.steptime's table."""
import contextlib
import io
import os
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from bench import anchor

STAND_IN = '''import os
import torch
def _(g: Tensor, x_f8: Tensor, w_f8: Tensor, *_):
    return x_f8.to(torch.bfloat16), w_f8.to(torch.float32)
torch._inductor.config.coordinate_descent_tuning = True
def distributed_data_generator(filename_pattern, batch_size, rank, world_size):
    files = sorted(Path.cwd().glob(filename_pattern))
class Hyperparameters:
    train_files = "data/fineweb10B/fineweb_train_*.bin" # input .bin to train on
    val_files = "data/fineweb10B/fineweb_val_*.bin" # input .bin to eval validation loss on
    val_tokens = 10485760 # how many tokens of validation data?
    batch_size = 8*64*1024 # batch size in tokens
    val_loss_every = 125 # every how many steps to evaluate val loss? 0 for only at the end
train_steps = args.num_iterations
for step in range(train_steps + 1):
    timed_steps = float("nan") if step <= 11 else (step - 10) + 1 # <= 11 to avoid bug in val
    window_size = next_multiple_of_n(1728 * step / train_steps, n=128)
    model.zero_grad(set_to_none=True)
'''
LOG = STAND_IN + "=" * 100 + "\nRunning Python 3.12\n" + "=" * 100 + "\nstep:0/1393 val_loss:10.8258\n"


def test_the_code_is_taken_from_the_head_of_the_log():
    assert anchor.record_code(LOG) == STAND_IN
    with pytest.raises(ValueError, match="not a modded-nanoGPT record log"):
        anchor.record_code("step:0/1393 val_loss:10.8258\n")


@pytest.mark.parametrize("coordinate_descent", [True, False])
def test_every_change_lands_once(coordinate_descent):
    code = anchor.adapted_code(STAND_IN, window=896, steps=5, repeats=2, coordinate_descent=coordinate_descent)
    for expected in ['train_files = os.environ["ANCHOR_TRAIN_FILES"]', 'val_files = os.environ["ANCHOR_VAL_FILES"]',
                     "val_tokens = 65536", "batch_size = 64*1024", "val_loss_every = 0", "train_steps = 20\n",
                     "window_size = 896\n", "if step in (10, 15, 20):",
                     "w_f8.to(torch.float32).t().contiguous().t()\n",
                     'files = sorted(map(Path, __import__("glob").glob(filename_pattern)))',
                     f"coordinate_descent_tuning = {coordinate_descent}"]:
        assert code.count(expected) == 1, expected
    compile(code, "record_one_gpu.py", "exec")


def test_another_record_is_refused_with_the_line_that_did_not_match():
    with pytest.raises(ValueError, match="0 copies of 'batch_size = 8\\*64\\*1024'"):
        anchor.adapted_code(STAND_IN.replace("8*64*1024", "8*48*1024"), 1792, 30, 3, True)


def test_the_appended_timing_prints_the_line_the_bench_parses():
    code = anchor.adapted_code(STAND_IN, window=1792, steps=4, repeats=3, coordinate_descent=True)
    tail = code[code.index("\ntorch.cuda.synchronize()"):]
    ticks = {10: 0.0, 14: 400.0, 18: 1000.0, 22: 1440.0}  # ms at each mark: 100, 150 and 110 ms per step
    events = {step: SimpleNamespace(elapsed_time=lambda other, t=t: ticks[other.step] - t, step=step)
              for step, t in ticks.items()}
    cuda = SimpleNamespace(synchronize=lambda: None, max_memory_allocated=lambda: 3 * 2**30)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(tail, {"torch": SimpleNamespace(cuda=cuda), "events": events})
    match = anchor.RESULT.match(printed.getvalue().strip())
    assert match is not None and match.groups() == ("3", "4", "110.00", "3072")


def test_the_profile_follows_the_timed_steps():
    """--profile N: one untraced step after the last timed one, then N traced ones, stepped after each
    training step; without it the code has no profiler at all."""
    code = anchor.adapted_code(STAND_IN, window=1792, steps=5, repeats=2, coordinate_descent=True, profile_steps=3)
    assert "train_steps = 24\n" in code  # 10 warm-up + 2 x 5 timed + 1 + 3
    start = code.index("    if step == 20:\n")
    assert "profiler = step_profiler(3, cuda=True)\n        profiler.start()\n" in code[start:start + 300]
    assert code.index("model.zero_grad(set_to_none=True)\n    if profiler is not None:\n        profiler.step()") > 0
    compile(code, "record_one_gpu.py", "exec")
    plain = anchor.adapted_code(STAND_IN, window=1792, steps=5, repeats=2, coordinate_descent=True)
    assert "profiler" not in plain and "train_steps = 20\n" in plain


def test_the_appended_profile_prints_the_steptime_table(monkeypatch):
    code = anchor.adapted_code(STAND_IN, window=1792, steps=4, repeats=3, coordinate_descent=True, profile_steps=2)
    first = code.index("    if step == 22:\n")
    start = textwrap.dedent(code[first:code.index("profiler.start()\n", first) + len("profiler.start()\n")])
    tail = code[code.index("\nprofiler.stop()"):]
    monkeypatch.setenv("ANCHOR_BENCH_ROOT", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the start prepends the repository to it
    script = {"sys": sys, "os": os, "step": 22}  # the record's globals the added lines use
    exec(start, script)
    for _ in range(3):  # as the adapted loop steps it
        torch.randn(32, 32) @ torch.randn(32, 32)
        script["profiler"].step()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(tail, script)
    lines = printed.getvalue().splitlines()
    assert "profile anchor (2 steps)" in lines[1]
    matmuls = next(line for line in lines if line.startswith("matmuls"))
    assert float(matmuls.split()[-2]) > 0  # the matmuls' host time landed in their category
