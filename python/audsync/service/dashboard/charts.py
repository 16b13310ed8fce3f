"""Charts of a sync's runs as inline SVG, drawn on the server (no script, nothing fetched).

Each chart is one ``<svg>`` with a ``viewBox``, so it scales to the page's width; every bar and
point has a ``<title>`` (the browser's tooltip) with the run's time and numbers, and the chart
has a text summary for screen readers. Colours come from CSS classes in ``app.css``.
"""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT = 640, 200
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 48, 12, 12, 28


@dataclass
class Point:
    """One run on a chart: when it started (ISO text and a short label) and its values."""

    when: str
    label: str
    values: dict[str, int]


def _nice_max(value: float) -> int:
    """A top for the y axis at or above ``value`` whose quarters (the grid lines) are round
    numbers: 4, 8, 12, 24, 60, 100..."""
    if value <= 4:
        return 4
    quarter = value / 4
    step = 1
    while step * 10 < quarter:
        step *= 10
    for multiple in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if multiple * step >= quarter and float(multiple * step).is_integer():
            return int(4 * multiple * step)
    return 40 * step


def _frame(top: int, title: str, summary: str, body: list[str], n: int, labels: list[str],
           whens: list[str]) -> Markup:
    inner_h = HEIGHT - PAD_TOP - PAD_BOTTOM
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" preserveAspectRatio="xMidYMid meet" '
        f'aria-label="{escape(title)}">',
        f"<desc>{escape(summary)}</desc>",
    ]
    for i in range(5):  # horizontal grid lines with their values
        value = top * i / 4
        y = PAD_TOP + inner_h - inner_h * i / 4
        parts.append(f'<line class="grid" x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="axis" x="{PAD_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_short(value)}</text>')
    parts.extend(body)
    if n:  # first and last run's dates under the axis (the page's script shows them local)
        parts.append(f'<text class="axis" x="{PAD_LEFT}" y="{HEIGHT - 8}" data-datetime="{escape(whens[0])}">'
                     f"{escape(labels[0])}</text>")
        if n > 1:
            parts.append(f'<text class="axis" x="{WIDTH - PAD_RIGHT}" y="{HEIGHT - 8}" text-anchor="end" '
                         f'data-datetime="{escape(whens[-1])}">{escape(labels[-1])}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _short(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:g}M"
    if value >= 10_000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def line_chart(points: list[Point], key: str, title: str) -> Markup:
    """A line of ``values[key]`` over the runs, oldest on the left."""
    known = [p for p in points if p.values.get(key) is not None]
    top = _nice_max(max((p.values[key] for p in known), default=0))
    inner_w = WIDTH - PAD_LEFT - PAD_RIGHT
    inner_h = HEIGHT - PAD_TOP - PAD_BOTTOM
    n = len(known)
    coords = []
    for i, p in enumerate(known):
        x = PAD_LEFT + (inner_w * (i + 0.5) / n)
        y = PAD_TOP + inner_h - inner_h * p.values[key] / top
        coords.append((x, y, p))
    body = []
    if len(coords) > 1:
        path = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y, _) in enumerate(coords))
        body.append(f'<path class="line" d="{path}"/>')
    for x, y, p in coords:
        body.append(f'<circle class="dot" cx="{x:.1f}" cy="{y:.1f}" r="3.5"><title>{escape(p.label)}: '
                    f"{p.values[key]:,} members</title></circle>")
    latest = f"{known[-1].values[key]:,} members after the latest run" if known else "no runs yet"
    summary = f"{title}: {n} run(s); {latest}"
    return _frame(top, title, summary, body, n, [p.label for p in known], [p.when for p in known])


SERIES = (("rows_added", "added"), ("rows_removed", "removed"), ("rows_updated", "updated"))


def bar_chart(points: list[Point], title: str) -> Markup:
    """Grouped bars: members added, removed and updated by each run, oldest on the left."""
    n = len(points)
    top = _nice_max(max((p.values.get(k) or 0 for p in points for k, _ in SERIES), default=0))
    inner_w = WIDTH - PAD_LEFT - PAD_RIGHT
    inner_h = HEIGHT - PAD_TOP - PAD_BOTTOM
    body = []
    slot = inner_w / max(n, 1)
    bar = max(1.0, min(14.0, slot * 0.8 / len(SERIES)))
    for i, p in enumerate(points):
        left = PAD_LEFT + slot * i + (slot - bar * len(SERIES)) / 2
        numbers = ", ".join(f"{p.values.get(k) or 0:,} {word}" for k, word in SERIES)
        for j, (k, word) in enumerate(SERIES):
            value = p.values.get(k) or 0
            h = inner_h * value / top
            body.append(f'<rect class="bar {word}" x="{left + bar * j:.1f}" y="{PAD_TOP + inner_h - h:.1f}" '
                        f'width="{bar:.1f}" height="{max(h, 0):.1f}"><title>{escape(p.label)}: {numbers}</title></rect>')
    totals = {word: sum(p.values.get(k) or 0 for p in points) for k, word in SERIES}
    summary = f"{title}: {n} run(s); in all " + ", ".join(f"{v:,} {w}" for w, v in totals.items())
    return _frame(top, title, summary, body, n, [p.label for p in points], [p.when for p in points])
