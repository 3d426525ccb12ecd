"""The step-time anchor: modded-nanoGPT's record of 2025-01-16 (records/track_1_short/2025-01-16_Sub3Min in
KellerJordan/modded-nanogpt, the FlexAttention-era script train_gpt.py follows), run on one GPU with one
rank's share of its batch and timed as bench.steptime times the arms.

    python -m bench.anchor --record RECORD_LOG --train-files "DATA/devdocs_train_*.bin" \\
        --val-files "DATA/devdocs_val_*.bin" [--window 1792] [--steps 30] [--repeats 3] [--no-coordinate-descent] \\
        [--profile 3]

RECORD_LOG is the record's log from a checkout of that repository; it starts with the record's code (up to
the first line of '='). The bench writes an adapted copy into .anchor/ (ignored by git: the record's code
is never part of this repository) that changes only what one GPU and other shards need, then runs it as a
process group of one and prints its step time. The changes: the data paths (absolute patterns allowed),
one 64K-token sequence per step (one rank's share of 8 x 64K: no gradient accumulation, no communication),
a fixed long window (the record grows it from 128 to 1792 over its run; --window picks the stage, 1792
being bench.steptime's), the FP8 head backward's fake declaring the transposed strides its kernel returns
(torch 2.11 checks them; the record's torch did not), validation on one sequence at the end only, and CUDA events around --repeats x
--steps steps after 10 warm-up steps, the median reported. Each change must match the record's code exactly
once, so another record fails with the line that did not match. The record sets inductor's
coordinate-descent tuning; under torch 2.11 its first forward alone took over 6 minutes to tune on an H200
(--no-coordinate-descent turns it off, at the cost of the record's tuned kernels). --profile N then traces
N more steps and prints bench.steptime's per-category table for the record.
"""
import argparse
import os
import re
import socket
import subprocess
import sys

WARMUP_STEPS = 10  # as the record: its first steps are not timed
RESULT = re.compile(r"^ANCHOR ms per step \(median of (\d+) x (\d+)\): ([\d.]+); peak allocated (\d+) MiB$")


def record_code(log_text: str) -> str:
    """The code at the head of a modded-nanoGPT record log (everything before the first line of '=')."""
    head, separator, _ = log_text.partition("\n" + "=" * 100 + "\n")
    if not separator or "import torch" not in head:
        raise ValueError("not a modded-nanoGPT record log: no code followed by a line of 100 '='")
    return head + "\n"


def adapted_code(code: str, window: int, steps: int, repeats: int, coordinate_descent: bool,
                 profile_steps: int = 0) -> str:
    """The record's code with the one-GPU, fixed-window, timed changes (see the module docstring), and with
    profile_steps > 0 a torch.profiler trace of that many steps (after one untraced) after the timed ones."""
    marks = [WARMUP_STEPS + i * steps for i in range(repeats + 1)]
    train_steps = marks[-1] + (1 + profile_steps if profile_steps else 0)
    changes = [
        ('train_files = "data/fineweb10B/fineweb_train_*.bin"', 'train_files = os.environ["ANCHOR_TRAIN_FILES"]'),
        ('val_files = "data/fineweb10B/fineweb_val_*.bin"', 'val_files = os.environ["ANCHOR_VAL_FILES"]'),
        ("files = sorted(Path.cwd().glob(filename_pattern))",
         'files = sorted(map(Path, __import__("glob").glob(filename_pattern)))'),
        ("val_tokens = 10485760", "val_tokens = 65536"),
        ("batch_size = 8*64*1024", "batch_size = 64*1024"),
        ("val_loss_every = 125", "val_loss_every = 0"),
        ("train_steps = args.num_iterations\n",
         f"train_steps = {train_steps}\nevents = {{}}\n" + ("profiler = None\n" if profile_steps else "")),
        ("window_size = next_multiple_of_n(1728 * step / train_steps, n=128)", f"window_size = {window}"),
        # the FP8 head's backward returns grad_w transposed; newer torch checks a custom op's strides against
        # its fake, so the fake must say so (no effect on what runs)
        ("return x_f8.to(torch.bfloat16), w_f8.to(torch.float32)\n",
         "return x_f8.to(torch.bfloat16), w_f8.to(torch.float32).t().contiguous().t()\n"),
        ("    timed_steps = float(\"nan\") if step <= 11 else (step - 10) + 1 # <= 11 to avoid bug in val\n",
         "    timed_steps = float(\"nan\") if step <= 11 else (step - 10) + 1 # <= 11 to avoid bug in val\n"
         f"    if step in {tuple(marks)}:\n"
         "        events[step] = torch.cuda.Event(enable_timing=True)\n"
         "        events[step].record()\n"),
    ]
    if profile_steps:  # after the timed steps: one untraced step, then profile_steps traced ones
        changes += [
            ("        events[step].record()\n",
             "        events[step].record()\n"
             f"    if step == {marks[-1]}:\n"
             "        sys.path.insert(0, os.environ[\"ANCHOR_BENCH_ROOT\"])\n"
             "        from bench.profiling import print_profile, profile_summary, step_profiler\n"
             f"        profiler = step_profiler({profile_steps}, cuda=True)\n"
             "        profiler.start()\n"),
            ("    model.zero_grad(set_to_none=True)\n",
             "    model.zero_grad(set_to_none=True)\n"
             "    if profiler is not None:\n"
             "        profiler.step()\n"),
        ]
    if not coordinate_descent:
        changes.append(("torch._inductor.config.coordinate_descent_tuning = True",
                        "torch._inductor.config.coordinate_descent_tuning = False"))
    for old, new in changes:
        if code.count(old) != 1:
            raise ValueError(f"the record's code has {code.count(old)} copies of {old.strip()!r}, not one: "
                             "not the 2025-01-16 record this bench adapts")
        code = code.replace(old, new)
    code += f"""
torch.cuda.synchronize()
step_ms = sorted(events[a].elapsed_time(events[b]) / {steps} for a, b in zip({marks[:-1]}, {marks[1:]}))
print(f"ANCHOR ms per step (median of {repeats} x {steps}): {{step_ms[len(step_ms) // 2]:.2f}}; "
      f"peak allocated {{torch.cuda.max_memory_allocated() // 2**20}} MiB", flush=True)
"""
    if profile_steps:  # bench.steptime's categories, so the two tables compare line by line
        code += f"""
profiler.stop()
print_profile("anchor", *profile_summary(profiler.events(), {profile_steps}), {profile_steps}, top=15)
"""
    return code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", required=True, help="the record's log (code, then a line of '=', then its log)")
    parser.add_argument("--train-files", required=True, help="glob of the training shards")
    parser.add_argument("--val-files", required=True, help="glob of the validation shards")
    parser.add_argument("--window", type=int, default=1792, help="the long window, a multiple of 128")
    parser.add_argument("--steps", type=int, default=30, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    parser.add_argument("--no-coordinate-descent", action="store_true", help="turn off the record's kernel tuning")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="then trace STEPS steps with torch.profiler, summed per category as bench.steptime does")
    parser.add_argument("--workdir", default=".anchor", help="where the adapted copy and its logs go (git-ignored)")
    args = parser.parse_args(argv)
    if args.window % 128 or args.window <= 0 or min(args.steps, args.repeats) < 1 or args.profile < 0:
        parser.error("--window must be a positive multiple of 128, --steps and --repeats at least 1, --profile "
                     "at least 0")
    try:
        with open(args.record) as f:
            code = adapted_code(record_code(f.read()), args.window, args.steps, args.repeats,
                                not args.no_coordinate_descent, args.profile)
    except (OSError, ValueError) as err:
        parser.error(f"{args.record}: {err}")
    os.makedirs(args.workdir, exist_ok=True)
    script = os.path.join(args.workdir, "record_one_gpu.py")
    with open(script, "w") as f:
        f.write(code)
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), ANCHOR_TRAIN_FILES=os.path.abspath(args.train_files),
               ANCHOR_VAL_FILES=os.path.abspath(args.val_files),
               ANCHOR_BENCH_ROOT=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(f"anchor: {script}, window {args.window}, {WARMUP_STEPS} warm-up steps then {args.repeats} x {args.steps} "
          f"timed, coordinate-descent tuning {'off' if args.no_coordinate_descent else 'on'}", flush=True)
    # the record reads its own file as sys.argv[0] (to log its code) and writes logs/ under the working folder
    process = subprocess.Popen([sys.executable, os.path.basename(script)], cwd=args.workdir, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = []
    for line in process.stdout:  # its step lines and errors, as they come
        print(f"  record: {line}", end="", flush=True)
        if match := RESULT.match(line.rstrip("\n")):
            results.append(match)
    if process.wait() != 0 or not results:
        print(f"anchor: the record's script failed (exit {process.returncode})", file=sys.stderr)
        return 1
    _, _, ms, peak_mib = results[-1].groups()
    print(f"anchor: {float(ms):.2f} ms per step, peak allocated {int(peak_mib) / 1024:.2f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
