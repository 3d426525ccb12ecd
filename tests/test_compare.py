"""records/compare.py: log parsing, grouping, and statistics checked against independent values."""

import json
import math

import pytest

from records import compare

TARGET = 3.28


def write_log(path, hyperparameters, val_losses, num_iterations=1000, peak=(41000, 43000)):
    """A log in the training script's format; val_losses maps step -> loss. A code section comes first,
    holding lines that look like the real ones but must not be read."""
    lines = [
        "import torch",
        '    print0(f"hyperparameters: {json.dumps(asdict(args))}")',
        'hyperparameters: this line of the code section is not JSON',
        '    print0(f"step:{step}/{args.num_iterations} val_loss:{val_loss:.4f} train_time:{t:.0f}ms '
        'step_avg:{a:.2f}ms")',
        "=" * 100,
        "Running Python 3.12.3, PyTorch 2.11.0+cu130",
        f"hyperparameters: {json.dumps(hyperparameters)}",
    ]
    for step, loss in sorted(val_losses.items()):
        if step > 0:
            lines.append(f"step:{step}/{num_iterations} train_loss:{loss + 0.01:.4f} train_time:{step * 60}ms "
                         f"step_avg:60.00ms")
        lines.append(f"step:{step}/{num_iterations} val_loss:{loss:.4f} train_time:{step * 60}ms step_avg:60.00ms")
    if peak is not None:
        lines.append(f"peak memory allocated: {peak[0]} MiB reserved: {peak[1]} MiB")
    path.write_text("\n".join(lines) + "\n")
    return path


def hyper(attention="parallax", seed=0, optimizer="muon", **extra):
    return {"run_name": f"{attention}-{optimizer}-{seed}", "attention": attention, "optimizer": optimizer,
            "param_matched": True, "seed": seed, "num_iterations": 1000, "model_dim": 768, **extra}


def curve(final):
    return {0: 10.8258, 250: 4.5, 500: 3.8, 1000: final}


@pytest.fixture
def log_dir(tmp_path):
    """parallax/muon and softmax/muon: 2 seeds each; parallax/adamw: 4 seeds; plus broken files."""
    for seed, final in enumerate([3.270, 3.280]):
        write_log(tmp_path / f"parallax_muon_{seed}.txt", hyper("parallax", seed), curve(final))
    for seed, final in enumerate([3.290, 3.300]):
        write_log(tmp_path / f"softmax_muon_{seed}.txt", hyper("softmax", seed), curve(final))
    for seed, final in enumerate([3.270, 3.275, 3.280, 3.265]):
        write_log(tmp_path / f"parallax_adamw_{seed}.txt", hyper("parallax", seed, "adamw"), curve(final))
    write_log(tmp_path / "crashed.txt", hyper("parallax", 7), {}, peak=None)
    write_log(tmp_path / "stopped.txt", hyper("parallax", 8), {0: 10.8, 500: 3.8})
    (tmp_path / "notes.txt").write_text("not a log\n")
    return tmp_path


# ---- the t distribution against closed forms and tabulated quantiles ----

@pytest.mark.parametrize("t", [-30.0, -2.5, -1.0, -0.1, 0.0, 0.3, 1.0, 4.0, 100.0])
def test_student_t_cdf_closed_forms(t):
    assert compare.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)  # Cauchy
    assert compare.student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    theta = math.atan(t / math.sqrt(3))
    assert compare.student_t_cdf(t, 3) == pytest.approx(0.5 + (theta + math.sin(theta) * math.cos(theta)) / math.pi,
                                                        abs=1e-13)


@pytest.mark.parametrize("quantile, df, probability", [
    (2.228138851986274, 10, 0.975),   # tables: 2.228
    (2.1318467863266495, 4, 0.95),    # 2.132
    (2.0422724563012378, 30, 0.975),  # 2.042
    (3.4994832973504924, 7, 0.995),   # 3.499
])
def test_student_t_cdf_quantiles(quantile, df, probability):
    assert compare.student_t_cdf(quantile, df) == pytest.approx(probability, abs=1e-9)
    assert compare.student_t_cdf(-quantile, df) == pytest.approx(1 - probability, abs=1e-9)


def test_student_t_cdf_fractional_df_and_limits():
    # df = 2.5 and 5.5 arise in Welch's test; the values were computed once with scipy.stats.t.cdf.
    assert compare.student_t_cdf(0.7, 2.5) == pytest.approx(0.728297528405226, abs=1e-10)
    assert compare.student_t_cdf(-1.5, 5.5) == pytest.approx(0.0943384844535493, abs=1e-10)
    assert compare.student_t_cdf(math.inf, 3) == 1.0 and compare.student_t_cdf(-math.inf, 3) == 0.0
    assert math.isnan(compare.student_t_cdf(math.nan, 3))
    # the normal limit: at df = 1e8, t and normal quantiles differ by about (z**3 + z) / (4 df)
    assert compare.student_t_cdf(1.959963984540054, 1e8) == pytest.approx(0.975, abs=1e-8)
    with pytest.raises(ValueError):
        compare.regularized_incomplete_beta(1.0, 0.5, 1.5)


def test_student_t_cdf_matches_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in (0.5, 1.3, 3, 7.7, 25, 400):
        for t in (-12.0, -3.1, -0.4, 0.05, 1.7, 6.0):
            assert compare.student_t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), rel=1e-9, abs=1e-14)


def test_t_tests_exact_values():
    # n = 2: mean 3.275, s = 0.005 * sqrt(2), so t = -0.005 / 0.005 = -1 with 1 df: p = 1/4 exactly.
    t, p = compare.t_test_one_sided([3.270, 3.280], TARGET)
    assert t == pytest.approx(-1.0, abs=1e-9) and p == pytest.approx(0.25, abs=1e-9)
    # Equal n = 2 and equal variances: Welch's df is 2 and t = -0.02 / sqrt(5e-5) = -2 sqrt(2);
    # two-sided p = 2 * (1/2 - sqrt(8) / (2 sqrt(10))) = 1 - 2 / sqrt(5).
    t, df, p = compare.welch_t_test([3.270, 3.280], [3.290, 3.300])
    assert t == pytest.approx(-2 * math.sqrt(2), abs=1e-7)
    assert df == pytest.approx(2.0, abs=1e-9)
    assert p == pytest.approx(1 - 2 / math.sqrt(5), abs=1e-7)
    # Unequal sizes and variances: df from the Welch-Satterthwaite formula by hand.
    a, b = [1.0, 2.0, 4.0], [0.0, 0.5]
    var_a, var_b = 7 / 3, 0.125
    se2 = var_a / 3 + var_b / 2
    t, df, p = compare.welch_t_test(a, b)
    assert t == pytest.approx((7 / 3 - 0.25) / math.sqrt(se2), abs=1e-12)
    assert df == pytest.approx(se2 ** 2 / ((var_a / 3) ** 2 / 2 + (var_b / 2) ** 2 / 1), abs=1e-12)
    assert p == pytest.approx(2 * compare.student_t_cdf(-t, df), abs=1e-12)
    with pytest.raises(ValueError):
        compare.t_test_one_sided([3.27], TARGET)


def test_constant_samples():
    assert compare.t_test_one_sided([3.2, 3.2], TARGET) == (-math.inf, 0.0)
    assert compare.t_test_one_sided([3.3, 3.3], TARGET) == (math.inf, 1.0)
    t, df, p = compare.welch_t_test([1.0, 1.0], [2.0, 2.0])
    assert t == -math.inf and p == 0.0


# ---- logs ----

def test_parse_log_reads_the_run_lines_only(log_dir):
    run = compare.parse_log(log_dir / "parallax_muon_1.txt")
    assert run["hyperparameters"] == hyper("parallax", 1)
    assert (run["attention"], run["optimizer"], run["param_matched"], run["seed"]) == ("parallax", "muon", True, 1)
    assert run["val"] == [(0, 10.8258), (250, 4.5), (500, 3.8), (1000, 3.28)]
    assert [step for step, _ in run["train"]] == [250, 500, 1000]
    assert run["final_val_loss"] == 3.28 and run["status"] == "complete"
    assert (run["num_iterations"], run["last_step"]) == (1000, 1000)
    assert (run["train_time_ms"], run["step_avg_ms"]) == (60000.0, 60.0)
    assert (run["peak_allocated_mib"], run["peak_reserved_mib"]) == (41000.0, 43000.0)


def test_parse_log_incomplete_runs(log_dir):
    crashed = compare.parse_log(log_dir / "crashed.txt")
    assert crashed["final_val_loss"] is None and crashed["status"] == "incomplete: no val_loss line"
    assert crashed["num_iterations"] == 1000 and crashed["peak_allocated_mib"] is None
    stopped = compare.parse_log(log_dir / "stopped.txt")
    assert stopped["final_val_loss"] is None and stopped["status"] == "incomplete: last val_loss at step 500/1000"
    assert compare.parse_log(log_dir / "notes.txt")["status"] == "not a run log"


def test_group_runs_by_everything_but_seed(log_dir):
    runs = [compare.parse_log(path) for path in compare.find_logs([str(log_dir)])]
    complete = [run for run in runs if run["status"] == "complete"]
    groups = compare.group_runs(complete)
    by_config = {(g["hyperparameters"]["attention"], g["hyperparameters"]["optimizer"]): g for g in groups}
    assert sorted(by_config) == [("parallax", "adamw"), ("parallax", "muon"), ("softmax", "muon")]
    assert sorted(run["seed"] for run in by_config["parallax", "adamw"]["runs"]) == [0, 1, 2, 3]
    assert all("seed" not in g["hyperparameters"] and "run_name" not in g["hyperparameters"] for g in groups)

    # A different width is a different configuration, unless told to ignore it.
    other_width = dict(complete[0], hyperparameters=dict(complete[0]["hyperparameters"], model_dim=1024))
    assert len(compare.group_runs(complete + [other_width])) == 4
    assert len(compare.group_runs(complete + [other_width], compare.PER_RUN_KEYS + ("model_dim",))) == 3

    pairs = compare.attention_pairs(groups)
    assert [(groups[i]["hyperparameters"]["attention"], groups[j]["hyperparameters"]["attention"],
             groups[i]["hyperparameters"]["optimizer"]) for i, j in pairs] == [("parallax", "softmax", "muon")]


def test_group_statistics(log_dir):
    runs = [compare.parse_log(log_dir / f"parallax_adamw_{seed}.txt") for seed in range(4)]
    summary = compare.summarize_group(compare.group_runs(runs)[0], TARGET)
    # losses 3.270, 3.275, 3.280, 3.265: deviations from 3.2725 are -/+0.0025, +/-0.0075
    assert summary["n"] == 4
    assert summary["mean"] == pytest.approx(3.2725, abs=1e-12)
    std = math.sqrt((2 * 0.0025 ** 2 + 2 * 0.0075 ** 2) / 3)
    assert summary["std"] == pytest.approx(std, abs=1e-12)
    assert summary["ms_per_step"] == 60.0
    t = (3.2725 - TARGET) / (std / 2)
    theta = math.atan(t / math.sqrt(3))  # Student's t CDF with 3 df in closed form
    assert summary["p"] == pytest.approx(0.5 + (theta + math.sin(theta) * math.cos(theta)) / math.pi, abs=1e-12)
    single = compare.summarize_group(compare.group_runs(runs[:1])[0], TARGET)
    assert single["n"] == 1 and math.isnan(single["std"]) and math.isnan(single["p"])


def test_main_prints_tables_and_plots(log_dir, tmp_path, capsys):
    png = tmp_path / "curves.png"
    assert compare.main([str(log_dir), "--target", str(TARGET), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "not run logs (skipped):" in out and "notes.txt" in out
    assert "incomplete: no val_loss line" in out and "incomplete: last val_loss at step 500/1000" in out
    # the groups differ in attention and optimizer, so both name them; then n, mean, std, ms/step, p
    groups = {" ".join(line.split()[:2]): line.split()[2:]
              for line in out.splitlines() if line.startswith("attention=")}
    assert groups["attention=parallax, optimizer=muon"] == ["2", "3.2750", "0.0071", "60.00", "0.25"]
    assert groups["attention=softmax, optimizer=muon"][:3] == ["2", "3.2950", "0.0071"]
    assert groups["attention=parallax, optimizer=adamw"][:2] == ["4", "3.2725"]
    assert "parallax - softmax: mean val loss difference -0.0200, Welch t = -2.828 (df 2.0), two-sided p = 0.106" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_with_only_incomplete_logs(log_dir, capsys):
    assert compare.main([str(log_dir / "crashed.txt")]) == 0
    assert "no complete runs to group" in capsys.readouterr().out
    assert compare.main([str(log_dir / "missing.txt")]) == 1
    assert compare.main([str(log_dir / "notes.txt")]) == 1
