"""Compare training runs from their logs: a table per run, seed statistics per configuration.

    python records/compare.py logs/                          # every *.txt / *.log under logs/
    python records/compare.py records/2025-*/ --target 3.28 --plot curves.png

Runs whose hyperparameters agree on everything but the seed and run name form a group: its final
validation losses get a mean, a sample standard deviation and a one-sided one-sample t-test of
"mean < target" (the speedrun's bar for a record). Two groups that differ only in `attention` get
the difference of their means with Welch's two-sided t-test. Only runs that reached their last step
count; the others are listed as incomplete.

Log lines read (everything else, such as the code and version sections, is ignored):
    hyperparameters: {"run_name": ..., "attention": "parallax", "seed": 0, "num_iterations": 1750, ...}
    step:N/T val_loss:X train_time:Yms step_avg:Zms
    step:N/T train_loss:X train_time:Yms step_avg:Zms
    peak memory allocated: X MiB reserved: Y MiB
    stopped: <why the run stopped before its last step>
"""

import argparse
import json
import math
import os
import re
import sys

LOG_SUFFIXES = (".txt", ".log")
STEP_LINE = re.compile(r"^step:(\d+)/(\d+) (val_loss|train_loss):(\S+) train_time:(\S+)ms step_avg:(\S+)ms")
PEAK_MEMORY_LINE = re.compile(r"^peak memory allocated: (\S+) MiB reserved: (\S+) MiB")
HYPERPARAMETERS_PREFIX = "hyperparameters: "
STOPPED_PREFIX = "stopped: "
# hyperparameters that differ between the runs of one configuration: its seeds, and how each run was started
PER_RUN_KEYS = ("seed", "run_name", "resume", "overwrite")


# ----------------------------------------------------------------------------------------------
# Student's t distribution, from the regularized incomplete beta function (no scipy needed)

def _beta_continued_fraction(a, b, x, max_terms=500, rel_tol=1e-15):
    """Continued fraction of I_x(a, b) (its even/odd terms d_2m, d_2m+1), evaluated by modified Lentz."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, max_terms + 1):
        for term in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + term * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + term / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < rel_tol:
            return fraction
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a, b, x):
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0 <= x <= 1):
        raise ValueError(f"regularized_incomplete_beta needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x == 0 or x == 1:
        return float(x)
    log_prefactor = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The fraction converges fast for x below the mean of the beta distribution; use the symmetry beyond it.
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_prefactor) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_prefactor) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t, df):
    """P(T <= t) for Student's t with df > 0 degrees of freedom (df need not be an integer)."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(df / 2, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def _mean_and_variance(samples, name):
    samples = [float(s) for s in samples]
    if len(samples) < 2:
        raise ValueError(f"{name} needs at least 2 samples, got {len(samples)}")
    mean = sum(samples) / len(samples)
    return mean, sum((s - mean) ** 2 for s in samples) / (len(samples) - 1), len(samples)


def _t_statistic(difference, standard_error):
    if standard_error > 0:
        return difference / standard_error
    return math.copysign(math.inf, difference) if difference else math.nan  # constant samples


def t_test_one_sided(samples, target):
    """One-sample t-test of "mean < target": returns (t, p), p = P(T <= t) with n - 1 degrees of freedom."""
    mean, variance, n = _mean_and_variance(samples, "t_test_one_sided")
    t = _t_statistic(mean - target, math.sqrt(variance / n))
    return t, student_t_cdf(t, n - 1)


def welch_t_test(a, b):
    """Welch's t-test of mean(a) != mean(b): returns (t, df, p) with the two-sided p-value."""
    mean_a, var_a, n_a = _mean_and_variance(a, "welch_t_test")
    mean_b, var_b, n_b = _mean_and_variance(b, "welch_t_test")
    se2_a, se2_b = var_a / n_a, var_b / n_b
    t = _t_statistic(mean_a - mean_b, math.sqrt(se2_a + se2_b))
    if se2_a + se2_b == 0:  # both samples constant: no degrees of freedom to speak of
        return t, math.nan, 0.0 if math.isinf(t) else math.nan
    df = (se2_a + se2_b) ** 2 / (se2_a ** 2 / (n_a - 1) + se2_b ** 2 / (n_b - 1))
    return t, df, 2 * student_t_cdf(-abs(t), df)


# ----------------------------------------------------------------------------------------------
# Logs

def parse_log(path):
    """Read one run log. Returns a dict:

    path, hyperparameters (dict, or None when the log has no hyperparameters line), run_name,
    attention, optimizer, param_matched, seed (None when absent), val and train (lists of
    (step, loss)), num_iterations, last_step, train_time_ms and step_avg_ms (of the last step line),
    peak_allocated_mib, peak_reserved_mib, final_val_loss (the val loss at step num_iterations, None
    when the run did not get there) and status ("complete", "stopped: <why>", "incomplete: ...", or "not a
    run log").
    """
    run = {"path": path, "hyperparameters": None, "val": [], "train": [], "num_iterations": None, "last_step": None,
           "train_time_ms": None, "step_avg_ms": None, "peak_allocated_mib": None, "peak_reserved_mib": None}
    stopped = None  # the last "stopped:" line's reason
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(HYPERPARAMETERS_PREFIX) and run["hyperparameters"] is None:
                try:
                    hyperparameters = json.loads(line[len(HYPERPARAMETERS_PREFIX):])
                except ValueError:
                    continue
                if isinstance(hyperparameters, dict):
                    run["hyperparameters"] = hyperparameters
            elif match := STEP_LINE.match(line):
                try:
                    loss, train_time, step_avg = float(match[4]), float(match[5]), float(match[6])
                except ValueError:
                    continue
                step = int(match[1])
                run["val" if match[3] == "val_loss" else "train"].append((step, loss))
                run["num_iterations"], run["last_step"] = int(match[2]), step
                run["train_time_ms"], run["step_avg_ms"] = train_time, step_avg
            elif line.startswith(STOPPED_PREFIX):
                stopped = line[len(STOPPED_PREFIX):].strip()
            elif match := PEAK_MEMORY_LINE.match(line):
                try:
                    run["peak_allocated_mib"], run["peak_reserved_mib"] = float(match[1]), float(match[2])
                except ValueError:
                    continue
    hyperparameters = run["hyperparameters"] or {}
    for key in ("run_name", "attention", "optimizer", "param_matched", "seed"):
        run[key] = hyperparameters.get(key)
    if run["num_iterations"] is None:
        run["num_iterations"] = hyperparameters.get("num_iterations")
    last_val_step = run["val"][-1][0] if run["val"] else None
    reached_end = last_val_step is not None and last_val_step == run["num_iterations"]
    run["final_val_loss"] = run["val"][-1][1] if reached_end else None
    if run["hyperparameters"] is None:
        has_steps = run["val"] or run["train"]
        run["status"] = "incomplete: no hyperparameters line" if has_steps else "not a run log"
    elif not reached_end and stopped is not None:
        run["status"] = f"stopped: {stopped}"
    elif last_val_step is None:
        run["status"] = "incomplete: no val_loss line"
    elif not reached_end:
        run["status"] = f"incomplete: last val_loss at step {last_val_step}/{run['num_iterations']}"
    else:
        run["status"] = "complete"
    return run


def find_logs(paths):
    """The files given, and the *.txt / *.log files under the folders given (sorted), each once."""
    logs = []
    for path in paths:
        if os.path.isdir(path):
            logs += sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names
                           if name.endswith(LOG_SUFFIXES))
        elif os.path.isfile(path):
            logs.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    return list(dict.fromkeys(os.path.normpath(log) for log in logs))


def group_runs(runs, ignore=PER_RUN_KEYS):
    """Group runs whose hyperparameters agree except on the keys in `ignore`, in first-seen order.

    Returns a list of {"hyperparameters": the shared ones, "runs": [...]}; runs without hyperparameters
    are left out.
    """
    groups = {}
    for run in runs:
        if run["hyperparameters"] is None:
            continue
        shared = {k: v for k, v in run["hyperparameters"].items() if k not in ignore}
        key = json.dumps(shared, sort_keys=True)
        groups.setdefault(key, {"hyperparameters": shared, "runs": []})["runs"].append(run)
    return list(groups.values())


def differing_keys(a, b):
    missing = object()
    return {k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing)}


def group_labels(groups):
    """Name each group by the hyperparameters that tell the groups apart (attention first)."""
    varying = set()
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            varying |= differing_keys(a["hyperparameters"], b["hyperparameters"])
    keys = sorted(varying or {"attention"}, key=lambda k: (k != "attention", k))
    return [", ".join(f"{k}={g['hyperparameters'].get(k, '-')}" for k in keys) for g in groups]


def summarize_group(group, target):
    """n, mean and sample std of the final val losses, mean ms/step, and the t-test against target."""
    losses = [run["final_val_loss"] for run in group["runs"]]
    step_avgs = [run["step_avg_ms"] for run in group["runs"] if run["step_avg_ms"] is not None]
    mean, std, p = sum(losses) / len(losses), math.nan, math.nan
    if len(losses) >= 2:
        std = math.sqrt(_mean_and_variance(losses, "summarize_group")[1])
        p = t_test_one_sided(losses, target)[1]
    return {"n": len(losses), "mean": mean, "std": std, "p": p, "losses": losses,
            "ms_per_step": sum(step_avgs) / len(step_avgs) if step_avgs else math.nan}


def attention_pairs(groups):
    """Pairs (i, j) of groups that differ only in `attention`, a softmax baseline second."""
    pairs = []
    for i, a in enumerate(groups):
        for j in range(i + 1, len(groups)):
            if differing_keys(a["hyperparameters"], groups[j]["hyperparameters"]) == {"attention"}:
                pairs.append((j, i) if a["hyperparameters"].get("attention") == "softmax" else (i, j))
    return pairs


# ----------------------------------------------------------------------------------------------
# Output

def _fmt(value, spec):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) if spec else str(value)


def print_table(header, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header] + rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def plot_curves(groups, labels, path, target=None):
    """Val loss against step: one color per group, each seed a thin line, the group mean thick."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    late_losses = []  # the y range follows the later part of training, where the runs differ
    for index, (group, label) in enumerate(zip(groups, labels)):
        color = f"C{index % 10}"
        curves = [run["val"] for run in group["runs"]]
        for curve in curves:
            ax.plot([s for s, _ in curve], [l for _, l in curve], color=color, linewidth=0.7, alpha=0.5)
            late_losses += [l for s, l in curve if s >= 0.2 * curve[-1][0]]
        steps = [s for s, _ in curves[0]]
        if all([s for s, _ in curve] == steps for curve in curves):
            mean = [sum(curve[k][1] for curve in curves) / len(curves) for k in range(len(steps))]
            ax.plot(steps, mean, color=color, linewidth=2, label=f"{label} (n={len(curves)})")
        else:
            ax.plot([], [], color=color, linewidth=2, label=f"{label} (n={len(curves)})")
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target}")
    if late_losses:
        low, high = min(late_losses + ([target] if target is not None else [])), max(late_losses)
        margin = 0.05 * (high - low) or 0.05
        ax.set_ylim(low - margin, high + margin)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Compare speedrun logs: a table per run and seed statistics per configuration.")
    parser.add_argument("logs", nargs="+", help="log files, or folders searched for *.txt / *.log")
    parser.add_argument("--target", type=float, default=3.28, help="val loss to beat (default: 3.28)")
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY",
                        help="a hyperparameter that may differ within a group, besides seed and run_name (repeatable)")
    parser.add_argument("--plot", metavar="PNG", help="draw the val-loss curves of the complete runs to this file")
    args = parser.parse_args(argv)
    try:
        runs = [parse_log(path) for path in find_logs(args.logs)]
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    skipped = [run["path"] for run in runs if run["status"] == "not a run log"]
    runs = [run for run in runs if run["status"] != "not a run log"]
    if skipped:
        print(f"not run logs (skipped): {', '.join(skipped)}")
    if not runs:
        print("error: no run logs found", file=sys.stderr)
        return 1

    print_table(["file", "attention", "optimizer", "matched", "seed", "steps", "val_loss", "train_s", "ms/step",
                 "peak_MiB", "status"],
                [[run["path"], _fmt(run["attention"], ""), _fmt(run["optimizer"], ""), _fmt(run["param_matched"], ""),
                  _fmt(run["seed"], ""), f"{_fmt(run['last_step'], '')}/{_fmt(run['num_iterations'], '')}",
                  _fmt(run["final_val_loss"], ".4f"),
                  _fmt(run["train_time_ms"] / 1000 if run["train_time_ms"] is not None else None, ".1f"),
                  _fmt(run["step_avg_ms"], ".2f"), _fmt(run["peak_allocated_mib"], ".0f"), run["status"]]
                 for run in runs])

    groups = group_runs([run for run in runs if run["status"] == "complete"], PER_RUN_KEYS + tuple(args.ignore))
    if not groups:
        print("\nno complete runs to group")
        return 0
    labels = group_labels(groups)
    summaries = [summarize_group(group, args.target) for group in groups]
    print()
    print_table(["group", "n", "mean_val_loss", "std", "ms/step", f"p(mean<{args.target})"],
                [[label, s["n"], f"{s['mean']:.4f}", _fmt(s["std"], ".4f"), _fmt(s["ms_per_step"], ".2f"),
                  _fmt(s["p"], ".3g")] for label, s in zip(labels, summaries)])
    for i, j in attention_pairs(groups):
        a, b = summaries[i], summaries[j]
        line = (f"\n{groups[i]['hyperparameters'].get('attention')} - {groups[j]['hyperparameters'].get('attention')}: "
                f"mean val loss difference {a['mean'] - b['mean']:+.4f}")
        if a["n"] >= 2 and b["n"] >= 2:
            t, df, p = welch_t_test(a["losses"], b["losses"])
            line += f", Welch t = {t:.3f} (df {df:.1f}), two-sided p = {p:.3g}"
        else:
            line += " (a t-test needs at least 2 runs per group)"
        print(line + f"; ms/step {_fmt(a['ms_per_step'], '.2f')} vs {_fmt(b['ms_per_step'], '.2f')}")
    if args.plot:
        plot_curves(groups, labels, args.plot, args.target)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
