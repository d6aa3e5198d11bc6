"""Draw where we stand: end-to-end seconds per layout and precision, beside the peer's published
figures and the bf16 floor, into a PNG (`docs/standing.png` by default).

    python -m benchmarks.chart                                  # docs/results/standing.json only
    python -m benchmarks.chart --e2e out/e2e_bf16.json out/e2e_fp8.json

`docs/results/standing.json` is hand-maintained: every figure with its card, date and source, and
the floors. Each `benchmarks.e2e_service` JSON given with `--e2e` adds its runs as the series
"ours, both services, PRECISION" (the warm requests' mean client time), replacing a standing row
of the same series and layout. Drawing needs matplotlib (`pip install -e ".[plot]"`); building
the bars does not.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ROOT = Path(__file__).resolve().parents[1]
STANDING = ROOT / "docs" / "results" / "standing.json"
OUTPUT = ROOT / "docs" / "standing.png"
PEER = "vLLM-Omni"

# Series colours by what they are: ours in blues and greens, the peer in grey.
COLOURS = {
    "ours, in-process bf16 (sp_gpu)": "#4C72B0",
    "ours, both services, bf16": "#1B3F7A",
    "ours, both services, fp8": "#2E8B57",
    "ours, in-process fp8 (sp_gpu)": "#6BBF8A",
    f"{PEER} (published)": "#A0A0A0",
}
FLOOR_COLOUR = "#C44E52"
SPARE_COLOURS = ("#DD8452", "#8172B3", "#937860", "#DA8BC3", "#CCB974")


@dataclass(frozen=True)
class Bar:
    """One figure: a series' end-to-end seconds for one layout."""

    layout: str
    series: str
    seconds: float
    gpus: int = 1
    low: float | None = None
    high: float | None = None
    label: str | None = None  # what the bar is, when the layout name does not say it all


@dataclass(frozen=True)
class Floor:
    label: str
    seconds: float
    layouts: tuple[str, ...]


def standing_bars(standing: dict) -> list[Bar]:
    bars = []
    for row in standing["rows"]:
        low, high = row.get("range", (None, None))
        bars.append(
            Bar(
                layout=row["layout"],
                series=row["series"],
                seconds=float(row["seconds"]),
                gpus=int(row.get("gpus", 1)),
                low=low,
                high=high,
                label=row.get("label"),
            )
        )
    return bars


def standing_floors(standing: dict) -> list[Floor]:
    return [
        Floor(f["label"], float(f["seconds"]), tuple(f["layouts"]))
        for f in standing.get("floors", [])
    ]


def e2e_bars(result: dict) -> list[Bar]:
    """The runs of one `benchmarks.e2e_service` JSON: the warm requests' mean client time (the
    first request's when there was only one); failed runs are left out."""
    bars = []
    for row in result["rows"]:
        if "error" in row:
            continue
        summary = row["summary"]
        phases = summary["warm"] or summary["first"]
        bars.append(
            Bar(
                layout=row["layout"],
                series=f"ours, both services, {row['precision']}",
                seconds=phases["client_ms"] / 1e3,
                gpus=int(row["world"]),
            )
        )
    return bars


def merge(bars: Sequence[Bar], newer: Iterable[Bar]) -> list[Bar]:
    """`bars` with each (series, layout) of `newer` replacing or joining them."""
    merged = {(b.series, b.layout): b for b in bars}
    for bar in newer:
        merged[bar.series, bar.layout] = bar
    return list(merged.values())


def first_seen(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def series_order(bars: Iterable[Bar]) -> list[str]:
    """Ours first (the known series in `COLOURS` order, then others as they come), the peer's
    last."""
    seen = first_seen(b.series for b in bars)
    known = list(COLOURS)

    def key(series: str) -> tuple[bool, int]:
        rank = known.index(series) if series in known else len(known) + seen.index(series)
        return series.startswith(PEER), rank

    return sorted(seen, key=key)


def colour_of(series: Sequence[str]) -> dict[str, str]:
    spare = iter(SPARE_COLOURS)
    return {s: COLOURS.get(s) or next(spare, "#333333") for s in series}


def draw(bars: Sequence[Bar], floors: Sequence[Floor], title: str, note: str, path: Path) -> None:
    """Grouped bars per layout (in order of first appearance), one colour per series, each
    bar's seconds on it, a range as an error bar, the floors as dashed lines over their layouts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = first_seen(b.layout for b in bars)
    series = series_order(bars)
    colours = colour_of(series)
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(12, 6), dpi=150)
    top = max([b.seconds for b in bars] + [f.seconds for f in floors])
    for x, layout in enumerate(layouts):
        group = sorted(
            (b for b in bars if b.layout == layout), key=lambda b: series.index(b.series)
        )
        start = x - width * (len(group) - 1) / 2
        for i, bar in enumerate(group):
            pos = start + i * width
            error = None
            if bar.low is not None and bar.high is not None:
                error = [[bar.seconds - bar.low], [bar.high - bar.seconds]]
            ax.bar(pos, bar.seconds, width * 0.92, color=colours[bar.series], yerr=error,
                   capsize=3, error_kw={"elinewidth": 1, "ecolor": "#333333"})  # fmt: skip
            value = f"{bar.seconds:.2f}"
            if error is not None and bar.low != bar.high and len(series) < 3:  # room to say it
                value = f"{bar.low:.2f}\u2013{bar.high:.2f}"
            text = value if not bar.label else f"{bar.label}\n{value}"
            ax.text(pos, bar.seconds + top * 0.012, text, ha="center", va="bottom",
                    fontsize=8 if len(series) < 4 else 7, linespacing=1.1)  # fmt: skip
    for floor in floors:
        xs = [layouts.index(name) for name in floor.layouts if name in layouts]
        if not xs:
            continue
        left, right = min(xs) - 0.45, max(xs) + 0.45
        ax.hlines(floor.seconds, left, right, colors=FLOOR_COLOUR, linestyles="--", linewidth=1.2)
        ax.text(right + 0.01, floor.seconds, f"{floor.seconds:g}", ha="left", va="center",
                fontsize=7, color=FLOOR_COLOUR)  # fmt: skip
    ax.set_xticks(range(len(layouts)), layouts)
    ax.set_ylabel("end-to-end seconds (lower is better)")
    ax.set_ylim(0, top * 1.12)
    ax.set_title(title, fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    ax.set_axisbelow(True)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[s]) for s in series]
    names = list(series)
    if floors:
        handles.append(plt.Line2D([], [], color=FLOOR_COLOUR, linestyle="--"))
        names.append("; ".join(f"{f.label}: {f.seconds:g} s" for f in floors))
    ax.legend(handles, names, fontsize=8, frameon=False, loc="upper right")
    fig.text(0.01, 0.01, note, fontsize=7, color="#555555", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--standing", type=Path, default=STANDING, help="hand-maintained figures")
    parser.add_argument("--e2e", type=Path, nargs="*", default=[], help="e2e_service JSON files")
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT, help="PNG to write")
    args = parser.parse_args(argv)
    standing = json.loads(args.standing.read_text())
    bars = standing_bars(standing)
    for path in args.e2e:
        bars = merge(bars, e2e_bars(json.loads(path.read_text())))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit('matplotlib is missing: pip install -e ".[plot]"') from None
    draw(bars, standing_floors(standing), standing["title"], standing.get("note", ""), args.output)
    print(f"wrote {args.output} ({len(bars)} bars)")


if __name__ == "__main__":
    main()
