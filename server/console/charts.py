"""Telemetry charts as inline SVG, drawn on the server (no script, no external asset)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

WIDTH, HEIGHT, PAD_L, PAD_R, PAD_T, PAD_B = 320, 110, 38, 8, 10, 18


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float | None]]  # (t, value); None is a gap
    css: str  # class of the line (colour from the stylesheet)


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    for step in (1, 2, 2.5, 5, 10):
        scale = 10 ** (len(str(int(value))) - 1)
        if value <= step * scale:
            return float(step * scale)
    return value


def line_chart(title: str, unit: str, series: Sequence[Series], *, now: float, span_s: float = 3600.0,
               min_span_s: float = 120.0) -> str:
    """One chart: ``series`` since their first point (at most ``span_s`` seconds back, at least
    ``min_span_s``); the y axis starts at 0."""
    values = [v for s in series for _, v in s.points if v is not None]
    times = [t for s in series for t, v in s.points if v is not None]
    if times:
        span_s = min(span_s, max(min_span_s, now - min(times)))
    esc = html.escape
    head = (f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{esc(title)}">'
            f'<title>{esc(title)}</title>')
    if not values:
        return (head + f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" class="chart-empty" text-anchor="middle">'
                f'{esc(title)}: no data in the last hour</text></svg>')
    top = _nice_max(max(values))
    plot_w, plot_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B
    t0 = now - span_s

    def xy(t: float, v: float) -> str:
        x = PAD_L + plot_w * min(max((t - t0) / span_s, 0.0), 1.0)
        y = PAD_T + plot_h * (1.0 - min(v / top, 1.0))
        return f"{x:.1f},{y:.1f}"

    parts = [head, f'<text x="{PAD_L}" y="8" class="chart-title">{esc(title)} ({esc(unit)})</text>']
    for frac in (0.0, 0.5, 1.0):
        y = PAD_T + plot_h * (1.0 - frac)
        parts.append(f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{PAD_L - 3}" y="{y + 3:.1f}" class="axis" text-anchor="end">{top * frac:g}</text>')
    back = f"-{span_s / 60:.0f} min" if span_s >= 120 else f"-{span_s:.0f} s"
    parts.append(f'<text x="{PAD_L}" y="{HEIGHT - 4}" class="axis">{back}</text>'
                 f'<text x="{WIDTH - PAD_R}" y="{HEIGHT - 4}" class="axis" text-anchor="end">now</text>')
    legend_x = WIDTH - PAD_R
    for s in reversed(series):
        runs: list[list[str]] = [[]]
        for t, v in s.points:
            if v is None:
                runs.append([])
            else:
                runs[-1].append(xy(t, v))
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="1.8" class="{esc(s.css)} dot"/>')
            elif run:
                parts.append(f'<polyline points="{" ".join(run)}" class="{esc(s.css)}"/>')
        parts.append(f'<text x="{legend_x}" y="8" class="legend {esc(s.css)}" text-anchor="end">{esc(s.label)}</text>')
        legend_x -= 8 + 6 * len(s.label)
    parts.append("</svg>")
    return "".join(parts)


def telemetry_charts(series: Sequence[dict[str, object]], *, now: float) -> list[str]:
    """The device page's charts from ``FleetRegistry.telemetry_series`` rows."""

    def pts(key: str) -> list[tuple[float, float | None]]:
        out: list[tuple[float, float | None]] = []
        for row in series:
            v = row.get(key)
            out.append((float(row["bucket"]), float(v) if isinstance(v, (int, float)) else None))  # type: ignore[arg-type]
        return out

    return [
        line_chart("latency", "ms", [Series("p95 avg", pts("p95_ms_avg"), "s1"), Series("p95 max", pts("p95_ms_max"),
                                                                                      "s2")], now=now),
        line_chart("CPU", "%", [Series("cpu", pts("cpu_percent"), "s1")], now=now),
        line_chart("memory", "%", [Series("memory", pts("memory_percent"), "s3")], now=now),
        line_chart("temperature", "°C", [Series("max", pts("temperature_max"), "s2")], now=now),
    ]
