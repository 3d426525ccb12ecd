"""Decode: Parallax (the CuTe DSL kernel where it runs, and the Triton kernel) against softmax decode
through SDPA (cuDNN, FlashAttention-2) and the HBM floor, per call from CUDA-graph replays.

    python -m bench.decode
"""
import sys

import torch

from bench.common import median_ms
from generate import capture_cuda_graph
from parallax_kernels import decode_backend, parallax_decode, parallax_decode_triton


def graph_time_us(fn, calls_per_graph=32, replays=25):
    """Median time per call of `fn` over CUDA-graph replays of `calls_per_graph` back-to-back calls."""
    fn()  # compile outside the capture
    graph, _ = capture_cuda_graph(lambda: [fn() for _ in range(calls_per_graph)], warmup_calls=1)
    return median_ms(graph.replay, repeats=replays, warmup=1) * 1e3 / calls_per_graph


def copy_bandwidth(nbytes=1 << 30):
    """Device-to-device copy bandwidth in bytes/s, counting read + write bytes. Timed eagerly:
    inside a CUDA graph the copy becomes a memcpy node served by the slower copy engines."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (median_ms(lambda: dst.copy_(src), repeats=10, warmup=1) * 1e-3)


def bench_decode(batches=(1, 8, 32), lengths=(512, 1024, 4096, 16384), heads=8, head_dim=128):
    """Per-call decode time (us) of Parallax (CuTe DSL, Triton) against softmax decode through SDPA
    (cuDNN, FlashAttention-2) and the HBM floor, bf16, all rows at full length L."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    device = torch.device("cuda")
    dtype = torch.bfloat16
    bandwidth = copy_bandwidth()
    backend = decode_backend(device)
    print(f"decode bench on {torch.cuda.get_device_name()}: H={heads} D={head_dim} bf16, "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, parallax_decode backend: {backend}")
    columns = ["B", "L", "parallax", "triton", "cudnn", "fa2", "floor", "parallax/cudnn"]
    print("".join(f"{c:>16}" for c in columns))
    rows = []
    for B in batches:
        for L in lengths:
            q, r = (torch.randn(B, 1, heads, head_dim, device=device, dtype=dtype) for _ in range(2))
            k, v = (torch.randn(B, L, heads, head_dim, device=device, dtype=dtype) for _ in range(2))
            lens = torch.full((B,), L, dtype=torch.int32, device=device)
            out = torch.empty_like(q)
            t_ours = graph_time_us(lambda: parallax_decode(q, r, k, v, lens, out=out))
            t_triton = graph_time_us(lambda: parallax_decode_triton(q, r, k, v, lens, out=out))
            qs = q.transpose(1, 2).contiguous()  # (B, H, 1, D) against (B, H, L, D)
            ks, vs = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            softmax_times = []
            for sdpa_backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
                def softmax_decode():
                    with sdpa_kernel(sdpa_backend):
                        torch.nn.functional.scaled_dot_product_attention(qs, ks, vs)
                try:
                    softmax_times.append(graph_time_us(softmax_decode))
                except RuntimeError:  # backend unavailable for this shape or build
                    softmax_times.append(float("nan"))
            floor = 2 * k.numel() * k.element_size() / bandwidth * 1e6
            row = [B, L, t_ours, t_triton, *softmax_times, floor, t_ours / softmax_times[0]]
            rows.append(row)
            print(f"{B:>16}{L:>16}" + "".join(f"{x:>16.2f}" for x in row[2:]))
            del q, r, k, v, qs, ks, vs
    return rows


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("the benchmark needs a CUDA GPU")
        sys.exit(1)
    bench_decode()
