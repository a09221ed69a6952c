"""The audit's transfer block: the source model a backbone started from, and the label-efficiency curve.

Kept apart from report.py: it reads what pretrain-adapt recorded
(`weights.source_model`, medtl.model.lineage) and what `medtl curve report` wrote
(reports/curve/summary.json), and gives both renderings their rows.
"""
from __future__ import annotations

import json
from pathlib import Path

from medtl.provenance.charts import line_chart, md_table

CURVE = Path("reports/curve/summary.json")


def transfer_evidence(root: Path, weights: dict | None) -> dict | None:
    """What the audit records about transfer: the source model's lineage and the curve summary, when present."""
    out: dict = {}
    source = None
    checkpoint = (weights or {}).get("checkpoint") if isinstance(weights, dict) else None
    if checkpoint and (root / checkpoint).is_file():  # the backbone's own record of its source model
        from medtl.model.backbone_file import read_backbone_file

        ckpt = read_backbone_file(root / checkpoint)
        source = (ckpt.get("weights") or {}).get("source_model")
    if isinstance(source, dict):
        out["source_model"] = source
    path = root / CURVE
    if path.is_file():
        try:
            s = json.loads(path.read_text(encoding="utf-8"))
            out["curve"] = {"file": CURVE.as_posix(), "name": s["name"], "metric": s["metric"], "arms": {
                arm: {"params": a.get("params") or {},
                      "points": [{k: v for k, v in p.items() if k != "runs"} for p in a["points"]]}
                for arm, a in s["arms"].items()}}
        except (OSError, ValueError, KeyError, TypeError):
            out["curve"] = {"file": CURVE.as_posix(), "error": "unreadable"}
    return out or None


def source_rows(t: dict | None) -> list[list[str]]:
    s = (t or {}).get("source_model")
    if not s:
        return []
    pre = s.get("preprocessing") or {}
    prov = s.get("provenance") or {}
    mismatch = s.get("preprocessing_mismatch") or []
    chained = s.get("weights") or {}
    return [
        ["source model sha256", str(s.get("sha256"))],
        ["architecture", str(s.get("arch"))],
        ["classes", ", ".join(map(str, s.get("classes") or []))],
        ["its preprocessing", f"{pre.get('image_size')} px, {pre.get('channels')} channel(s), resize {pre.get('resize')}, "
                              f"window {(pre.get('read') or {}).get('window')}"],
        ["its provenance record", f"{prov['file']} sha256 {prov['sha256']}" if prov else "none beside the file"],
        ["its own starting point", f"{chained.get('name')} (sha256 {chained.get('sha256')})" if chained else "not recorded"],
        ["preprocessing differences", "; ".join(f"{m['key']}: source {m['source']!r}, this project {m['this_project']!r}"
                                                for m in mismatch) or "none"],
    ]


def curve_rows(t: dict | None) -> tuple[list[str], list[list]]:
    c = (t or {}).get("curve")
    if not c or "arms" not in c:
        return [], []
    m = c["metric"]
    header = ["arm", "size", "images", "patients", "repeats", f"test {m}", "sd over repeats", "mean 95% CI"]
    rows = []
    for arm, a in c["arms"].items():
        label = arm + (" " + json.dumps(a["params"]) if a["params"] else "")
        for p in a["points"]:
            fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            rows.append([label, str(p.get("size")), f"{p.get('images') or 0:.0f}", f"{p.get('patients') or 0:.0f}",
                         str(p.get("repeats")), fmt(p.get(m)), fmt(p.get(f"{m}_sd")),
                         f"[{fmt(p.get(f'{m}_ci_low'))}, {fmt(p.get(f'{m}_ci_high'))}]"])
    return header, rows


def markdown(ev: dict) -> list[str]:
    t = ev.get("transfer")
    if not t:
        return []
    out = ["## Transfer", ""]
    if t.get("source_model"):
        out += ["The backbone (and the head, when the classes match) started from another medtl model:", "",
                md_table(["", ""], source_rows(t)), ""]
    header, rows = curve_rows(t)
    if rows:
        out += [f"Label-efficiency curve ({t['curve']['file']}):", "", md_table(header, rows), ""]
    return out


def html_context(ev: dict) -> dict | None:
    t = ev.get("transfer")
    if not t:
        return None
    header, rows = curve_rows(t)
    charts = []
    c = t.get("curve") or {}
    for arm, a in (c.get("arms") or {}).items():
        chart = line_chart(sorted(a["points"], key=lambda p: p.get("images") or 0), "images", c["metric"],
                            f"test {c['metric']}: {arm}", "labelled training images", f"test {c['metric']}")
        if chart:
            charts.append({"kind": "chart", "chart": chart, "caption": f"{arm} {json.dumps(a['params']) if a['params'] else ''}"})
    return {"source": source_rows(t), "curve_header": header, "curve_rows": rows, "charts": charts}
