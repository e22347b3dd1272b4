"""report: metrics.jsonl parsing and its errors, the PNG, the two tables (hand-computed values), the CLI."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from acim_fast.report import PANELS, compare_table, line_styles, main, plot, read_metrics, series, summary_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def make_run(algo: str, seed: int, pass_at_1: list, sel=None) -> list[dict]:
    """Records for iterations 0..n-1; iteration 0 has no estep/mstep keys, like the trainer's."""
    records = []
    for i, acc in enumerate(pass_at_1):
        r = {"iteration": i, "algo": algo, "seed": seed, "time_s": 10.0 * i, "eval/pass_at_1": acc,
             "eval/code_use_rate": 0.5, "eval/selection_accuracy": None if sel is None else sel[i]}
        if i > 0:
            r.update({"estep/reward_mean": 0.1 * i, "mstep/loss": 0.5 / i, "mstep/clip_frac": 0.01 * i,
                      "estep/rollouts": 64, "mstep/steps": 4})
        records.append(r)
    return records


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# -- read_metrics --

def test_read_metrics_parses_lines_in_order_and_skips_blank_lines(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iteration": 0, "eval/pass_at_1": 0.25, "x": [1]}\n\n'
                                       '{"iteration": 1, "eval/pass_at_1": null}\n')
    assert read_metrics(run) == [{"iteration": 0, "eval/pass_at_1": 0.25, "x": [1]},
                                 {"iteration": 1, "eval/pass_at_1": None}]


@pytest.mark.parametrize("content, line, what", [
    ('{"iteration": 0}\n{"iteration": 1,\n', 2, "invalid JSON"),
    ('{"iteration": 0}\n\n[1, 2]\n', 3, "expected a JSON object"),
    ('{"algo": "em"}\n', 1, "'iteration' must be an int"),
    ('{"iteration": 0}\n{"iteration": "1"}\n', 2, "'iteration' must be an int"),
    ('{"iteration": 1.0}\n', 1, "'iteration' must be an int"),
    ('{"iteration": true}\n', 1, "'iteration' must be an int"),
])
def test_read_metrics_names_file_and_line_of_a_bad_line(tmp_path, content, line, what):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(ValueError) as info:
        read_metrics(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'metrics.jsonl'}:{line}: {what}")


@pytest.mark.parametrize("content", [None, "", "\n  \n"])
def test_read_metrics_rejects_a_missing_or_empty_file_naming_it(tmp_path, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(ValueError, match="metrics.jsonl: (no such file|empty)") as info:
        read_metrics(tmp_path)
    assert str(tmp_path / "metrics.jsonl") in str(info.value)


# -- plot --

def test_panels_are_the_six_in_order():
    assert [p.key for p in PANELS] == ["eval/pass_at_1", "eval/code_use_rate", "eval/selection_accuracy",
                                       "estep/reward_mean", "mstep/loss", "mstep/clip_frac"]
    assert [p.ylim for p in PANELS] == [(0, 1), (0, 1), (0, 1), None, None, None]


def test_series_skips_missing_null_and_non_finite_values_and_keeps_the_last_of_a_repeated_iteration():
    records = [{"iteration": 0}, {"iteration": 2, "k": 0.5}, {"iteration": 1, "k": None},
               {"iteration": 3, "k": float("nan")}, {"iteration": 4, "k": 0}, {"iteration": 2, "k": 0.75}]
    assert series(records, "k") == ([2, 4], [0.75, 0.0])


def test_line_styles_one_colour_per_algo_one_style_per_seed():
    runs = {"em seed 0": make_run("em", 0, [0.1]), "grpo seed 0": make_run("grpo", 0, [0.1]),
            "em seed 1": make_run("em", 1, [0.1]), "grpo seed 1": make_run("grpo", 1, [0.1]),
            "mystery": [{"iteration": 0}]}
    styles = line_styles(runs)
    assert styles["em seed 0"] == ("tab:blue", "-") and styles["em seed 1"] == ("tab:blue", "--")
    assert styles["grpo seed 0"] == ("tab:orange", "-") and styles["grpo seed 1"] == ("tab:orange", "--")
    assert styles["mystery"][0] not in ("tab:blue", "tab:orange")


def test_plot_one_run_writes_a_png_and_no_temporary(tmp_path):
    out = plot({"em seed 0": make_run("em", 0, [0.1, 0.3, 0.4], sel=[0.5, 0.6, 0.7])}, tmp_path / "report.png")
    assert out == tmp_path / "report.png"
    assert png_size(out) == (1500, 800) and out.stat().st_size > 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]


def test_plot_two_algos_two_seeds_with_missing_values(tmp_path):
    em0 = make_run("em", 0, [0.1, 0.3, None, 0.5], sel=[0.5, None, 0.6, 0.7])
    del em0[2]["eval/code_use_rate"]
    runs = {"em seed 0": em0, "em seed 1": make_run("em", 1, [0.2, 0.4]),
            "grpo seed 0": make_run("grpo", 0, [0.1, 0.2, 0.25]),  # selection accuracy null throughout
            "grpo seed 1": make_run("grpo", 1, [0.15, 0.2, 0.3])}
    out = plot(runs, tmp_path / "compare.png")
    assert png_size(out) == (1500, 800) and out.stat().st_size > 20_000


def test_importing_report_does_not_import_matplotlib():
    code = "import sys, acim_fast.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- tables --

def test_summary_table_one_row_per_iteration_with_dashes_for_missing():
    records = [{"iteration": 0, "eval/pass_at_1": 0.25, "eval/code_use_rate": 0.5, "eval/selection_accuracy": None,
                "time_s": 3.0},
               {"iteration": 1, "eval/pass_at_1": 0.375, "eval/code_use_rate": 0.625, "eval/selection_accuracy": 0.8,
                "estep/reward_mean": 0.4, "mstep/loss": 0.01234, "mstep/clip_frac": 0.05, "time_s": 65.25}]
    lines = summary_table(records).splitlines()
    assert lines[0].split() == ["iter", "pass@1", "code", "use", "sel", "acc", "reward", "loss", "clip", "frac",
                                "time", "(s)"]
    assert set(lines[1]) == {"-", " "} and len(lines) == 4
    assert lines[2].split() == ["0", "0.250", "0.500", "-", "-", "-", "-", "3.0"]
    assert lines[3].split() == ["1", "0.375", "0.625", "0.800", "0.400", "0.01234", "0.050", "65.2"]
    # Fixed width: every row as long as the header's columns need.
    assert len({len(line) for line in lines}) == 1


def rows_of(table: str) -> dict[tuple[str, str], list[str]]:
    """(algo, iter) -> the other cells, split at two or more spaces (cells hold single spaces)."""
    import re
    rows = {}
    for line in table.splitlines()[2:]:
        cells = re.split(r"\s{2,}", line.strip())
        rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_compare_table_mean_and_population_std_per_algo_and_final_row():
    runs = {
        "em seed 0": make_run("em", 0, [0.2, 0.5, 0.6], sel=[0.4, 0.7, 0.9]),
        "em seed 1": make_run("em", 1, [0.4, 0.7, 0.8], sel=[0.6, None, 0.5]),
        "em seed 2": make_run("em", 2, [0.3, 0.9], sel=[0.5, 0.8]),  # stopped one iteration early
        "grpo seed 0": make_run("grpo", 0, [0.1, 0.15]),  # selection accuracy null throughout
    }
    rows = rows_of(compare_table(runs))
    # iteration 0: pass@1 0.2, 0.4, 0.3 -> mean 0.3, pstd sqrt(0.02/3) = 0.0816; sel 0.4, 0.6, 0.5 likewise.
    assert rows[("em", "0")] == ["3", "0.300±0.082", "0.500±0.000", "0.500±0.082"]
    # iteration 1: pass@1 0.5, 0.7, 0.9 -> 0.7 ± 0.163; sel 0.7, None, 0.8 -> 0.75 ± 0.05 over 2 runs.
    assert rows[("em", "1")] == ["3", "0.700±0.163", "0.500±0.000", "0.750±0.050 (n=2)"]
    # iteration 2: only the two runs that got there: 0.6, 0.8 -> 0.7 ± 0.1; sel 0.9, 0.5 -> 0.7 ± 0.2.
    assert rows[("em", "2")] == ["2", "0.700±0.100", "0.500±0.000", "0.700±0.200"]
    # final: each run's last iteration (2, 2, 1): 0.6, 0.8, 0.9 -> 0.7667 ± 0.1247; sel 0.9, 0.5, 0.8.
    assert rows[("em", "final (1-2)")] == ["3", "0.767±0.125", "0.500±0.000", "0.733±0.170"]
    assert rows[("grpo", "0")] == ["1", "0.100±0.000", "0.500±0.000", "-"]
    assert rows[("grpo", "final (1)")] == ["1", "0.150±0.000", "0.500±0.000", "-"]
    assert list(rows) == [("em", "0"), ("em", "1"), ("em", "2"), ("em", "final (1-2)"), ("grpo", "0"),
                          ("grpo", "1"), ("grpo", "final (1)")]


def test_compare_table_run_without_algo_is_its_own_group_named_by_its_label():
    rows = rows_of(compare_table({"em seed 0": make_run("em", 0, [0.1]), "baseline": [{"iteration": 0,
                                  "eval/pass_at_1": 0.5}], "em seed 1": make_run("em", 1, [0.3])}))
    assert rows[("em", "0")][:2] == ["2", "0.200±0.100"]  # the baseline is not averaged in
    assert rows[("baseline", "0")][:2] == ["1", "0.500±0.000"]
    assert list(rows) == [("em", "0"), ("em", "final (0)"), ("baseline", "0"), ("baseline", "final (0)")]


# -- CLI --

def test_cli_one_run_writes_report_png_in_the_run_and_prints_both_tables(tmp_path, capsys):
    run = write_run(tmp_path / "run_a", make_run("em", 3, [0.25, 0.5]))
    assert main([str(run)]) == 0
    assert png_size(run / "report.png") == (1500, 800)
    out = capsys.readouterr().out
    assert "0.250" in out and "final (1)" in out and out.count("iter") == 2
    rows = rows_of(out.split("\n\n")[1])
    assert rows[("em", "final (1)")] == ["1", "0.500±0.000", "0.500±0.000", "-"]


def test_cli_several_runs_write_compare_png_in_the_current_directory(tmp_path, capsys, monkeypatch):
    a = write_run(tmp_path / "a", make_run("em", 0, [0.2, 0.6]))
    b = write_run(tmp_path / "b", make_run("em", 1, [0.4, 0.8]))
    c = write_run(tmp_path / "c", [{"iteration": 0, "eval/pass_at_1": 0.1}])  # no algo: labelled by directory
    monkeypatch.chdir(tmp_path)
    assert main([str(a), str(b), str(c)]) == 0
    assert png_size(tmp_path / "compare.png") == (1500, 800)
    rows = rows_of(capsys.readouterr().out)
    assert rows[("em", "final (1)")] == ["2", "0.700±0.100", "0.500±0.000", "-"]
    assert rows[("c", "0")] == ["1", "0.100±0.000", "-", "-"]


def test_cli_out_flag_and_bad_run(tmp_path, capsys):
    run = write_run(tmp_path / "run", make_run("grpo", 0, [0.1]))
    assert main([str(run), "--out", str(tmp_path / "x.png")]) == 0
    assert png_size(tmp_path / "x.png") == (1500, 800) and not (run / "report.png").exists()
    capsys.readouterr()
    assert main([str(run), str(tmp_path / "missing")]) == 1
    assert f"{tmp_path / 'missing' / 'metrics.jsonl'}: no such file" in capsys.readouterr().err
