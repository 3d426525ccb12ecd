"""Timing shared by the benchmarks."""
import statistics
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
