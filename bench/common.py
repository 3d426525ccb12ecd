"""Timing shared by the benchmarks."""
import os
import statistics
import subprocess
import time

import torch


def median_ms(fn, repeats=50, warmup=5):
    """Median milliseconds of fn() over `repeats` calls after `warmup` untimed ones: CUDA events when
    a GPU is present, the wall clock otherwise."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class GpuClocks:
    """The GPU's mean SM clock (MHz) and power draw (W) while a block runs, sampled by nvidia-smi every 200 ms:
    `summary` afterwards, or None without a CUDA device, nvidia-smi or samples. A power-capped GPU runs a
    power-hungry arm at lower clocks, and every kernel of its step slows with it (an H200 at its 700 W cap:
    2.7% lower under Parallax's kernels, records/2026-11-30_surcharge-by-kernel-h200/)."""

    def __init__(self, device: torch.device):
        self.summary, self.process, self.gpu = None, None, None
        if device.type == "cuda":
            # nvidia-smi numbers GPUs as the machine does; CUDA_VISIBLE_DEVICES lists their numbers or UUIDs
            visible = [gpu.strip() for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu.strip()]
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.gpu = visible[index] if index < len(visible) else str(index)

    def __enter__(self):
        if self.gpu is not None:
            try:
                self.process = subprocess.Popen(
                    ["nvidia-smi", "-i", self.gpu, "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                     "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError:  # no nvidia-smi
                self.process = None
        return self

    def __exit__(self, *exc_info):
        if self.process is None:
            return False
        self.process.terminate()
        try:
            out, _ = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        samples = []
        for line in out.splitlines():
            try:
                mhz, watts = (float(field) for field in line.split(","))
            except ValueError:  # "[N/A]", or a line cut by the termination
                continue
            samples.append((mhz, watts))
        if samples:
            self.summary = tuple(sum(column) / len(samples) for column in zip(*samples))
        return False
