"""Sums a torch.profiler trace of training steps per category (attention forward and backward, matmuls, the
loss over the logits, Muon/Adam, elementwise work, host syncs), for bench.steptime's arms and bench.anchor's
record alike, so their tables compare line by line."""
import re

import torch

# Profile categories, first match wins: (category, pattern on an event's name, pattern on the name of one of
# its enclosing CPU ranges (for a kernel: those of the op that launched it), or None); case-insensitive.
CATEGORIES = [
    ("host syncs", r"cuda(Stream|Device|Event)Synchronize|Memcpy DtoH|aten::(item|_local_scalar_dense)$", None),
    ("optimizer (Muon/Adam)", r"^Optimizer\.", r"^Optimizer\.step#"),
    ("attention backward", r"_bwd_(dq|dkdv)_kernel|parallax::backward|flex_attention_backward|"
                           r"(flash|fmha|attention).*(bwd|backward)", r"^parallax::backward$"),
    ("attention forward", r"_fwd_kernel|parallax::forward|flex_attention|scaled_dot_product|flash|fmha",
     r"^parallax::forward$"),
    ("loss over the logits", r"cross_entropy|nll_?loss|log_?softmax|logsumexp|tanh|sigmoid", None),
    ("matmuls", r"gemm|nvjet|cutlass|cublas|xmma|aten::(mm|bmm|addmm|matmul|linear)$|(^|_)b?mm(_|$)|"
                r"\b(add)?b?mmbackward", None),
    ("norms/rotary/elementwise", r"norm|rsqrt|rotary|elementwise|reduce_kernel|^triton_(poi|red|per)_|^cpp_fused|"
                                 r"^_inputs_(forward|backward)_kernel$|^gpt::attention_inputs|"
                                 r"aten::(add|sub|mul|div|pow|mean|sum|cat|copy_|_to_copy|to|neg|exp|relu|"
                                 r"square|sqrt|clamp|where|fill_|zero_|lerp_?|add_|mul_|div_)$", None),
]
OTHER = "other"
KERNELS_LISTED = 5  # per category, under its table
CATEGORY_NAMES = [name for name, _, _ in CATEGORIES] + [OTHER]


def step_profiler(traced_steps: int, cuda: bool) -> torch.profiler.profile:
    """A profiler for training steps, stepped (profiler.step()) after each: one untraced step, then
    traced_steps traced ones; the CPU, and with cuda the GPU's kernels."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    return torch.profiler.profile(activities=activities,
                                  schedule=torch.profiler.schedule(wait=0, warmup=1, active=traced_steps, repeat=1))


def category(name: str, enclosing: list) -> str:
    """The category of an event called name, inside the CPU ranges named in enclosing."""
    for label, own, outer in CATEGORIES:
        if re.search(own, name, re.I) or (outer and any(re.search(outer, e, re.I) for e in enclosing)):
            return label
    return OTHER


def _enclosing(event) -> list:
    names = []
    while (event := event.cpu_parent) is not None:
        names.append(event.name)
    return names


def _traced_steps(events, count) -> list:
    """(start, end) of the last `count` ProfilerStep#N ranges (a scheduled profiler's traced steps, after
    any of its warm-up); none without a schedule or a count."""
    steps = sorted((e.time_range.start, e.time_range.end) for e in events if e.name.startswith("ProfilerStep#"))
    return steps[-count:] if count else []


def profile_summary(events, traced_steps=None) -> tuple:
    """Sums a profile's events per category: ({category: [device us, host us]}, {category: {name: [device
    us, host us]}}, the same sums per event name within each category). Host time: each CPU event's self
    time (its children's excluded), so nothing is counted twice. Device time: the kernels each CPU event
    launched (the profiler lists them in its .kernels), under the names of that event and its enclosing
    ranges; the kernels' own device-side events are skipped, as torch's tables skip them. Given the number of
    traced steps of a scheduled profiler, only the events that start inside them count: the warm-up step
    leaves some of its kernels in the results too (a record-size step's loss kernel three times for two
    traced steps)."""
    sums = {name: [0.0, 0.0] for name in CATEGORY_NAMES}
    by_name = {name: {} for name in CATEGORY_NAMES}

    def add(name, enclosing, column, us):
        label = category(name, enclosing)
        sums[label][column] += us
        by_name[label].setdefault(name, [0.0, 0.0])[column] += us

    steps = _traced_steps(events, traced_steps)
    for event in events:
        if event.is_async or event.device_type != torch.autograd.DeviceType.CPU:
            continue
        if steps and not any(start <= event.time_range.start < end for start, end in steps):
            continue
        enclosing = _enclosing(event)
        add(event.name, enclosing, 1, event.self_cpu_time_total)
        for kernel in event.kernels:
            add(kernel.name, [event.name] + enclosing, 0, kernel.duration)
    return sums, by_name


def print_profile(arm: str, sums: dict, by_name: dict, steps: int, top: int):
    """The category table, then each category's largest kernels (device time) and the names left in
    "other" (device, then host time), to see what a category holds and to refine CATEGORIES."""
    total = [sum(s[i] for s in sums.values()) for i in (0, 1)]
    print(f"\nprofile {arm} ({steps} steps): ms per step; device = kernel time, host = CPU self time (a sync's "
          "is the CPU waiting for the device)")
    print(f"{'category':<26} {'device ms':>10} {'device %':>8} {'host ms':>10} {'host %':>7}")
    for name, (device_us, host_us) in list(sums.items()) + [("total", total)]:
        print(f"{name:<26} {device_us / steps / 1e3:>10.3f} {100 * device_us / max(total[0], 1e-9):>8.1f} "
              f"{host_us / steps / 1e3:>10.3f} {100 * host_us / max(total[1], 1e-9):>7.1f}")
    for label, names in by_name.items():
        if label == OTHER:
            listed = sorted(names.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))[:top]
            heading = f"top unmatched names ({OTHER}), to refine CATEGORIES:"
        else:
            listed = sorted(((n, t) for n, t in names.items() if t[0] > 0), key=lambda kv: -kv[1][0])[:KERNELS_LISTED]
            heading = f"largest kernels in {label}:"
        if listed:
            print(heading)
        for name, (device_us, host_us) in listed:
            print(f"  device {device_us / steps / 1e3:9.3f} ms  host {host_us / steps / 1e3:9.3f} ms  {name[:110]}")
    print(flush=True)
