"""Charts drawn on the server as inline SVG: no chart library, no script, crisp at any size."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from html import escape

from markupsafe import Markup

__all__ = ["bar_chart", "hbar_chart"]

W, H = 640, 200
PAD_L, PAD_R, PAD_T, PAD_B = 56, 12, 12, 28


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** (len(str(int(value))) - 1)
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= step * magnitude:
            return step * magnitude
    return float(value)


def bar_chart(
    values: Sequence[float],
    starts_ms: Sequence[int],
    *,
    label: str,
    fmt: Callable[[float], str] = lambda v: f"{v:,.0f}",
    color: str = "var(--accent)",
    hours: bool = True,
    integer: bool = False,
) -> Markup:
    """Vertical bars over time buckets, four gridlines, a tooltip per bar. ``integer``: counts, so
    the gridlines fall on whole numbers."""
    n = max(1, len(values))
    top = _nice_max(max(values, default=0))
    if integer:
        top = max(4.0, 4 * -(-max(values, default=0) // 4))
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    slot = plot_w / n
    parts = [
        f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(label)}" preserveAspectRatio="none">'
    ]
    for i in range(5):
        y = PAD_T + plot_h - plot_h * i / 4
        parts.append(f'<line class="grid" x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(
            f'<text class="axis" x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(fmt(top * i / 4))}</text>'
        )
    for i, v in enumerate(values):
        if v <= 0:
            continue
        h = max(1.5, plot_h * (v / top))
        x = PAD_L + i * slot + slot * 0.15
        y = PAD_T + plot_h - h
        when = datetime.fromtimestamp(starts_ms[i] / 1000, UTC)
        tip = f"{when:%Y-%m-%d %H:%M} UTC: {fmt(v)}"
        parts.append(
            f'<rect class="col" x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
            f'fill="{color}" rx="2"><title>{escape(tip)}</title></rect>'
        )
    ticks = max(1, n // 6)
    for i in range(0, n, ticks):
        when = datetime.fromtimestamp(starts_ms[i] / 1000, UTC)
        text = f"{when:%H:%M}" if hours else f"{when:%b %d}"
        x = PAD_L + i * slot + slot / 2
        parts.append(f'<text class="axis" x="{x:.1f}" y="{H - 8}" text-anchor="middle">{text}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def hbar_chart(items: Sequence[tuple[str, float]], *, fmt: Callable[[float], str] = lambda v: f"{v:,.0f}") -> Markup:
    """Horizontal bars, one per labelled value (largest first), as HTML (wraps long labels)."""
    top = max((v for _, v in items), default=0) or 1
    rows = []
    for name, v in items:
        pct = 100 * v / top
        rows.append(
            f'<div class="hbar"><span class="hbar-label" title="{escape(name)}">{escape(name)}</span>'
            f'<span class="hbar-track"><span class="hbar-fill" style="width:{pct:.1f}%"></span></span>'
            f'<span class="hbar-value">{escape(fmt(v))}</span></div>'
        )
    return Markup("".join(rows))
