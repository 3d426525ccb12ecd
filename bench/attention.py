"""Training attention: Parallax (ours, and the public kernels with --peers) against softmax through
cuDNN, FlashAttention-2 and FlexAttention, forward and forward + backward, in one process.

    python -m bench.attention [--peers]
"""
import argparse
import math
import sys
import time

import torch
import triton

from bench.common import median_ms
from parallax_kernels import document_ids, parallax_attn, visible


def fineweb_like_doc_lens(total, seed=0, mean=762, lo=16, hi=4096):
    """Log-normal document lengths clipped to [lo, hi], summing exactly to total."""
    gen = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        x = math.exp(math.log(mean) - 0.5 + torch.randn(1, generator=gen).item())
        lens.append(int(min(max(x, lo), hi)))
    lens[-1] -= sum(lens) - total
    return [n for n in lens if n > 0]


def _fwd_and_fwdbwd(attn, inputs):
    """Median ms of the forward alone and of forward + backward (gradients of all inputs)."""
    with torch.no_grad():
        fwd = median_ms(lambda: attn(*inputs))
    out = attn(*inputs)
    grad = torch.randn_like(out)
    both = median_ms(lambda: torch.autograd.grad(attn(*inputs), inputs, grad))
    return fwd, both


def _first_call_s(attn, inputs):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = attn(*inputs)
    torch.autograd.grad(out, inputs, torch.ones_like(out))
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _peer_functions():
    """The public Parallax kernels, when installed: name -> (dense fn, varlen fn) in our layout."""
    peers = {}
    try:
        import parallax as pk
        from parallax.triton import parallax_varlen_func
        dense = lambda q, r, k, v, window=None: pk.parallax_func(  # noqa: E731  (B, H, L, D) API
            *(x.transpose(1, 2) for x in (q, r, k, v)), window_size_left=(window or 0) - 1).transpose(1, 2)
        varlen = lambda q, r, k, v, cu, window=None: parallax_varlen_func(  # noqa: E731
            q, r, k, v, window_size_left=(window or 0) - 1, cu_seqlens=cu)
        peers["parallax-kernel 0.1.1"] = (dense, varlen)
    except ImportError:
        pass
    try:
        from fla.ops.parallax import parallel_parallax
        peers["fla 0.6.0"] = (lambda q, r, k, v, window=None: parallel_parallax(q, r, k, v, window_size=window),
                              lambda q, r, k, v, cu, window=None: parallel_parallax(
                                  q, r, k, v, window_size=window, cu_seqlens=cu.long()))
    except ImportError:
        pass
    return peers


def bench_training(with_peers=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    import torch.nn.functional as F

    device, dtype, D, H = "cuda", torch.bfloat16, 128, 6
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"bf16, D={D}, H={H}; medians in ms", flush=True)
    rows = []  # (workload, implementation, fwd ms, fwd+bwd ms)
    peers = _peer_functions() if with_peers else {}

    def rand(B, T):
        return [torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(4)]

    # (a) dense causal B=16, T=2048
    q, r, k, v = rand(16, 2048)
    first = _first_call_s(parallax_attn, (q, r, k, v))
    print(f"first call (compile) dense: {first:.1f} s", flush=True)
    dense = "dense causal B=16 T=2048"
    rows.append((dense, "parallax (ours)", *_fwd_and_fwdbwd(parallax_attn, (q, r, k, v))))
    for name, backend in (("softmax cuDNN (SDPA)", SDPBackend.CUDNN_ATTENTION),
                          ("softmax FA2 (SDPA)", SDPBackend.FLASH_ATTENTION)):
        def sdpa(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True).transpose(1, 2)
        rows.append((dense, name, *_fwd_and_fwdbwd(sdpa, (q, k, v))))
    for name, (peer_dense, _) in peers.items():
        print(f"first call {name} dense: {_first_call_s(peer_dense, (q, r, k, v)):.1f} s", flush=True)
        rows.append((dense, name, *_fwd_and_fwdbwd(peer_dense, (q, r, k, v))))
    del q, r, k, v

    # (b) packed documents B=1, T=65536, with and without a 1024-token window
    T = 65536
    lens = fineweb_like_doc_lens(T)
    cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
    doc = document_ids(cu, T)
    q, r, k, v = rand(1, T)
    first = _first_call_s(lambda *x: parallax_attn(*x, cu_seqlens=cu), (q, r, k, v))
    print(f"first call (compile) documents: {first:.1f} s; {len(lens)} documents, "
          f"mean length {T / len(lens):.0f}", flush=True)
    flex = torch.compile(flex_attention, dynamic=False)
    for window in (None, 1024):
        work = f"documents T=65536{'' if window is None else ' window 1024'}"
        # Compiled, like FlexAttention and as train_gpt.py runs it: the eager call's cu_seqlens value
        # check synchronizes with the host, which a compiled graph skips.
        packed = torch.compile(lambda *x, window=window: parallax_attn(*x, cu_seqlens=cu, window=window),
                               dynamic=False)
        rows.append((work, "parallax (ours)", *_fwd_and_fwdbwd(packed, (q, r, k, v))))

        def mask_mod(b, h, i, j, window=window):
            return visible(i, j, window, doc)
        block_mask = create_block_mask(mask_mod, None, None, T, T, device=device)
        rows.append((work, "softmax FlexAttention", *_fwd_and_fwdbwd(
            lambda q, k, v: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 block_mask=block_mask).transpose(1, 2), (q, k, v))))
        for name, (_, peer_varlen) in peers.items():
            rows.append((work, name, *_fwd_and_fwdbwd(lambda *x: peer_varlen(*x, cu, window), (q, r, k, v))))

    # Each workload's ratio is against its first softmax row: cuDNN (dense) or FlexAttention (documents).
    baseline = {}
    for work, name, _, both in rows:
        if name.startswith("softmax"):
            baseline.setdefault(work, both)
    print(f"\n{'workload':<32} {'implementation':<24} {'fwd':>8} {'fwd+bwd':>8} {'x softmax':>9}")
    for work, name, fwd, both in rows:
        print(f"{work:<32} {name:<24} {fwd:8.3f} {both:8.3f} {both / baseline[work]:9.2f}")


def main(argv):
    parser = argparse.ArgumentParser(description="Parallax training attention (fwd, fwd+bwd) against softmax "
                                                 "baselines in the same process.")
    parser.add_argument("--peers", action="store_true", help="also time the public Parallax kernels, if installed")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("the benchmark needs a CUDA GPU")
        return 1
    bench_training(with_peers=args.peers)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
