"""Generation speed of the speedrun-size model (random weights): prefill and per-step decode time,
tokens/s, with and without CUDA graphs, through generate.py.

    python -m bench.sample [--compile] [--batch-sizes 1 16] [--attention parallax softmax]
"""
import argparse
import sys

import torch

import generate as gen
import train_gpt as tg
from parallax_kernels import decode_backend


def bench_sample(args) -> int:
    device = gen.inference_device()
    if device.type != "cuda":
        print("no CUDA device: timing the CPU path (no CUDA graphs)", file=sys.stderr)
    backend = decode_backend(device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; parallax decode backend: "
          f"{backend}; prompt {args.prompt_len} tokens, {args.new_tokens} new")
    print(f"{'attention':>9} {'batch':>5} {'graph':>5} {'compile':>7} {'prefill ms':>10} {'ms/step':>8} "
          f"{'tokens/s':>9}")
    generator = torch.Generator().manual_seed(0)
    for attention in args.attention:
        torch.manual_seed(0)
        model = gen.prepare_for_inference(tg.GPT(tg.model_config(tg.Hyperparameters(attention=attention))), device)
        with torch.no_grad():  # random weights everywhere, so no layer is skipped by a zero
            for param in model.parameters():
                if param.ndim == 2 and not param.abs().sum():
                    param.normal_(0, 0.02)
        for batch_size in args.batch_sizes:
            prompts = [[tg.BOS] + torch.randint(0, tg.BOS, (args.prompt_len - 1,), generator=generator).tolist()
                       for _ in range(batch_size)]
            for use_graph in ([True, False] if device.type == "cuda" else [False]):
                options = dict(temperature=0.8, top_k=50, stop_token=None, use_graph=use_graph,
                               use_compile=args.compile)
                gen.generate(model, prompts, min(8, args.new_tokens), **options)  # compile and tune first
                result = gen.generate(model, prompts, args.new_tokens, **options)
                steps = args.new_tokens - 1  # decode steps after the prefill's token
                print(f"{attention:>9} {batch_size:>5} {'on' if use_graph else 'off':>5} "
                      f"{'on' if args.compile else 'off':>7} {1000 * result.prefill_s:>10.1f} "
                      f"{1000 * result.decode_s / max(steps, 1):>8.3f} "
                      f"{batch_size * args.new_tokens / result.decode_s:>9.0f}", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="decode tokens/s of the speedrun-size model, random weights")
    parser.add_argument("--attention", nargs="+", default=["parallax", "softmax"], choices=["parallax", "softmax"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    return bench_sample(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
