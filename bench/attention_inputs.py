"""The attention's inputs (attention_inputs.py), forward + backward per layer at the record's size: the Triton
kernels against the torch code compiled by inductor (what the step ran before), and a copy of the bytes the
kernels must move at least (the floor), in one process.

    python -m bench.attention_inputs [--tokens 65536] [--block-t 32,64]

Cases: softmax (q, k, v) and Parallax (q, k, v, r with its per-head gain), with and without the value
embedding (the first and last 3 of 12 layers mix it into v). On a CPU: a tiny version, to check it runs.
"""
import argparse
import functools

import torch

import attention_inputs as ai
from bench.common import median_ms
from train_gpt import RotaryTables


def case_inputs(T, P, H, D, has_ve, device, dtype):
    qkvr = torch.randn(1, T, P, H, D, device=device, dtype=dtype, requires_grad=True)
    ve = torch.randn(1, T, H * D, device=device, dtype=dtype, requires_grad=True) if has_ve else None
    v_mix = torch.tensor([0.5, 0.5], device=device, requires_grad=True)
    r_gain = torch.full((H, 1), 0.1, device=device, requires_grad=True) if P == 4 else None
    grads = [torch.randn(1, T, H, D, device=device, dtype=dtype) for _ in range(P)]
    return (qkvr, RotaryTables(D).prefix(T, torch.device(device)), v_mix, ve, r_gain), grads


def step(route, inputs, grads):
    """Forward and backward of one layer's inputs (gradients returned, not accumulated into .grad)."""
    outputs = [x for x in route(*inputs) if x is not None]
    return torch.autograd.grad(outputs, [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad], grads)


def kernel_ms(fn, calls=10) -> float:
    """GPU kernel time per call of fn, from a profile of `calls` calls: what a GPU-bound step pays (the wall
    time adds this process's launch overhead, which a compiled step hides)."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in profile.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in kernels) / calls / 1e3


def moved_bytes(T, P, H, D, has_ve, element_bytes):
    """Read qkvr (and ve), write P outputs; back: read P gradients, qkvr (and ve), write dqkvr (and dve)."""
    tensor = T * H * D * element_bytes
    return tensor * (P + has_ve + P) + tensor * (P + P + has_ve + P + has_ve)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--block-t", default=str(ai._BLOCK_T), help="positions per program, comma-separated")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    T, H, D = (args.tokens, 6, 128) if on_gpu else (64, 2, 16)
    compiled = torch.compile(ai.attention_inputs_reference, dynamic=False)
    where = torch.cuda.get_device_name() if on_gpu else "cpu (tiny shapes, the torch code only)"
    print(f"# {where}; T={T} H={H} D={D} {dtype}; ms per layer, fwd+bwd: wall (median of 30) / GPU kernel time "
          "(profiled)", flush=True)
    blocks = args.block_t.split(",") if on_gpu else []
    print(f"{'case':<16} {'copy floor':>11} {'inductor':>15}" + "".join(f" {'BLOCK_T=' + b:>15}" for b in blocks)
          + "  kernel time x inductor's")
    for P, name in ((3, "softmax"), (4, "parallax")):
        for has_ve in (False, True):
            inputs, grads = case_inputs(T, P, H, D, has_ve, device, dtype)
            inductor_step = functools.partial(step, compiled, inputs, grads)
            inductor = [median_ms(inductor_step, repeats=30)]
            floor_src = torch.empty(moved_bytes(T, P, H, D, has_ve, 2) // 2, dtype=torch.uint8, device=device)
            floor_dst = torch.empty_like(floor_src)
            floor = median_ms(lambda: floor_dst.copy_(floor_src), repeats=30)  # reads and writes half each
            kernels = []
            if on_gpu:
                inductor.append(kernel_ms(inductor_step))
                for block_t in blocks:
                    ai._BLOCK_T = int(block_t)
                    fn = functools.partial(step, ai.attention_inputs_triton, inputs, grads)
                    kernels.append((median_ms(fn, repeats=30), kernel_ms(fn)))
            case = f"{name}{' + ve' if has_ve else ''}"
            ratios = " ".join(f"{k[1] / inductor[1]:.2f}" for k in kernels)
            print(f"{case:<16} {floor:11.3f} {' / '.join(f'{t:.3f}' for t in inductor):>15}"
                  + "".join(f" {f'{k[0]:.3f} / {k[1]:.3f}':>15}" for k in kernels) + f"  {ratios}", flush=True)


if __name__ == "__main__":
    main()
