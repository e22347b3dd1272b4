"""Training report: plots and tables from a run's metrics.jsonl (python -m acim_fast.report RUN_DIR [...] [--out PNG]).

`read_metrics` parses RUN/metrics.jsonl (one object per EM iteration, iteration 0 the starting model; a
`ValueError` names the file and line). `plot` writes one PNG, atomically: a 2x3 grid of `PANELS` (accuracy,
code-use rate, selection accuracy, E-step reward, M-step loss, clip fraction), runs of one "algo" in one colour.
`summary_table` shows one run; `compare_table` groups runs by "algo": mean ± population std over its runs (seeds)
per iteration, and a "final" row. An iteration logged twice (a resumed run) counts once, with its last line; a
missing or non-finite value is left out (never drawn as 0).

It does not read checkpoints or TensorBoard, smooth curves, compute confidence intervals (the ± is the spread over
seeds), or align runs by wall time. matplotlib is imported only inside `plot`, so the tables work without it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path
from typing import Any, Mapping, Sequence

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class Panel:
    """One subplot: the metrics key it draws, its title, and fixed y-limits (rates) or None (autoscale)."""

    key: str
    title: str
    ylim: tuple[float, float] | None = None


PANELS: tuple[Panel, ...] = (
    Panel("eval/pass_at_1", "accuracy (Pass@1)", (0.0, 1.0)),
    Panel("eval/code_use_rate", "code-use rate", (0.0, 1.0)),
    Panel("eval/selection_accuracy", "code-selection accuracy", (0.0, 1.0)),
    Panel("estep/reward_mean", "E-step reward"),
    Panel("mstep/loss", "M-step loss"),
    # A fraction, but typically a few percent: fixed [0, 1] would flatten it, so it autoscales.
    Panel("mstep/clip_frac", "clip fraction"),
)


# -- reading --

def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl`, in file order; `ValueError` (naming file and line) if malformed."""
    path = Path(run_dir) / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        # A ValueError, like every other "this run has no usable metrics", so callers catch one type.
        raise ValueError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    records: list[dict[str, Any]] = []
    # JSON Lines ends a record at "\n" only (str.splitlines would also split at e.g. U+2028 inside a string).
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        iteration = record.get("iteration")
        # bool is an int subclass, but `true` is no iteration number.
        if not isinstance(iteration, int) or isinstance(iteration, bool):
            raise ValueError(f"{path}:{number}: 'iteration' must be an int, got {iteration!r}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: empty, no metrics")
    return records


def _number(record: Mapping[str, Any], key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _by_iteration(records: Sequence[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    """Iteration -> its record, sorted by iteration; a repeated iteration keeps its last line (the resumed run's)."""
    last: dict[int, Mapping[str, Any]] = {}
    for record in records:
        last[record["iteration"]] = record
    return dict(sorted(last.items()))


def series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """The (iterations, values) points of `key` that `plot` draws: missing or null values are left out."""
    xs: list[int] = []
    ys: list[float] = []
    for iteration, record in _by_iteration(records).items():
        value = _number(record, key)
        if value is not None:
            xs.append(iteration)
            ys.append(value)
    return xs, ys


# -- the plot --

# Fixed colours for the two algorithms this project compares, so every report shows EM blue and GRPO orange.
_ALGO_COLOURS = {"em": "tab:blue", "grpo": "tab:orange"}
_OTHER_COLOURS = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
_LINE_STYLES = ("-", "--", ":", "-.")


def _group(label: str, records: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """("algo", the run's algo from its first record), or ("run", label): a run without an algo is a group alone.

    The tag keeps a run labelled "em" that has no algo out of the "em" group.
    """
    algo = records[0].get("algo") if records else None
    return ("algo", algo) if isinstance(algo, str) and algo else ("run", label)


def line_styles(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, tuple[str, str]]:
    """Label -> (colour, line style): one colour per algo, the runs of an algo (its seeds) told apart by style."""
    colours: dict[tuple[str, str], str] = {}
    counts: dict[tuple[str, str], int] = {}
    styles: dict[str, tuple[str, str]] = {}
    others = cycle(_OTHER_COLOURS)
    for label, records in runs.items():
        group = _group(label, records)
        if group not in colours:
            fixed = _ALGO_COLOURS.get(group[1]) if group[0] == "algo" else None
            colours[group] = fixed or next(others)
        index = counts.get(group, 0)
        counts[group] = index + 1
        styles[label] = (colours[group], _LINE_STYLES[index % len(_LINE_STYLES)])
    return styles


def plot(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike) -> Path:
    """Write the 2x3 PANELS grid of `runs` (label -> records) as a PNG at `path`, atomically; return the path."""
    if not runs:
        raise ValueError("plot: no runs")
    import matplotlib

    # Headless: the trainer's machines have no display; set before pyplot is imported so it takes effect.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from acim_fast.common.atomic import atomic_write

    styles = line_styles(runs)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), layout="constrained")
    handles: dict[str, Any] = {}
    try:
        for ax, panel in zip(axes.flat, PANELS):
            drawn = False
            for label, records in runs.items():
                xs, ys = series(records, panel.key)
                if not xs:
                    continue
                colour, style = styles[label]
                (line,) = ax.plot(xs, ys, color=colour, linestyle=style, marker="o", markersize=4, label=label)
                handles.setdefault(label, line)
                drawn = True
            if not drawn:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_title(panel.title)
            ax.set_xlabel("iteration")
            if panel.ylim is not None:
                ax.set_ylim(*panel.ylim)
            ax.grid(True, alpha=0.3)
            # Iterations are whole numbers: no 0.5 ticks on short runs.
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if handles:
            # One legend for the figure (every panel has the same runs), in run order.
            ordered = [label for label in runs if label in handles]
            fig.legend([handles[label] for label in ordered], ordered, loc="outside lower center",
                       ncols=min(len(ordered), 6))
        # The temporary file has a .tmp suffix, so the format must be given, not inferred from the name.
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


# -- the tables --

def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 0) -> str:
    """Fixed-width text: the first `left` columns left-aligned (names), the others right-aligned (numbers)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


# key, header, format: the columns of `summary_table` after the iteration.
_SUMMARY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("eval/pass_at_1", "pass@1", ".3f"),
    ("eval/code_use_rate", "code use", ".3f"),
    ("eval/selection_accuracy", "sel acc", ".3f"),
    ("estep/reward_mean", "reward", ".3f"),
    ("mstep/loss", "loss", ".4g"),
    ("mstep/clip_frac", "clip frac", ".3f"),
    ("time_s", "time (s)", ".1f"),
)


def summary_table(records: Sequence[Mapping[str, Any]]) -> str:
    """One run as a fixed-width table, one row per iteration; "-" where a value is missing."""
    header = ["iter", *(title for _, title, _ in _SUMMARY_COLUMNS)]
    rows = [[str(iteration), *(_cell(_number(record, key), fmt) for key, _, fmt in _SUMMARY_COLUMNS)]
            for iteration, record in _by_iteration(records).items()]
    return _format_table(header, rows)


_COMPARE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("eval/pass_at_1", "pass@1"),
    ("eval/code_use_rate", "code use"),
    ("eval/selection_accuracy", "sel acc"),
)


def _mean_std(values: Sequence[float | None], runs: int) -> str:
    """'mean±std' (population std over seeds); '-' if none; ' (n=k)' when only k of the `runs` runs have a value."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    text = f"{statistics.fmean(present):.3f}±{statistics.pstdev(present):.3f}"
    # Say when a mean is over fewer runs than the row counts (a null selection accuracy), so it is not misread.
    return text if len(present) == runs else f"{text} (n={len(present)})"


def compare_table(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Runs grouped by "algo": per iteration, and for each run's final iteration, mean ± std over the group's runs.

    The "runs" column counts the runs that logged that iteration (runs may have stopped at different points); the
    "final" row takes each run's last iteration, shown as a range when they differ.
    """
    groups: dict[tuple[str, str], list[dict[int, Mapping[str, Any]]]] = {}
    for label, records in runs.items():
        groups.setdefault(_group(label, records), []).append(_by_iteration(records))

    header = ["algo", "iter", "runs", *(title for _, title in _COMPARE_COLUMNS)]
    rows: list[list[str]] = []
    for (_, name), members in groups.items():
        members = [m for m in members if m]
        iterations = sorted({i for m in members for i in m})
        for iteration in iterations:
            present = [m[iteration] for m in members if iteration in m]
            rows.append([name, str(iteration), str(len(present)),
                         *(_mean_std([_number(r, key) for r in present], len(present)) for key, _ in _COMPARE_COLUMNS)])
        if members:
            finals = [m[max(m)] for m in members]
            first, last = min(max(m) for m in members), max(max(m) for m in members)
            rows.append([name, f"final ({first})" if first == last else f"final ({first}-{last})",
                         str(len(finals)),
                         *(_mean_std([_number(r, key) for r in finals], len(finals)) for key, _ in _COMPARE_COLUMNS)])
    return _format_table(header, rows, left=2)


# -- CLI --

def _label(run_dir: Path, records: Sequence[Mapping[str, Any]]) -> str:
    algo, seed = records[0].get("algo"), records[0].get("seed")
    if isinstance(algo, str) and algo and isinstance(seed, int) and not isinstance(seed, bool):
        return f"{algo} seed {seed}"
    return run_dir.resolve().name or str(run_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: read each RUN_DIR, write the PNG, print compare_table (and summary_table for one run). 0 ok, 1 bad input."""
    parser = argparse.ArgumentParser(prog="python -m acim_fast.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help=f"a run directory holding {METRICS_FILE}")
    parser.add_argument("--out", default=None,
                        help="PNG to write (default: RUN_DIR/report.png for one run, else ./compare.png)")
    args = parser.parse_args(argv)

    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for run_dir in map(Path, args.run_dirs):
            records = read_metrics(run_dir)
            label = _label(run_dir, records)
            if label in runs:
                # Two runs with the same algo and seed (e.g. a rerun): keep both, told apart by directory.
                label = f"{label} ({run_dir})"
            runs[label] = records
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    if args.out is not None:
        out = Path(args.out)
    else:
        out = Path(args.run_dirs[0]) / "report.png" if len(args.run_dirs) == 1 else Path("compare.png")
    plot(runs, out)
    if len(runs) == 1:
        print(summary_table(next(iter(runs.values()))))
        print()
    print(compare_table(runs))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
