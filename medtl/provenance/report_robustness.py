"""The audit report's robustness and failure-case sections (templates sections/robustness.html and the failure cases of sections/figures.html).

Like the rest of the report, the Python here computes what to show (text,
numbers, chart geometry); the templates escape every value.
"""
from __future__ import annotations

import base64
import numbers
from pathlib import Path

from medtl.provenance import card

# One colour per perturbation, in robustness.ALL's order; attacks dashed.
COLOURS = ["#1f5fa8", "#2a9d8f", "#8ab17d", "#e9c46a", "#f4a261", "#e76f51", "#9c6ade", "#6c757d", "#b42318", "#7a1c12"]


def _fmt_ci(low, high) -> str:
    return f"[{card.fmt(low, 3)}, {card.fmt(high, 3)}]" if low is not None and high is not None else "n/a"


def _chart(rec: dict) -> dict | None:
    """ROC AUC against severity (0 = clean), one line per perturbation."""
    clean = (rec.get("clean") or {}).get("roc_auc")
    lines: dict[str, list[tuple[int, float]]] = {}
    for c in rec.get("conditions") or []:
        line = lines.setdefault(c["perturbation"], [(0, clean)] if isinstance(clean, numbers.Real) else [])
        if isinstance(c.get("roc_auc"), numbers.Real):
            line.append((c["severity"], c["roc_auc"]))
    series = []
    w, h, left, right, top, bottom = 560, 300, 48, 150, 28, 44
    top_severity = max((s for line in lines.values() for s, _ in line), default=0) or 1
    values = [v for line in lines.values() for _, v in line]
    if not values:
        return None
    y0 = min(0.5, min(values))
    sx = lambda s: round(left + s / top_severity * (w - left - right), 1)  # noqa: E731
    sy = lambda v: round(h - bottom - (v - y0) / ((1 - y0) or 1) * (h - top - bottom), 1)  # noqa: E731
    for i, (n, line) in enumerate(lines.items()):
        pts = [(sx(s), sy(v)) for s, v in line]
        if pts:
            series.append({"name": n, "colour": COLOURS[i % len(COLOURS)], "dashed": n in ("fgsm", "pgd"),
                           "points": " ".join(f"{x},{y}" for x, y in pts), "dots": pts,
                           "legend_y": top + 14 * len(series)})
    yticks = [{"y": sy(y0 + (1 - y0) * i / 4), "t": f"{y0 + (1 - y0) * i / 4:.2f}"} for i in range(5)]
    xticks = [{"x": sx(s), "t": "clean" if s == 0 else str(s)} for s in range(top_severity + 1)]
    return {"w": w, "h": h, "left": left, "right": w - right, "top": top, "bottom": h - bottom, "series": series,
            "yticks": yticks, "xticks": xticks, "legend_x": w - right + 12,
            "mid_x": left + (w - left - right) / 2, "mid_y": top + (h - top - bottom) / 2}


def robustness_section(ev: dict) -> dict | None:
    """None when evaluate wrote no robustness.json; {"enabled": False} when the report was off."""
    rec = ev.get("robustness")
    if not isinstance(rec, dict):
        return None
    if not rec.get("enabled"):
        return {"enabled": False}
    clean = rec.get("clean") or {}
    names = rec.get("metrics") or ["roc_auc"]
    header = ["perturbation", "severity", "value"]
    for n in names:
        header += [n.replace("roc_auc", "ROC AUC").replace("_", " "), "95% CI"]
    header += ["ROC AUC drop", "decisions flipped"]
    rows = [["clean", "", ""] + [x for n in names for x in (card.fmt(clean.get(n), 3),
                                                           _fmt_ci(clean.get(f"{n}_ci_low"), clean.get(f"{n}_ci_high")))]
            + ["", ""]]
    concerns = []
    for c in rec.get("conditions") or []:
        drop = c.get("roc_auc_drop")
        # the perturbed AUC's whole interval below the clean point estimate: a drop the bootstrap does not explain
        beyond = c.get("roc_auc_ci_high") is not None and clean.get("roc_auc") is not None \
            and c["roc_auc_ci_high"] < clean["roc_auc"]
        if beyond:
            concerns.append(f"{c['perturbation']} {c['severity']}")
        rows.append([c["perturbation"], str(c["severity"]), card.fmt(c.get("value"), 4)]
                    + [x for n in names for x in (card.fmt(c.get(n), 3), _fmt_ci(c.get(f"{n}_ci_low"), c.get(f"{n}_ci_high")))]
                    + [{"kind": "bad" if beyond else "plain", "text": f"{drop:+.3f}" if isinstance(drop, numbers.Real) else "n/a"},
                       f"{c['flipped']:.1%}" if isinstance(c.get("flipped"), numbers.Real) else "n/a"])
    boot = rec.get("bootstrap") or {}
    worst = rec.get("worst")
    return {
        "enabled": True, "header": header, "rows": rows, "num": list(range(3, len(header))), "chart": _chart(rec),
        "summary": f"{rec.get('split')} split, {rec.get('n')} images in {rec.get('n_groups')} bootstrap groups (patients), at the "
                   f"operating threshold {card.fmt(rec.get('threshold'), 3)} fitted on validation (never refitted); "
                   f"95% intervals from {boot.get('n_resamples')} patient bootstrap resamples; perturbation seed {rec.get('seed')}",
        "worst": (f"Largest ROC AUC drop: {card.fmt(worst['roc_auc_drop'], 3)} under {worst['perturbation']} severity "
                  f"{worst['severity']} ({card.fmt(worst['value'], 4)}), {worst['flipped']:.1%} of decisions flipped.") if worst else None,
        "concerns": concerns,
    }


def _overlay(path: Path) -> dict | None:
    if not path.is_file() or path.suffix.lower() != ".png":
        return None
    return {"kind": "image", "alt": path.name, "caption": path.name, "mime": "image/png",
            "data": base64.b64encode(path.read_bytes()).decode("ascii")}


def failures_section(ev: dict, root: Path) -> dict | None:
    rec = ev.get("failures")
    if not isinstance(rec, dict) or not ev.get("metrics_path"):
        return None
    folder = root / Path(ev["metrics_path"]).parent / "failures"
    cases = rec.get("cases") or []
    rows = [[c["case"], str(c["rank"]), c["image_id"], {"kind": "hash", "text": c.get("source_ref") or "n/a"}, c.get("patient") or "",
             c["label"], c["predicted"], card.fmt(c.get("probability"), 3)] for c in cases]
    images = [img for c in cases if c.get("overlay") and (img := _overlay(folder / c["overlay"]))]
    errors = ", ".join(f"{k} {v}" for k, v in (rec.get("errors") or {}).items())
    return {"rows": rows, "images": images, "note": rec.get("note"), "errors": errors,
            "header": ["case", "rank", "image id", "source ref", "patient", "label", "predicted", f"p({rec.get('probability_of')})"],
            "threshold": card.fmt(rec.get("threshold"), 3)}


def markdown(ev: dict) -> list[str]:
    """The two sections for report.md."""
    out = []
    sec = robustness_section(ev)
    if sec and sec["enabled"]:
        esc = lambda s: str(s.get("text") if isinstance(s, dict) else s).replace("|", "\\|")  # noqa: E731
        out += ["## Robustness", "", sec["summary"] + ".", ""]
        if sec["worst"]:
            out += [sec["worst"], ""]
        out += ["| " + " | ".join(sec["header"]) + " |", "|" + "---|" * len(sec["header"])]
        out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in sec["rows"]] + [""]
    elif sec:
        out += ["## Robustness", "", "Off (evaluate.robustness.enabled: false).", ""]
    fail = ev.get("failures")
    if isinstance(fail, dict) and ev.get("metrics_path"):
        base = Path(ev["metrics_path"]).parent / "failures"
        out += ["## Failure cases", "", f"The most confident mistakes on the evaluated split (errors: "
                f"{', '.join(f'{k} {v}' for k, v in (fail.get('errors') or {}).items())}).", ""]
        out += ["| case | rank | image id | source ref | patient | label | predicted | probability | overlay |", "|" + "---|" * 9]
        for c in fail.get("cases") or []:
            link = f"![{c['overlay']}](../../{(base / c['overlay']).as_posix()})" if c.get("overlay") else ""
            out.append(f"| {c['case']} | {c['rank']} | {c['image_id']} | {c.get('source_ref') or ''} | {c.get('patient') or ''} | "
                       f"{c['label']} | {c['predicted']} | {card.fmt(c.get('probability'), 3)} | {link} |")
        out.append("")
    return out
