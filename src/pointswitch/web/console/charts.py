"""Charts of the console, rendered on the server as SVG: no JavaScript, testable as text.

Each function returns markup ready for a template. Every label passes through
``escape``; every value is formatted as a number, so nothing else reaches the markup.
"""

from __future__ import annotations

from markupsafe import Markup, escape

COLOURS = ("#2f6db5", "#d9822b", "#3b9c5a", "#b53f3f", "#7a5cb5", "#7f7f7f")
_PAD_LEFT, _PAD_BOTTOM, _PAD_TOP = 48, 28, 24


def _nice_max(value: float) -> float:
    """A round axis top at or above ``value`` (1, 2, 5 x 10^k, from 0.01)."""
    if value <= 0:
        return 1
    scale = 0.01
    while True:
        for step in (1, 2, 5):
            if step * scale >= value - 1e-9:
                return round(step * scale, 2)
        scale *= 10


def _n(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(int(value))


def bars(labels: list[str], series: dict[str, list[float]], *, title: str, width: int = 720, height: int = 200,
         label_every: int = 1) -> Markup:
    """Vertical bars: one group per label, one bar per series (values >= 0 drawn)."""
    names = list(series)
    top = _nice_max(max((max(v, default=0) for v in series.values()), default=0))
    plot_w, plot_h = width - _PAD_LEFT - 8, height - _PAD_BOTTOM - _PAD_TOP
    group_w = plot_w / max(len(labels), 1)
    bar_w = max(group_w * 0.8 / max(len(names), 1), 1.0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" height="{height}"'
             f' viewBox="0 0 {width} {height}"><title>{escape(title)}</title>',
             f'<line x1="{_PAD_LEFT}" y1="{_PAD_TOP + plot_h}" x2="{width - 8}" y2="{_PAD_TOP + plot_h}"'
             f' stroke="#999"/>',
             f'<text x="{_PAD_LEFT - 4}" y="{_PAD_TOP + 8}" text-anchor="end" font-size="10">{_n(top)}</text>',
             f'<text x="{_PAD_LEFT - 4}" y="{_PAD_TOP + plot_h}" text-anchor="end" font-size="10">0</text>']
    for i, label in enumerate(labels):
        x0 = _PAD_LEFT + i * group_w + group_w * 0.1
        for j, name in enumerate(names):
            value = float(series[name][i])
            h = plot_h * max(value, 0) / top
            parts.append(f'<rect class="bar" x="{x0 + j * bar_w:.1f}" y="{_PAD_TOP + plot_h - h:.1f}"'
                         f' width="{bar_w:.1f}" height="{h:.1f}" fill="{COLOURS[j % len(COLOURS)]}">'
                         f'<title>{escape(label)} {escape(name)}: {_n(value)}</title></rect>')
        if i % label_every == 0:
            parts.append(f'<text x="{x0:.1f}" y="{height - 10}" font-size="10">{escape(label)}</text>')
    for j, name in enumerate(names if len(names) > 1 else []):
        parts.append(f'<rect x="{_PAD_LEFT + 8 + j * 110}" y="4" width="10" height="10"'
                     f' fill="{COLOURS[j % len(COLOURS)]}"/><text x="{_PAD_LEFT + 22 + j * 110}"'
                     f' y="13" font-size="11">{escape(name)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def share(items: dict[str, int], *, title: str, width: int = 360) -> Markup:
    """Horizontal bars, one per item, with its count: e.g. answers by response code."""
    total = sum(items.values()) or 1
    row_h = 18
    height = max(len(items), 1) * row_h + 6
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}"'
             f' height="{height}" viewBox="0 0 {width} {height}"><title>{escape(title)}</title>']
    for i, (name, count) in enumerate(items.items()):
        w = (width - 200) * count / total
        y = 3 + i * row_h
        parts.append(f'<text x="0" y="{y + 12}" font-size="11">{escape(name)}</text>'
                     f'<rect class="bar" x="130" y="{y}" width="{w:.1f}" height="{row_h - 4}"'
                     f' fill="{COLOURS[i % len(COLOURS)]}"/>'
                     f'<text x="{134 + w:.1f}" y="{y + 12}" font-size="11">{int(count)}</text>')
    if not items:
        parts.append('<text x="0" y="14" font-size="11">none</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
