"""Muon's cost on the speedrun's hidden matrices (width 768, 6 heads of 128): orthogonalize and
Muon.step() on one device, and under torchrun the distributed step.

    python -m bench.muon                              # one device (a tiny version on a CPU)
    torchrun --nproc_per_node=8 -m bench.muon         # adds the distributed Muon.step()
"""
import argparse
import math
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bench.common import median_ms
from muon import Muon, orthogonalize


def speedrun_shapes(layers: int, mlp_hidden: int, dim: int = 768) -> list[tuple[int, int]]:
    """nn.Linear weight shapes (out, in): q, k, v, r and the attention output, MLP up and down."""
    return [(dim, dim)] * 5 * layers + [(mlp_hidden, dim)] * layers + [(dim, mlp_hidden)] * layers


def _orthogonalize_flops(batches: list[Tensor], steps: int = 5) -> int:
    """Per step on a wide m x n (m <= n): X X^T and B X cost 2 m^2 n each, A A costs 2 m^3."""
    return sum(len(b) * steps * (4 * min(b.shape[1:]) ** 2 * max(b.shape[1:]) + 2 * min(b.shape[1:]) ** 3)
               for b in batches)


def bench(layers: int, repeats: int):
    """Times orthogonalize and Muon.step() on one device; under torchrun, also the distributed step."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def row(name, matrices, ms, flops=None):
        rate = f"{flops / ms / 1e9:>8.1f}" if flops else ""
        gflop = f"{flops / 1e9:>8.1f}" if flops else ""
        if rank == 0:
            print(f"{name:<52} {matrices:>8} {gflop:>8} {ms:>9.3f} {rate:>8}", flush=True)

    if rank == 0:
        print(f"Muon benchmark ({where}, {world} rank(s)): {layers} layers at width 768, "
              f"polar_express, 5 steps, median of {repeats}")
        print(f"{'what':<52} {'matrices':>8} {'GFLOP':>8} {'ms':>9} {'TFLOP/s':>8}")

    for mlp_hidden in (3072, 2688):
        shapes = speedrun_shapes(layers, mlp_hidden)
        counts = {s: shapes.count(s) for s in dict.fromkeys(shapes)}
        ms = {}
        for label, ranks in (("all", 1), ("share", 8)):  # Muon batches each shape, padded to the ranks
            batches = [torch.randn(math.ceil(n / ranks), *s, device=device) for s, n in counts.items()]
            ms[label] = median_ms(lambda: [orthogonalize(b) for b in batches], repeats, warmup=1)
            what = "all hidden matrices" if ranks == 1 else "per-rank share at 8 GPUs"
            flops = _orthogonalize_flops(batches)
            row(f"orthogonalize {what}, MLP {mlp_hidden}", sum(map(len, batches)), ms[label], flops)
        params = [nn.Parameter(torch.randn(s, device=device) * s[1] ** -0.5) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        ms["step"] = median_ms(Muon(params).step, repeats, warmup=1)
        row(f"Muon.step() on {world} rank(s), MLP {mlp_hidden}", len(params), ms["step"])
        if world == 1:
            # The rest of the step (stacking, momentum, applying the updates, the finiteness check) is
            # not split over ranks; counting all of it bounds the per-rank cost, communication aside.
            estimate = ms["share"] + ms["step"] - ms["all"]
            row(f"per-rank step at 8 GPUs (estimate, no comms), MLP {mlp_hidden}", "", estimate)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, help="transformer layers (default: 12 on a GPU, 1 on a CPU)")
    parser.add_argument("--repeats", type=int, help="timed repeats (default: 20 on a GPU, 2 on a CPU)")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    bench(args.layers or (12 if on_gpu else 1), args.repeats or (20 if on_gpu else 2))
