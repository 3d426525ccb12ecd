"""Parallax's step surcharge kernel by kernel: sums the kernel time of two chrome traces written by
`bench.steptime --profile --trace` (softmax and another arm, same settings) per group and per kernel name,
and prints both side by side with the difference, in ms per step.

    python records/2026-11-30_surcharge-by-kernel-h200/surcharge_by_kernel.py SOFTMAX.json[.gz] OTHER.json[.gz]

An exported trace also holds kernels of the profiler's warm-up step (its backward, the end of its forward):
only the kernels launched inside the traced steps (the CPU's ProfilerStep#N spans, matched to each kernel by
its launch's correlation id) count, per step. The steps' spans on the GPU timeline would miss the optimizer's
last kernels, which run after them.
"""
import argparse
import collections
import gzip
import json
import re

GROUPS = [  # first match wins
    ("attention backward", r"^_bwd_|^_row_dots|flex_attention_backward"),
    ("attention forward", r"^_fwd_kernel|flex_attention"),
    ("loss over the logits", r"log_softmax|nll_loss"),
    ("matmuls", r"nvjet|gemm|cutlass|splitKreduce"),
    ("q, k (r) norm + rotary", r"rms_norm.*(cat|split)|^_inputs_(forward|backward)_kernel$"),
    ("optimizer updates, copies", r"multi_tensor|Memcpy|Memset|direct_copy|bfloat16_copy"),
    ("other element-wise", r""),
]


def kernel_ms(path):
    """({kernel name: ms per step}, traced steps) of one trace."""
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    steps = [(e["ts"], e["ts"] + e["dur"]) for e in events
             if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep#")]
    launched_at = {e["args"]["correlation"]: e["ts"] for e in events
                   if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    total = collections.Counter()
    for e in events:
        launch = launched_at.get(e.get("args", {}).get("correlation"))
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and launch is not None and \
                any(start <= launch < end for start, end in steps):
            total[e["name"]] += e["dur"] / 1000 / len(steps)
    return total, len(steps)


def group(name):
    return next(label for label, pattern in GROUPS if re.search(pattern, name))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("softmax")
    parser.add_argument("other")
    parser.add_argument("--kernels", type=int, default=25, help="kernel names listed, largest difference first")
    args = parser.parse_args()
    (softmax, softmax_steps), (other, other_steps) = (kernel_ms(path) for path in (args.softmax, args.other))
    arms = [softmax, other]
    print(f"kernel time, ms per step (traced steps: softmax {softmax_steps}, other {other_steps})")
    print(f"{'group':<28} {'softmax':>9} {'other':>9} {'other - softmax':>16}")
    sums = [collections.Counter() for _ in arms]
    for arm, summed in zip(arms, sums):
        for name, ms in arm.items():
            summed[group(name)] += ms
    for label, _ in GROUPS:
        print(f"{label:<28} {sums[0][label]:9.2f} {sums[1][label]:9.2f} {sums[1][label] - sums[0][label]:+16.2f}")
    print(f"{'total':<28} {sum(sums[0].values()):9.2f} {sum(sums[1].values()):9.2f} "
          f"{sum(sums[1].values()) - sum(sums[0].values()):+16.2f}")
    print("\nkernels, largest difference first:")
    names = sorted(set(arms[0]) | set(arms[1]), key=lambda n: -abs(arms[1][n] - arms[0][n]))
    for name in names[:args.kernels]:
        print(f"  {arms[0][name]:8.3f} {arms[1][name]:8.3f} {arms[1][name] - arms[0][name]:+8.3f}  {name[:100]}")


if __name__ == "__main__":
    main()
