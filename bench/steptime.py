"""Training step time of the arms (softmax, Parallax parameter-matched, Parallax drop-in) in one process,
on the same data: train_gpt.py's Trainer builds, compiles and steps each arm exactly as training does.

    python -m bench.steptime [--arms softmax,parallax-pm,parallax] [--steps 30] [--repeats 3]
                             [--profile [--profile-steps 3] [--trace out/steptime.json]]

Settings come from the usual environment variables (TRAIN_FILES, SEQ_LEN, NUM_LAYERS, COMPILE, SMOKE=1 ...),
with two defaults of the bench's own unless set there: MICRO_BATCHES=1 (one rank's share of the 8-GPU
step) and one window stage, the schedule's last (so each arm compiles one training graph). ATTENTION and
PARAM_MATCHED are the arms'. The warm-up (compilation) runs outside the timed steps; a step's time is
the median over the repeats of (CUDA-event time of --steps optimizer steps) / --steps; with nvidia-smi, the
GPU's mean SM clock and power over those steps are printed beside it (a power-capped GPU clocks each arm
differently). --profile then traces a few steps per arm with torch.profiler and sums device (kernel) and
host (CPU) time per category.
At the record size an arm's warm-up compiles for minutes; --arms splits the arms over several calls.
"""
import argparse
import gc
import itertools
import os
import sys
import time
from dataclasses import replace

import torch

import train_gpt as tg
from bench.common import GpuClocks, median_ms
from bench.profiling import print_profile, profile_summary, step_profiler
from gpt2_data import check_enough_tokens

ARMS = {  # name -> the hyperparameters that make it
    "softmax": dict(attention="softmax", param_matched=False),
    "parallax-pm": dict(attention="parallax", param_matched=True),
    "parallax": dict(attention="parallax", param_matched=False),
}


def bench_arm(arm: str, hp: tg.Hyperparameters, device: torch.device, args) -> dict:
    """Builds, warms up and times one arm; profiles it with --profile. Returns its table row."""
    torch._dynamo.reset()  # each arm compiles from scratch, and its graphs are counted alone
    gc.collect()  # the previous arm's model and optimizer states, which the compiled code held
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        print(f"{arm}: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated before it", flush=True)
    stats = torch._dynamo.utils.counters["stats"]
    compiled_before = stats["unique_graphs"]  # the counter runs over the whole process

    def graphs():
        return stats["unique_graphs"] - compiled_before

    trainer = tg.Trainer(hp, rank=0, world_size=1, device=device)
    batches, steps = trainer.train_batches(), itertools.count()
    params = sum(p.numel() for p in trainer.model.parameters())
    print(f"{arm}: {params / 1e6:.1f}M parameters, MLP hidden {trainer.model.config.mlp_hidden}, "
          f"{'compiled' if trainer.compiled is not trainer.model else 'eager'}", flush=True)

    start = time.perf_counter()
    for i in range(args.warmup_steps):
        trainer.train_step(next(steps), batches)
        tg.synchronize(device)
        print(f"{arm}: warm-up step {i + 1}/{args.warmup_steps}: {time.perf_counter() - start:.1f} s, "
              f"{graphs()} graph(s) compiled", flush=True)
    warm_up_s, compiled = time.perf_counter() - start, graphs()

    print(f"{arm}: timing {args.repeats} x {args.steps} steps", flush=True)
    with GpuClocks(device) as clocks:
        ms = median_ms(lambda: [trainer.train_step(next(steps), batches) for _ in range(args.steps)],
                       repeats=args.repeats, warmup=0) / args.steps
    if clocks.summary:
        print(f"{arm}: SM clock {clocks.summary[0]:.0f} MHz, power {clocks.summary[1]:.0f} W "
              "(nvidia-smi, means over the timed steps)", flush=True)
    if graphs() > compiled:
        print(f"{arm}: warning: {graphs() - compiled} graph(s) compiled during the timed steps; "
              "their compilation is in the time", flush=True)
    allocated = tg.peak_memory(device)[0]
    row = dict(arm=arm, params=params, ms=ms, peak=allocated, warm_up_s=warm_up_s, graphs=compiled)
    print(f"{arm}: {ms:.2f} ms per step", flush=True)  # before the profile, which can fail or run out of time

    if args.profile:
        with step_profiler(args.profile_steps, cuda=device.type == "cuda") as prof:
            for _ in range(1 + args.profile_steps):
                trainer.train_step(next(steps), batches)
                prof.step()
        tg.synchronize(device)
        print_profile(arm, *profile_summary(prof.events(), args.profile_steps), args.profile_steps, args.top)
        if args.trace:
            stem, ext = os.path.splitext(args.trace)
            path = f"{stem}-{arm}{ext or '.json'}"
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            prof.export_chrome_trace(path)
            print(f"{arm}: chrome trace in {path}", flush=True)
    return row


def bench_hyperparameters(environ) -> tg.Hyperparameters:
    """The environment's hyperparameters, with the bench's defaults where it sets none (see the docstring)."""
    hp = tg.hyperparameters_from_env(environ)
    if "MICRO_BATCHES" not in environ:
        hp = replace(hp, micro_batches=1)
    if "WINDOW_SCHEDULE" not in environ:
        hp = replace(hp, window_schedule=hp.window_schedule[-1:])
    return hp


def parse_arms(text: str) -> list:
    arms = [name.strip() for name in text.split(",") if name.strip()]
    if unknown := [name for name in arms if name not in ARMS]:
        raise ValueError(f"unknown arm(s) {', '.join(map(repr, unknown))}; the arms are {', '.join(ARMS)}")
    if not arms:
        raise ValueError(f"no arms given; the arms are {', '.join(ARMS)}")
    return arms


def main(argv=None, environ=os.environ) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--profile", action="store_true", help="trace a few steps per arm, summed per category")
    parser.add_argument("--profile-steps", type=int, default=3, help="traced steps (after one untraced)")
    parser.add_argument("--top", type=int, default=15, help="unmatched names listed per profile")
    parser.add_argument("--trace", help="with --profile: export chrome traces to PATH with -<arm> before its suffix")
    args = parser.parse_args(argv)
    try:
        arms = parse_arms(args.arms)
        if min(args.steps, args.repeats, args.warmup_steps, args.profile_steps) < 1:
            raise ValueError("--steps, --repeats, --warmup-steps and --profile-steps must be at least 1")
        hp = bench_hyperparameters(environ)
        tg.check_hyperparameters(hp, 1)
        steps_per_arm = args.warmup_steps + args.repeats * args.steps + (1 + args.profile_steps) * args.profile
        check_enough_tokens(hp.train_files, steps_per_arm * hp.micro_batches * hp.seq_len + 1,
                            f"{steps_per_arm} steps of {hp.micro_batches} x {hp.seq_len} tokens")
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    device = tg.training_device(hp, 0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"step time on {where}, torch {torch.__version__}: {hp.num_layers} layers, width {hp.model_dim}, "
          f"{hp.micro_batches} x {hp.seq_len} tokens per step, window schedule {hp.window_schedule}; "
          f"median of {args.repeats} x {args.steps} steps", flush=True)
    rows = []
    for arm in arms:
        rows.append(bench_arm(arm, replace(hp, **ARMS[arm]), device, args))
    memory = "peak allocated GiB" if device.type == "cuda" else "peak RSS GiB"  # the CPU's is the process's
    print(f"\n{'arm':<12} {'parameters':>12} {'ms/step':>9} {'x ' + arms[0]:>13} {memory:>18} {'warm-up s':>9} "
          f"{'graphs':>6}")
    for row in rows:
        print(f"{row['arm']:<12} {row['params']:>12,} {row['ms']:>9.2f} {row['ms'] / rows[0]['ms']:>13.2f} "
              f"{row['peak'] / 2**30:>18.2f} {row['warm_up_s']:>9.1f} {row['graphs']:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
