"""Forward and backward of the checkout's Triton kernels against other versions of parallax_attn_triton.py,
alternated in one process (in order, then reversed), on the step's attention workloads and dense causal.

    python records/2026-11-30_surcharge-by-kernel-h200/kernel_ab.py NAME=path/to/parallax_attn_triton.py ...

Run from the repository root on a GPU. Each version is loaded under its own custom-op namespace, so they
coexist; outputs and gradients are compared with the checkout's. Versions with an r_scale argument (branch r-scale)
get ones, which gives the results of those without.
"""
import importlib.util
import inspect
import os
import sys
import tempfile

import torch
sys.path.insert(0, ".")
import parallax_attn_triton as checkout
from bench.attention import fineweb_like_doc_lens
from bench.common import median_ms


def load_as(name, path):
    """The file at path as module pat_<name>, its custom ops renamed parallax_<name>::..."""
    copy = os.path.join(tempfile.mkdtemp(), f"pat_{name}.py")
    with open(path) as src, open(copy, "w") as dst:
        dst.write(src.read().replace('"parallax::', f'"parallax_{name}::'))
    spec = importlib.util.spec_from_file_location(f"pat_{name}", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VERSIONS = {"main": checkout} | {a.split("=")[0]: load_as(*a.split("=", 1)) for a in sys.argv[1:]}
H, D = 6, 128
gen = torch.Generator(device="cuda").manual_seed(0)


def inputs(B, T):
    return [torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(5)]


packed, dense = inputs(1, 65536), inputs(16, 2048)
bounds = {}
for docs, mean, longest in (("fw", 762, 4096), ("long", 2447, 32768)):
    lens = fineweb_like_doc_lens(65536, mean=mean, hi=longest)
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    bounds[docs] = checkout._document_bounds(cu, 65536)
WORKLOADS = {f"{docs}{w}": (packed, *bounds[docs], w) for docs in bounds for w in (1792, 896)}
WORKLOADS["dense"] = (dense, None, None, 0)


def run(module, workload):
    """(forward ms, backward ms, [o, dq, dr, dk, dv]) of one version on one workload."""
    (q, r, k, v, g), doc_start, doc_end, window = WORKLOADS[workload]
    scale = D ** -0.5
    # versions with r_scale take it after r (ones: the same results as those without)
    takes_r_scale = "r_scale" in inspect.signature(module._forward).parameters
    r_args = (r, torch.ones(H, device="cuda")) if takes_r_scale else (r,)
    saved = module._forward(q, *r_args, k, v, doc_start, window, scale)
    grads = module._backward(g, q, *r_args, k, v, *saved, doc_start, doc_end, window, scale)
    fwd = median_ms(lambda: module._forward(q, *r_args, k, v, doc_start, window, scale), repeats=40)
    bwd = median_ms(lambda: module._backward(g, q, *r_args, k, v, *saved, doc_start, doc_end, window, scale),
                    repeats=40)
    return fwd, bwd, [saved[0], *(x for x in grads if x.dim() == 4)]


print(f"# {torch.cuda.get_device_name()}; T=65536 packed (fw: FineWeb-like documents, mean 762; long: devdocs-like, "
      f"mean 2447) or dense B=16 T=2048; H={H} D={D} bf16; ms, medians of 40", flush=True)
print(f"{'round':<6} {'version':<16} {'workload':<9} {'fwd':>7} {'bwd':>7} {'max rel diff vs main':>21}", flush=True)
reference, times = {}, {}
for rnd, order in enumerate((list(VERSIONS), list(reversed(VERSIONS)))):
    for name in order:
        for workload in WORKLOADS:
            fwd, bwd, outs = run(VERSIONS[name], workload)
            ref = reference.setdefault(workload, [x.float() for x in outs])
            diff = max(((x.float() - y).abs().max() / y.abs().max()).item() for x, y in zip(outs, ref))
            finite = all(torch.isfinite(x).all().item() for x in outs)
            times.setdefault((name, workload), []).append((fwd, bwd))
            print(f"{rnd:<6} {name:<16} {workload:<9} {fwd:7.3f} {bwd:7.3f} {diff:21.3g}"
                  f"{'' if finite else '  NaN/inf!'}", flush=True)

print("\nsummary: fwd+bwd ms, mean of the two rounds; step12 = 4 x window 1792 + 8 x window 896 layers")
for name in VERSIONS:
    total = {w: sum(f + b for f, b in times[name, w]) / 2 for w in WORKLOADS}
    step12 = {docs: 4 * total[f"{docs}1792"] + 8 * total[f"{docs}896"] for docs in bounds}
    cells = " ".join(f"{w}={ms:.3f}" for w, ms in total.items())
    print(f"{name:<16} {cells}  step12-fw={step12['fw']:.2f} step12-long={step12['long']:.2f}", flush=True)
