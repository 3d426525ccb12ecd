"""bench/steptime.py end to end on the CPU (the smoke model on a synthetic shard), its profile summary, and
the GPU clock sampling of its timed steps."""
import os
import time
from types import SimpleNamespace

import pytest
import torch

import train_gpt as tg
from bench import profiling, steptime
from bench.common import GpuClocks
from test_loader import write_shard
from test_train import pattern_corpus


@pytest.fixture
def environ(tmp_path):
    write_shard(tmp_path / "pattern_train_000001.bin", pattern_corpus(20_000, seed=0))
    return {"SMOKE": "1", "TRAIN_FILES": str(tmp_path / "pattern_train_*.bin")}


def test_every_arm_gets_a_row_of_the_table(environ, capsys):
    argv = ["--arms", "softmax,parallax-pm,parallax", "--steps", "2", "--repeats", "2", "--warmup-steps", "1",
            "--profile", "--profile-steps", "1"]
    assert steptime.main(argv, environ=environ) == 0
    out = capsys.readouterr().out
    lines = out[out.rindex("\narm "):].strip().splitlines()
    assert lines[0].split() == ["arm", "parameters", "ms/step", "x", "softmax", "peak", "RSS", "GiB", "warm-up", "s",
                                "graphs"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert list(rows) == ["softmax", "parallax-pm", "parallax"]
    for arm, (params, ms, ratio, peak, warm_up_s, graphs) in rows.items():
        assert float(ms) > 0 and float(peak) > 0 and float(warm_up_s) > 0 and graphs == "0"  # eager on the CPU
    assert rows["softmax"][2] == "1.00"
    params = {arm: int(row[0].replace(",", "")) for arm, row in rows.items()}
    r_gains = tg.SMOKE_CONFIG["num_layers"] * tg.SMOKE_CONFIG["num_heads"]  # one per head (r_gain="head")
    assert params["parallax-pm"] - params["softmax"] == r_gains < params["parallax"] - params["softmax"]
    for arm in rows:
        assert f"profile {arm} (1 steps)" in out
    assert out.count("\ntotal ") == 3


def test_bad_arguments_are_refused_with_the_arms_named(environ, capsys):
    with pytest.raises(SystemExit) as exit_info:
        steptime.main(["--arms", "softmax,flash"], environ=environ)
    assert exit_info.value.code == 2
    assert "unknown arm(s) 'flash'; the arms are softmax, parallax-pm, parallax" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        steptime.main(["--steps", "100000"], environ=environ)  # more tokens than the shard holds
    assert "tokens, but" in capsys.readouterr().err


def test_bench_defaults_give_way_to_the_environment(environ):
    hp = steptime.bench_hyperparameters(environ)
    assert hp.micro_batches == 1 and hp.window_schedule == tg.SMOKE_CONFIG["window_schedule"][-1:]
    hp = steptime.bench_hyperparameters({**environ, "MICRO_BATCHES": "2", "WINDOW_SCHEDULE": "128,256"})
    assert hp.micro_batches == 2 and hp.window_schedule == (128, 256)


def test_every_profiled_time_lands_in_one_category(environ):
    hp = steptime.bench_hyperparameters(environ)
    trainer = tg.Trainer(hp, rank=0, world_size=1, device=torch.device("cpu"))
    batches = trainer.train_batches()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train_step(0, batches)
    events = prof.events()
    sums, by_name = profiling.profile_summary(events)
    assert list(sums) == list(by_name) == profiling.CATEGORY_NAMES
    host_total = sum(e.self_cpu_time_total for e in events if not e.is_async)
    assert sum(host for _, host in sums.values()) == pytest.approx(host_total)
    assert sum(device for device, _ in sums.values()) == 0  # no device
    for label, names in by_name.items():
        assert ([sum(column) for column in zip(*names.values())] or [0.0, 0.0]) == pytest.approx(sums[label])
    assert sums["optimizer (Muon/Adam)"][1] > 0 and sums["matmuls"][1] > 0


class FakeEvent:
    """The fields of torch.autograd.profiler_util.FunctionEvent that profile_summary reads."""
    def __init__(self, name, parent=None, self_us=0.0, kernels=(), device_type=torch.autograd.DeviceType.CPU,
                 start=0.0, end=0.0):
        self.name, self.cpu_parent, self.self_cpu_time_total = name, parent, self_us
        self.kernels = [SimpleNamespace(name=k, device=0, duration=us) for k, us in kernels]
        self.device_type, self.is_async = device_type, False
        self.time_range = SimpleNamespace(start=start, end=end)


def test_only_the_traced_steps_count():
    """A scheduled profiler's results also hold ops (and kernels) of its warm-up step, in a ProfilerStep#N
    range of its own or before any: given the traced steps' number, only the events that start inside the
    last that many ProfilerStep ranges count."""
    warm_up = FakeEvent("ProfilerStep#0", self_us=1.0, start=40.0, end=100.0)
    step = FakeEvent("ProfilerStep#1", self_us=1.0, start=100.0, end=200.0)
    events = [FakeEvent("aten::mm", None, 2.0, [("nvjet_tst", 50.0)], start=20.0, end=25.0),  # before any step
              warm_up, FakeEvent("aten::mm", warm_up, 5.0, [("nvjet_tst", 30.0)], start=60.0, end=65.0),
              step, FakeEvent("aten::mm", step, 3.0, [("nvjet_tst", 70.0)], start=120.0, end=125.0),
              FakeEvent("aten::mm", None, 4.0, [("nvjet_tst", 90.0)], start=150.0, end=151.0)]  # another thread
    sums, _ = profiling.profile_summary(events, traced_steps=1)
    assert sums["matmuls"] == [160.0, 7.0]
    assert sum(device for device, _ in sums.values()) == 160.0 and sum(host for _, host in sums.values()) == 8.0
    everything, _ = profiling.profile_summary(events)  # no count: every event, as without a schedule
    assert everything["matmuls"] == [240.0, 14.0]


def test_kernels_count_under_the_op_that_launched_them():
    """Device time comes from each CPU op's kernels, categorized by the op's ranges; the kernels' own
    device events are not counted again."""
    muon = FakeEvent("Optimizer.step#Muon.step", self_us=5.0)
    backward = FakeEvent("parallax::backward", self_us=2.0, kernels=[("_bwd_dq_kernel", 30.0)])
    events = [muon, FakeEvent("aten::mm", muon, 1.0, [("nvjet_tst_128x64", 7.0)]), backward,
              FakeEvent("aten::mm", backward, 1.0, [("nvjet_tst_128x64", 11.0)]),
              FakeEvent("mystery", None, 0.5, [("mystery_kernel", 3.0)]),
              FakeEvent("_bwd_dq_kernel", device_type=torch.autograd.DeviceType.CUDA)]
    sums, by_name = profiling.profile_summary(events)
    assert sums["optimizer (Muon/Adam)"] == [7.0, 6.0]
    assert sums["attention backward"] == [41.0, 3.0]
    assert sums[profiling.OTHER] == [3.0, 0.5]
    assert by_name[profiling.OTHER] == {"mystery": [0.0, 0.5], "mystery_kernel": [3.0, 0.0]}
    assert by_name["attention backward"] == {"parallax::backward": [0.0, 2.0], "_bwd_dq_kernel": [30.0, 0.0],
                                             "aten::mm": [0.0, 1.0], "nvjet_tst_128x64": [11.0, 0.0]}
    assert sum(device for device, _ in sums.values()) == 7.0 + 30.0 + 11.0 + 3.0


def test_the_profile_lists_each_categorys_largest_kernels(capsys):
    """Under the table: per category its kernels by device time, largest first (host-only names left out),
    at most KERNELS_LISTED; then the names left in "other"."""
    kernels = [(f"elementwise_kernel_{i}", float(i)) for i in range(1, profiling.KERNELS_LISTED + 3)]
    events = [FakeEvent("aten::mm", None, 9.0, [("nvjet_tst", 2.0)]), FakeEvent("aten::mul", None, 4.0, kernels),
              FakeEvent("mystery", None, 500.0, [("mystery_kernel", 3000.0)])]
    profiling.print_profile("arm", *profiling.profile_summary(events), steps=1, top=1)
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("largest kernels in matmuls:")
    assert lines[start + 1].endswith(" nvjet_tst")  # aten::mm, host time only, is not listed
    assert lines[start + 2] == "largest kernels in norms/rotary/elementwise:"
    listed = [line.split()[-1] for line in lines[start + 3:start + 3 + profiling.KERNELS_LISTED]]
    assert listed == [f"elementwise_kernel_{i}" for i in range(profiling.KERNELS_LISTED + 2, 2, -1)]
    assert lines[start + 3 + profiling.KERNELS_LISTED].startswith(f"top unmatched names ({profiling.OTHER})")
    assert lines[-2].split()[1] == "3.000" and lines[-2].endswith("mystery_kernel") and lines[-1] == ""

@pytest.mark.parametrize("name, enclosing, expected", [
    ("_bwd_dkdv_kernel", [], "attention backward"),
    ("triton_tem_fused_flex_attention_backward_0", [], "attention backward"),
    ("_fwd_kernel", [], "attention forward"),
    ("aten::mm", ["parallax::backward", "CompiledFunctionBackward"], "attention backward"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_TNT", ["aten::mm", "Optimizer.step#Muon.step"], "optimizer (Muon/Adam)"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_TNT", ["aten::mm"], "matmuls"),
    ("cudaStreamSynchronize", ["aten::_local_scalar_dense", "Optimizer.step#Muon.step"], "host syncs"),
    ("Memcpy DtoH (Device -> Pinned)", ["aten::copy_"], "host syncs"),
    ("triton_per_fused__log_softmax_tanh_0", [], "loss over the logits"),
    ("triton_red_fused__log_softmax_div_mul_sigmoid_0", [], "loss over the logits"),
    ("triton_red_fused__to_copy_mean_pow_rsqrt_1", [], "norms/rotary/elementwise"),
    ("_inputs_backward_kernel", [], "norms/rotary/elementwise"),  # attention_inputs.py's, not the attention's
    ("ncclDevKernel_AllReduce_Sum_f32", [], "other"),
])
def test_category_names(name, enclosing, expected):
    assert profiling.category(name, enclosing) == expected


def test_gpu_clocks_average_nvidia_smi_samples_of_the_visible_gpu(tmp_path, monkeypatch):
    """GpuClocks runs nvidia-smi for the device's GPU (CUDA_VISIBLE_DEVICES' entry for its index) while the
    block runs and averages its samples, skipping unreadable ones; without nvidia-smi, or on the CPU, it
    gives None and the block runs as usual."""
    args = tmp_path / "args"
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f'#!/bin/sh\necho "$@" > {args}\nprintf "1815, 676.5\\n1765, 680.1\\n[N/A], 500\\n"\n'
                    "exec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-8a1f")
    with GpuClocks(torch.device("cuda", 1)) as clocks:
        time.sleep(0.5)  # nvidia-smi's first samples
    assert clocks.summary == pytest.approx((1790.0, 678.3))
    assert args.read_text().split()[:2] == ["-i", "GPU-8a1f"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with GpuClocks(torch.device("cuda", 0)) as clocks:
        pass
    assert clocks.summary is None
    with GpuClocks(torch.device("cpu")) as clocks:
        pass
    assert clocks.summary is None
