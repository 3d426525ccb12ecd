"""The checkout's Triton backward against other versions of parallax_attn_triton.py, alternated in one process
(A, B, ..., then the reverse order), on the step's attention workloads; then each version's registers and spills.

    python records/2026-11-30_faster-backward-h200/backward_ab.py NAME=path/to/parallax_attn_triton.py ...

Run from the repository root on a GPU. The versions are loaded under other custom-op names, so they coexist.
"""
import importlib.util
import os
import sys
import tempfile

import torch
sys.path.insert(0, ".")
import parallax_attn_triton as pat_main
from bench.attention import fineweb_like_doc_lens
from bench.common import median_ms


def load_version(name, path):
    """parallax_attn_triton.py at path as a module whose custom ops are named parallax_<name>::..."""
    src = open(path).read().replace('"parallax::', f'"parallax_{name}::')
    copy = os.path.join(tempfile.mkdtemp(), f"pat_{name}.py")
    open(copy, "w").write(src)
    spec = importlib.util.spec_from_file_location(f"pat_{name}", copy)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MODS = {"main": pat_main, **{arg.split("=", 1)[0]: load_version(*arg.split("=", 1)) for arg in sys.argv[1:]}}

dev, dt, H, D = "cuda", torch.bfloat16, 6, 128
scale = D ** -0.5
T = 65536
gen = torch.Generator(device=dev).manual_seed(0)
docs = [torch.randn(1, T, H, D, device=dev, dtype=dt, generator=gen) for _ in range(5)]
dense = [torch.randn(16, 2048, H, D, device=dev, dtype=dt, generator=gen) for _ in range(5)]
gqa = [torch.randn(1, T, H, D, device=dev, dtype=dt, generator=gen) for _ in range(2)] + \
      [torch.randn(1, T, 2, D, device=dev, dtype=dt, generator=gen) for _ in range(2)] + \
      [torch.randn(1, T, H, D, device=dev, dtype=dt, generator=gen)]
bounds = {}
for name, mean, hi in (("fw", 762, 4096), ("long", 2447, 32768)):
    cu = torch.tensor([0] + fineweb_like_doc_lens(T, mean=mean, hi=hi), device=dev).cumsum(0).to(torch.int32)
    bounds[name] = pat_main._document_bounds(cu, T)
WORK = {"fw1792": (docs, *bounds["fw"], 1792), "fw896": (docs, *bounds["fw"], 896),
        "long1792": (docs, *bounds["long"], 1792), "long896": (docs, *bounds["long"], 896),
        "dense": (dense, None, None, 0), "gqa-long1792": (gqa, *bounds["long"], 1792)}


def measure(mod, work, repeats=40):
    (q, r, k, v, g), ds, de, window = WORK[work]
    saved = mod._forward(q, r, k, v, ds, window, scale)
    grads = mod._backward(g, q, r, k, v, *saved, ds, de, window, scale)
    bwd = median_ms(lambda: mod._backward(g, q, r, k, v, *saved, ds, de, window, scale), repeats=repeats)
    return bwd, grads


print(f"# {torch.cuda.get_device_name()}; T={T} H={H} D={D}; fw = FineWeb-like documents (mean 762), "
      f"long = devdocs-like (mean 2447); backward ms, medians of 40; step12 = 4 x w1792 + 8 x w896", flush=True)
print(f"{'round':<6} {'code':<9} {'work':<13} {'bwd':>7} {'rel max|diff| vs main':>22}", flush=True)
reference, table = {}, {}
for rnd in range(2):
    for name in tuple(MODS) + tuple(reversed(MODS)) if rnd else tuple(MODS):
        for work in WORK:
            bwd, grads = measure(MODS[name], work)
            if work not in reference:
                reference[work] = [x.float() for x in grads]
            diff = max(((x.float() - y).abs().max() / y.abs().max()).item() for x, y in zip(grads, reference[work]))
            ok = all(torch.isfinite(x).all().item() for x in grads)
            table.setdefault((name, work), []).append(bwd)
            print(f"{rnd:<6} {name:<9} {work:<13} {bwd:7.3f} {diff:22.3g}{'' if ok else '  NaN/inf!'}", flush=True)

print("\nsummary (median over rounds):")
for name in MODS:
    ms = {w: sorted(table[name, w])[len(table[name, w]) // 2] for w in WORK}
    step12 = {docs: 4 * ms[f"{docs}1792"] + 8 * ms[f"{docs}896"] for docs in ("fw", "long")}
    print(f"{name:<9} " + " ".join(f"{w}={ms[w]:.3f}" for w in WORK) +
          f"  step12-fw={step12['fw']:.2f} step12-long={step12['long']:.2f}", flush=True)

print("\nregisters / spills (sm_90, after the runs above):")
for name, mod in MODS.items():
    for kname in ("_bwd_dq_kernel", "_bwd_dkdv_kernel", "_row_dots_kernel"):
        fn = getattr(mod, kname, None)
        if fn is None:  # versions before the row kernel
            continue
        for _, cache in fn.device_caches.items():
            for key, k in cache[0].items():
                k._init_handles()
                print(f"  {name:<9} {kname:<17} regs {k.n_regs} spills {k.n_spills}", flush=True)
