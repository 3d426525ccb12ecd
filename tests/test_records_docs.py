"""The READMEs quote the records' logs and compare.py's output: the quoted numbers are checked here
against the logs themselves, read with compare.py."""
import glob
import os
import re

import pytest

from records import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPTIME = os.path.join(ROOT, "records", "2026-11-22_steptime-h100")
PROXY = os.path.join(ROOT, "records", "2026-11-22_parallax-vs-softmax-devdocs")


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_step_time_table_quotes_the_logs_in_gib():
    """README.md's step-time table: ms/step and peak allocated memory (GiB = MiB / 1024) of each log."""
    runs = {os.path.basename(path): compare.parse_log(path) for path in compare.find_logs([STEPTIME])}
    arms = {"softmax, FlexAttention": "steptime-softmax-pm0.txt",
            "Parallax, parameter-matched": "steptime-parallax-pm1.txt",
            "Parallax, drop-in": "steptime-parallax-pm0.txt"}
    readme = read("README.md")
    for arm, log in arms.items():
        row = re.search(rf"^\| {re.escape(arm)} \| ([\d.]+) ms \|.*\| ([\d.]+) (\w+) \|$", readme, re.M)
        assert row, arm
        step_ms, memory, unit = float(row[1]), float(row[2]), row[3]
        assert step_ms == round(runs[log]["step_avg_ms"], 1)
        assert unit == "GiB" and memory == round(runs[log]["peak_allocated_mib"] / 1024, 1), (arm, memory, unit)


def groups_of(folder):
    runs = [compare.parse_log(path) for path in compare.find_logs([folder])]
    groups = compare.group_runs([run for run in runs if run["status"] == "complete"])
    return {tuple(sorted((k, str(v)) for k, v in g["hyperparameters"].items()
                         if k in ("attention", "optimizer", "param_matched"))): g for g in groups}


def test_proxy_study_differences_are_welch_on_the_logs():
    """Every row of the proxy study's difference table is Welch's test on the logs' final losses,
    to the digits it prints."""
    groups = groups_of(os.path.join(PROXY, "logs"))

    def losses(attention, optimizer, matched):
        key = (("attention", attention), ("optimizer", optimizer), ("param_matched", str(matched)))
        return [run["final_val_loss"] for run in groups[key]["runs"]]

    rows = {"drop-in vs softmax, Muon": (losses("parallax", "muon", False), losses("softmax", "muon", False)),
            "param-matched vs softmax, Muon": (losses("parallax", "muon", True), losses("softmax", "muon", False)),
            "drop-in vs param-matched, Muon": (losses("parallax", "muon", False), losses("parallax", "muon", True)),
            "drop-in vs softmax, AdamW": (losses("parallax", "adamw", False), losses("softmax", "adamw", False))}
    readme = read("records", "2026-11-22_parallax-vs-softmax-devdocs", "README.md")
    for name, (a, b) in rows.items():
        row = re.search(rf"^\| {re.escape(name)} \| ([-+\d.]+) \| ([-\d.]+) \| ([\d.]+) \| ([\d.]+)", readme, re.M)
        assert row, name
        t, df, p = compare.welch_t_test(a, b)
        difference = sum(a) / len(a) - sum(b) / len(b)
        assert float(row[1]) == pytest.approx(difference, abs=1e-4)
        assert float(row[2]) == pytest.approx(t, abs=0.01) and float(row[3]) == pytest.approx(df, abs=0.05)
        assert float(row[4]) == pytest.approx(p, abs=0.005)


R_STUDY = os.path.join(ROOT, "records", "2026-11-30_parallax-r-study")


@pytest.mark.parametrize("wave, seeds, heading", [("confirm", (2, 3, 4, 5), "## Confirmation"),
                                                  ("confirm2", tuple(range(6, 14)), "## Second confirmation"),
                                                  ("corpus2", (0, 1, 2), "## Second corpus")])
def test_r_study_tables_quote_the_logs(wave, seeds, heading):
    """The r study's confirmation and second-corpus rows: each seed's final loss, the mean and std, the
    difference from softmax and Welch's p, recomputed from the logs."""
    # the logs directly in logs/, as study.py table reads them (logs/earlier and logs/hung are not the tables')
    runs = [compare.parse_log(path) for path in sorted(glob.glob(os.path.join(R_STUDY, "logs", "*.txt")))]
    losses = {}
    for run in runs:
        name_wave, rest = run["run_name"].split("-", 1)
        if name_wave == wave and run["status"] == "complete":
            losses.setdefault(rest.rsplit("-s", 1)[0], {})[run["seed"]] = run["final_val_loss"]
    readme = read("records", "2026-11-30_parallax-r-study", "README.md")
    section = readme[readme.index(heading):]
    softmax = [losses["softmax"][seed] for seed in seeds]
    for arm, by_seed in losses.items():
        row = re.search(rf"^\| {re.escape(arm)} \|(.*)$", section, re.M)
        assert row, arm
        cells = [cell.strip().strip("*") for cell in row[1].split("|")]
        values = [by_seed[seed] for seed in seeds]
        assert [float(c) for c in cells[:len(seeds)]] == values
        mean, std = cells[len(seeds)].split(" ± ")
        assert float(mean) == pytest.approx(sum(values) / len(values), abs=1e-4)
        assert float(std) == pytest.approx(compare._mean_and_variance(values, arm)[1] ** 0.5, abs=1e-4)
        if arm != "softmax":
            assert float(cells[len(seeds) + 1]) == pytest.approx(float(mean) - sum(softmax) / len(softmax), abs=1e-4)
            assert float(cells[len(seeds) + 2]) == pytest.approx(compare.welch_t_test(values, softmax)[2], abs=0.005)


STEP_RECORD = os.path.join(ROOT, "records", "2026-11-30_row-dots-in-dq-h200")


def test_record_size_step_table_quotes_the_bench_logs():
    """README.md's record-size step table: each arm's ms per step and peak memory as bench.anchor and
    bench.steptime printed them in one call (an arm timed twice: its first row), and its ratios to the anchor
    and to softmax recomputed."""
    logs = os.path.join(STEP_RECORD, "logs")
    anchor = re.search(r"^anchor: ([\d.]+) ms per step, peak allocated ([\d.]+) GiB$",
                       read(logs, "call4-devdocs-anchor.log"), re.M)
    steptime = read(logs, "call4-devdocs-row-dots-arms.log")
    arms = {}
    for name, ms, peak in re.findall(r"^(\S+) +[\d,]+ +([\d.]+) +[\d.]+ +([\d.]+) ", steptime, re.M):
        arms.setdefault(name, (float(ms), float(peak)))
    rows = {"anchor: modded-nanoGPT's record of 2025-01-16 on one GPU (`python -m bench.anchor`)":
            (float(anchor[1]), float(anchor[2])),
            "softmax": arms["softmax"], "Parallax parameter-matched": arms["parallax-pm"],
            "Parallax drop-in": arms["parallax"]}

    def ratio(ms, reference):
        return "1.00" if ms == reference else f"{ms / reference:.3f}"

    readme = read("README.md")
    for arm, (ms, peak) in rows.items():
        row = re.search(rf"^\| {re.escape(arm)} \| ([\d.]+) \| \**([\d.]+)\**[^|]*\|([^|]*)\| ([\d.]+) GiB \|",
                        readme, re.M)
        assert row, arm
        assert (float(row[1]), float(row[4])) == (ms, peak), arm
        assert row[2] == ratio(ms, float(anchor[1])), arm
        x_softmax = re.match(r"\**([\d.]*)", row[3].strip())[1]
        assert x_softmax == ("" if arm.startswith("anchor") else ratio(ms, arms["softmax"][0])), arm
