"""Printing: aligned tables, ratios to a baseline, and the list of targets.

Everything goes to stdout as it is produced (flushed), so a long run can be
watched and a crash still leaves the figures measured so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.load import LoadResult


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(title: str) -> None:
    say()
    say(f"== {title} " + "=" * max(0, 76 - len(title)))


def table(headers: list[str], rows: list[list[str]]) -> None:
    """Left-aligned first column, right-aligned figures."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    say(line(headers))
    say("  ".join("-" * w for w in widths))
    for row in rows:
        say(line(row))


def ratio(value: float | None, baseline: float | None) -> str:
    if value is None or not baseline:
        return "-"
    return f"{value / baseline:.2f}x"


def rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def load_cells(result: LoadResult | None, baseline: LoadResult | None) -> list[str]:
    """ops/s, its ratio to the baseline, p50 and p99 in ms, errors."""
    if result is None:
        return ["failed", "-", "-", "-", "-"]
    base = baseline.ops_per_s if baseline is not None else None
    return [
        rate(result.ops_per_s),
        ratio(result.ops_per_s, base),
        ms(result.p50),
        ms(result.p99),
        str(result.errors),
    ]


LOAD_HEADERS = ["ops/s", "ratio", "p50 ms", "p99 ms", "errors"]


@dataclass
class Target:
    name: str
    detail: str
    met: bool | None  # None: not measured in this run (section skipped or failed)


@dataclass
class Targets:
    items: list[Target] = field(default_factory=list)

    def check(self, name: str, detail: str, met: bool | None) -> None:
        self.items.append(Target(name, detail, met))
        mark = {True: "MET", False: "MISSED", None: "NOT MEASURED"}[met]
        say(f"  target: {name}: {mark} ({detail})")

    def print_summary(self) -> None:
        heading("targets")
        if not self.items:
            say("no target was evaluated (no section that carries one ran)")
        for item in self.items:
            mark = {True: "MET   ", False: "MISSED", None: "N/A   "}[item.met]
            say(f"[{mark}] {item.name} -- {item.detail}")
        met = sum(1 for item in self.items if item.met)
        say(f"{met} of {len(self.items)} targets met")
