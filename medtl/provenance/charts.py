"""Tables and line charts drawn by the audit report's sections: markdown tables, and line charts as
coordinates for the report's SVG template (no plotting library, so the report renders offline)."""
from __future__ import annotations

import numbers


def md_table(header: list[str], rows: list[list]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def line_chart(rows: list[dict], x: str, y: str, title: str, xlabel: str = "", ylabel: str = "", diagonal: bool = False,
                baseline: float | None = None) -> dict | None:
    pts = [(float(r[x]), float(r[y])) for r in rows if isinstance(r.get(x), numbers.Real) and isinstance(r.get(y), numbers.Real)]
    if not pts:
        return None
    w, h, left, right, top, bottom = 320, 280, 48, 14, 28, 44
    unit = all(0 <= a <= 1 and 0 <= b <= 1 for a, b in pts)
    x0, x1 = (0.0, 1.0) if unit else (min(p[0] for p in pts), max(p[0] for p in pts))
    y0, y1 = (0.0, 1.0) if unit else (min(p[1] for p in pts), max(p[1] for p in pts))
    sx = lambda v: round(left + (v - x0) / ((x1 - x0) or 1) * (w - left - right), 1)  # noqa: E731
    sy = lambda v: round(h - bottom - (v - y0) / ((y1 - y0) or 1) * (h - top - bottom), 1)  # noqa: E731
    ticks = []
    for i in range(5):
        tx, ty = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        ticks.append({"x": sx(tx), "y": sy(ty), "xt": f"{tx:.3g}", "yt": f"{ty:.3g}"})
    base = None
    if baseline is not None and y0 <= baseline <= y1:
        base = {"x1": sx(x0), "x2": sx(x1), "y": sy(baseline), "label": f"prevalence {baseline:.2f} (chance)"}
    return {
        "w": w, "h": h, "left": left, "right": w - right, "top": top, "bottom": h - bottom, "mid_x": left + (w - left - right) / 2,
        "mid_y": top + (h - top - bottom) / 2, "title": title, "xlabel": xlabel or x, "ylabel": ylabel or y, "ticks": ticks,
        "diagonal": (sx(x0), sy(y0), sx(x1), sy(y1)) if diagonal else None, "baseline": base,
        "points": " ".join(f"{sx(a)},{sy(b)}" for a, b in pts),
        "dots": [(sx(a), sy(b)) for a, b in pts] if len(pts) <= 20 else [],
    }
