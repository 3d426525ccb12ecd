"""The r-parameterization study: every run it made, as named waves, and the tables of its README.

    python records/2026-11-30_parallax-r-study/study.py run sweep --data DIR --gpus 0,1 --until $(($(date +%s) + 540))
    python records/2026-11-30_parallax-r-study/study.py table records/2026-11-30_parallax-r-study/logs

`run` starts each run of a wave as its own `train_gpt.py` process (the proxy configuration below plus
the arm's settings), several per GPU at a time, from the repository root, so logs land in logs/. Runs
start in the order listed; a run that cannot finish before --until is not started, and one still
going then is stopped (its log stays, marked incomplete by records/compare.py).

`table` prints, per wave and arm, the final validation losses, their mean and standard deviation,
Welch's test against the wave's softmax arm, and for the confirmation the steps and time each arm
needs to reach softmax's final loss. The winner of the sweep is chosen by the rule fixed before any
run: the drop-in Parallax arm at attn_scale 0.12 with the lowest mean final loss over seeds 0-1.
"""
import argparse
import glob
import math
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
from compare import parse_log, welch_t_test  # noqa: E402  (records/compare.py)

# The proxy of the 2026-11-22 study: 6 layers of width 384, 3 heads of 128, 400 steps of 16K tokens, eager.
PROXY = dict(NUM_LAYERS=6, MODEL_DIM=384, NUM_HEADS=3, HEAD_DIM=128, SEQ_LEN=16384, MICRO_BATCHES=1,
             NUM_ITERATIONS=400, VAL_EVERY=50, VAL_TOKENS=1048576, WINDOW_SCHEDULE="384,768", COMPILE=0)
AUTHORS = dict(ATTENTION="parallax", R_GAIN="none")  # r = rotary(norm(W_r x)), u = r.k unscaled
HEAD0 = dict(ATTENTION="parallax", R_GAIN="head", R_GAIN_INIT=0.0)

ARMS = {  # name -> settings on top of PROXY
    "softmax": dict(ATTENTION="softmax"),
    "authors": AUTHORS,
    "head0": HEAD0,
    "channel0": dict(HEAD0, R_GAIN="channel"),
    "head0-gainlr0.01": dict(HEAD0, R_GAIN_LR=0.01),
    "head0-gainlr0.16": dict(HEAD0, R_GAIN_LR=0.16),
    "head0.1": dict(HEAD0, R_GAIN_INIT=0.1),
    "head0-norotary": dict(HEAD0, R_ROTARY=0),
    "head0-nonorm": dict(HEAD0, R_NORM=0),
    "head0-wr0.5": dict(HEAD0, R_LR_MULT=0.5),
    "head0-wr2": dict(HEAD0, R_LR_MULT=2.0),
    "softmax-scale0.15": dict(ATTENTION="softmax", ATTN_SCALE=0.15),
    "head0-scale0.15": dict(HEAD0, ATTN_SCALE=0.15),
    "head0-pm": dict(HEAD0, PARAM_MATCHED=1),
}
SWEEP_ARMS = tuple(ARMS)  # the arms above; the AdamW and FP8 arms below are not the sweep's
SWEEP_CANDIDATES = ["head0", "channel0", "head0-gainlr0.01", "head0-gainlr0.16", "head0.1", "head0-norotary",
                    "head0-nonorm", "head0-wr0.5", "head0-wr2"]
WINNER = "head0"  # what the fixed rule chose from the sweep (`table` prints it)
ADAMW_RATES = (0.0018, 0.0054, 0.0162)  # the 2026-11-22 study's rate, x3, x9
ADAMW_LOW_RATE = 0.0006  # fixed after the three above ran (the lowest was the best for both arms); not yet run
for _rate in ADAMW_RATES + (ADAMW_LOW_RATE,):
    ARMS[f"softmax-adamw{_rate}"] = dict(ATTENTION="softmax", OPTIMIZER="adamw", ADAMW_LR=_rate)
    ARMS[f"{WINNER}-adamw{_rate}"] = dict(ARMS[WINNER], OPTIMIZER="adamw", ADAMW_LR=_rate)
for _arm in ("softmax", WINNER):
    ARMS[f"{_arm}-fp8"] = dict(ARMS[_arm], LM_HEAD_FP8=1)

# name -> (settings on top of each arm's, [(arm, seed)] in launch order). Wave names have no "-".
WAVES = {
    "sweep": ({}, [(arm, seed) for arm in SWEEP_ARMS for seed in (0, 1)]),
    # fresh seeds, never used in the sweep; the authors' r stays as an arm
    "confirm": ({}, [(arm, seed) for seed in (2, 3, 4, 5) for arm in ("softmax", WINNER, "authors", f"{WINNER}-pm")]),
    # a second confirmation, fixed before any of its runs: eight more fresh seeds (6-13) of softmax and the
    # winner, tested on their own (Welch, p < 0.05), never pooled with "confirm"
    "confirm2": ({}, [(arm, seed) for seed in range(6, 14) for arm in ("softmax", WINNER)]),
    # the second corpus, untuned: the winner as chosen on devdocs
    "corpus2": (dict(CORPUS="corpus2"), [(arm, seed) for seed in (0, 1, 2) for arm in ("softmax", WINNER)]),
    "adamw": ({}, [(f"{attention}-adamw{rate}", 0) for rate in ADAMW_RATES for attention in ("softmax", WINNER)]),
    "adamw2": ({}, [(f"{attention}-adamw{ADAMW_LOW_RATE}", 0) for attention in ("softmax", WINNER)]),
    # the longer horizon: 1000 steps (16.4M of devdocs' 22M train tokens); compiled, to fit the GPU time
    "horizon": (dict(NUM_ITERATIONS=1000, VAL_EVERY=100, COMPILE=1),
                [(arm, seed) for seed in (0, 1) for arm in ("softmax", WINNER)]),
    # the 12 x 768 model (the speedrun's width and depth) at a short horizon, compiled
    "wide": (dict(NUM_LAYERS=12, MODEL_DIM=768, NUM_HEADS=6, NUM_ITERATIONS=200, COMPILE=1),
             [(arm, seed) for seed in (0, 1) for arm in ("softmax", WINNER)]),
    # the FP8 LM head (LM_HEAD_FP8): what it does to the loss at the proxy (results: records/2026-11-30_fp8-head-h200)
    "fp8": ({}, [(arm, seed) for seed in (0, 1) for arm in ("softmax", "softmax-fp8", WINNER, f"{WINNER}-fp8")]),
    # compiled, one run at a time on its GPU, at the final window: the step times for time-to-target
    "steptime": (dict(COMPILE=1, NUM_ITERATIONS=100, VAL_EVERY=0, VAL_TOKENS=16384, WINDOW_SCHEDULE="768"),
                 [(arm, 0) for arm in ("softmax", WINNER, f"{WINNER}-pm")]),
}


def run_name(wave, arm, seed):
    return f"{wave}-{arm}-s{seed}"


def run_waves(waves, data, gpus, per_gpu, until, expected_s, skip=0):
    """Launch the waves' runs (but the first `skip`) per_gpu at a time on each GPU id in gpus until `until`."""
    start = time.time()
    os.makedirs(os.path.join(ROOT, "logs"), exist_ok=True)
    pending = [(wave, arm, seed) for wave in waves for arm, seed in WAVES[wave][1]][skip:]
    running = {}  # slot (gpu, index) -> (Popen, name)
    slots = [(gpu, i) for i in range(per_gpu) for gpu in gpus]
    while pending or running:
        for slot, (proc, name) in list(running.items()):
            if proc.poll() is not None:
                print(f"[{time.time() - start:5.0f}s] done {name} (exit {proc.returncode})", flush=True)
                del running[slot]
        left = until - time.time()
        for slot in slots:
            if slot in running or not pending:
                continue
            if left < expected_s:
                print(f"[{time.time() - start:5.0f}s] not started (too little time left): "
                      f"{', '.join(run_name(*job) for job in pending)}", flush=True)
                pending = []
                break
            wave, arm, seed = pending.pop(0)
            name = run_name(wave, arm, seed)
            settings = {**PROXY, **ARMS[arm], **WAVES[wave][0]}
            corpus = settings.pop("CORPUS", "devdocs")
            env = dict(os.environ, **{k: str(v) for k, v in settings.items()},
                       TRAIN_FILES=os.path.join(data, corpus, f"{corpus}_train_*.bin"),
                       VAL_FILES=os.path.join(data, corpus, f"{corpus}_val_*.bin"), SEED=str(seed), RUN_NAME=name,
                       CUDA_VISIBLE_DEVICES=str(slot[0]))
            out = open(os.path.join(ROOT, "logs", f"{name}.out"), "w")
            running[slot] = (subprocess.Popen([sys.executable, "train_gpt.py"], cwd=ROOT, env=env, stdout=out,
                                              stderr=subprocess.STDOUT), name)
            print(f"[{time.time() - start:5.0f}s] started {name} on GPU {slot[0]}", flush=True)
        if left <= 0:
            for proc, name in running.values():
                proc.kill()
                print(f"[{time.time() - start:5.0f}s] stopped at the deadline: {name}", flush=True)
            break
        time.sleep(2)


def arm_of(run):
    """(wave, arm) from a run name wave-arm-sSEED."""
    wave, rest = run["run_name"].split("-", 1)
    return wave, rest.rsplit("-s", 1)[0]


def mean_std(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, std


def table(log_dirs):
    """The waves' tables from the logs directly in log_dirs (logs/earlier and logs/hung, below them, hold
    superseded and stalled runs)."""
    by_arm = {}
    logs = [path for log_dir in log_dirs for path in sorted(glob.glob(os.path.join(log_dir, "*.txt")))]
    for run in map(parse_log, logs):
        if run["status"] == "complete":
            by_arm.setdefault(arm_of(run), []).append(run)
    for wave in dict.fromkeys(w for w, _ in by_arm):
        arms = {arm: runs for (w, arm), runs in by_arm.items() if w == wave}
        baseline = [r["final_val_loss"] for r in arms.get("softmax", [])]
        print(f"\n## {wave}\n\n| arm | seeds | final val loss | mean | std | vs softmax | p (Welch) |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
        for arm, runs in sorted(arms.items(), key=lambda item: mean_std([r["final_val_loss"] for r in item[1]])[0]):
            runs.sort(key=lambda r: r["seed"])
            losses = [r["final_val_loss"] for r in runs]
            mean, std = mean_std(losses)
            diff = p = ""
            if arm != "softmax" and len(baseline) >= 2 and len(losses) >= 2:
                diff, p = f"{mean - mean_std(baseline)[0]:+.4f}", f"{welch_t_test(losses, baseline)[2]:.3g}"
            print(f"| {arm} | {','.join(str(r['seed']) for r in runs)} | {' '.join(f'{x:.4f}' for x in losses)} "
                  f"| {mean:.4f} | {std:.4f} | {diff} | {p} |")
        if baseline:
            print_steps_to_target(arms, mean_std(baseline)[0])
        candidates = {arm: mean_std([r["final_val_loss"] for r in runs])[0] for arm, runs in arms.items()
                      if arm in SWEEP_CANDIDATES}
        if wave == "sweep" and candidates:
            print(f"\nwinner by the fixed rule: {min(candidates, key=candidates.get)}")
    print_equal_time(log_dirs, {arm: runs for (wave, arm), runs in by_arm.items() if wave == "confirm"})


def mean_curve(runs):
    """[(step, mean val loss)] over the steps every run validated at."""
    steps = sorted(set.intersection(*({step for step, _ in run["val"]} for run in runs)))
    return [(step, sum(dict(run["val"])[step] for run in runs) / len(runs)) for step in steps]


def steps_to(curve, target):
    """The first step at which the curve reaches target, interpolated linearly between validations."""
    for (step0, loss0), (step1, loss1) in zip(curve, curve[1:]):
        if loss1 <= target:
            return step0 + (step1 - step0) * (loss0 - target) / (loss0 - loss1) if loss0 > target else step0
    return None


def print_steps_to_target(arms, target):
    print(f"\nsteps to softmax's mean final loss {target:.4f} (mean curves, interpolated between validations):")
    for arm, runs in sorted(arms.items()):
        reached = steps_to(mean_curve(runs), target)
        print(f"  {arm}: {'not reached' if reached is None else f'{reached:.0f}'}")


STEP_TIME_LINE = re.compile(r"^step:(\d+)/\d+ train_loss:\S+ train_time:(\d+)ms")
STEADY_FROM = 10  # the first steps run slower (allocator, clocks): step time over the steps after this one


def steady_step_ms(path):
    """ms per step of a run log or its console output, from its train_time after step STEADY_FROM to
    its last step, or None when it has no steps past STEADY_FROM."""
    times = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if match := STEP_TIME_LINE.match(line):
                times[int(match[1])] = float(match[2])
    last = max(times, default=0)
    if STEADY_FROM not in times or last <= STEADY_FROM:
        return None
    return (times[last] - times[STEADY_FROM]) / (last - STEADY_FROM)


def print_equal_time(log_dirs, confirm):
    """The steptime wave's step times (a run's console output .out where its .txt log is missing), and
    with the steps to softmax's final loss of the confirmation's runs (confirm: arm -> runs), each arm's
    time to it."""
    logs = {}
    for log_dir in log_dirs:
        for path in sorted(glob.glob(os.path.join(log_dir, "steptime-*-s0.out")) +
                           glob.glob(os.path.join(log_dir, "steptime-*-s0.txt"))):
            logs[os.path.basename(path)[len("steptime-"):-len("-s0.txt")]] = path  # a .txt replaces the .out
    times = {arm: ms for arm, path in logs.items() if (ms := steady_step_ms(path)) is not None}
    if "softmax" not in times or "softmax" not in confirm:
        return
    target = mean_std([r["final_val_loss"] for r in confirm["softmax"]])[0]
    steps = {arm: steps_to(mean_curve(runs), target) for arm, runs in confirm.items()}
    print(f"\n## equal time (compiled, one run at a time, ms per step after step {STEADY_FROM}; steps to "
          f"softmax's final loss {target:.4f} from the confirmation)\n")
    print("| arm | ms/step | x softmax | steps to target | time to target (s) | x softmax | break-even steps |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base_steps = confirm["softmax"][0]["num_iterations"]
    steps["softmax"] = base_steps  # softmax reaches its own final loss at its last step, by definition
    for arm, ms in sorted(times.items(), key=lambda item: item[1]):
        ratio = ms / times["softmax"]
        reached = steps.get(arm)
        time_s = "" if reached is None else f"{reached * ms / 1e3:.2f}"
        time_ratio = "" if reached is None else f"{reached * ms / (base_steps * times['softmax']):.3f}"
        print(f"| {arm} | {ms:.2f} | {ratio:.3f} | {'' if reached is None else f'{reached:.0f}'} | {time_s} "
              f"| {time_ratio} | {base_steps / ratio:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="launch the runs of some waves, in order")
    run.add_argument("waves", nargs="+", choices=sorted(WAVES))
    run.add_argument("--data", required=True, help="folder holding devdocs/devdocs_*.bin and corpus2/corpus2_*.bin")
    run.add_argument("--gpus", default="0", help="comma-separated GPU ids")
    run.add_argument("--per-gpu", type=int, default=7, help="runs at a time on one GPU (8 ran out of memory)")
    run.add_argument("--until", type=float, required=True, help="Unix time: start nothing that would end later")
    run.add_argument("--expected", type=float, default=240, help="seconds one run takes, to decide what to start")
    run.add_argument("--skip", type=int, default=0, help="leave out the first runs (made in an earlier call)")
    show = commands.add_parser("table", help="the README's tables from logs")
    show.add_argument("log_dirs", nargs="+")
    args = parser.parse_args()
    if args.command == "run":
        run_waves(args.waves, args.data, [int(g) for g in args.gpus.split(",")], args.per_gpu, args.until,
                  args.expected, args.skip)
    else:
        table(args.log_dirs)


if __name__ == "__main__":
    main()
