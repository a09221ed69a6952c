"""The reviewer's model card: report.md and a self-contained report.html (no scripts, no external files)."""
from __future__ import annotations

import base64
import html
import json
import numbers
from collections import Counter
from pathlib import Path

import yaml

from medtl.provenance import card

MAX_TABLE_ROWS = 25


# ---- content shared by both renderings -------------------------------------------------

def checklist(ev: dict) -> list[dict]:
    """Evidence mapped to FDA GMLP principles and EU AI Act Annex IV items, each with a status."""
    src = ev.get("source_data") or {}
    w = ev.get("weights") or {}
    stages = {s["name"]: s for s in ev["stages"]}
    recorded = [n for n, s in stages.items() if s.get("record")]
    overlap = src.get("patients_in_several_splits")
    seeds = {k: v for s in stages.values() if s.get("record") for k, v in (s["record"].get("seeds") or {}).items()}
    items = [
        {
            "framework": "FDA GMLP", "item": "Data management: data sets are documented, traceable and versioned",
            "ok": bool(src),
            "evidence": f"source manifest {src.get('manifest')} (sha256 {str(src.get('manifest_sha256'))[:16]}…) lists {src.get('images')} source files with their sha256; every artifact is hashed in the lineage table and locked in dvc.lock" if src else "no source manifest found",
        },
        {
            "framework": "FDA GMLP", "item": "Training data sets are independent of test sets (split by patient)",
            "ok": overlap == 0,
            "evidence": (f"{src.get('patients_total')} patients; {overlap} patients appear in more than one split"
                         + (f" ({', '.join(f'{k}: {v}' for k, v in src.get('shared_between', {}).items())})" if overlap else "")) if src else "no manifest: independence cannot be shown",
        },
        {
            "framework": "FDA GMLP", "item": "Reference standard and evaluation: metrics with confidence intervals on held-out data",
            "ok": any(r["low"] is not None for r in card.metric_rows(ev.get("metrics") or {})),
            "evidence": f"{ev.get('metrics_path') or 'no metrics file'}: {sum(r['low'] is not None for r in card.metric_rows(ev.get('metrics') or {}))} metrics with intervals",
        },
        {
            "framework": "EU AI Act Annex IV 2(a)", "item": "Development methods and steps, including use of pre-trained systems",
            "ok": bool(w.get("name")) and len(recorded) == len(stages),
            "evidence": f"pipeline stages {' → '.join(stages)} with commands, params and records ({len(recorded)}/{len(stages)} recorded); pretrained weights {w.get('name') or 'unknown'} from {w.get('origin') or 'unknown origin'} (sha256 {str(w.get('sha256'))[:16]}…)",
        },
        {
            "framework": "EU AI Act Annex IV 2(b)/2(d)", "item": "Design choices and data requirements: data provenance, labelling, selection",
            "ok": bool(src) and bool(ev.get("params")),
            "evidence": "params.yaml sections " + ", ".join((ev.get("params") or {}).keys()) + (f"; source {json.dumps(src.get('description'))}" if src.get("description") else ""),
        },
        {
            "framework": "EU AI Act Annex IV 2(g)/3", "item": "Validation and testing procedures, metrics, logs, reproducibility",
            "ok": ev["workspace"]["clean"] and bool(ev["git"].get("commit")),
            "evidence": f"code commit {ev['git'].get('commit') or 'none'}; uv.lock sha256 {str(ev['environment'].get('uv_lock_sha256'))[:16]}…; seeds {json.dumps(seeds) if seeds else 'not recorded'}; workspace {'matches' if ev['workspace']['clean'] else 'does NOT match'} dvc.lock and git",
        },
    ]
    return items


def _safe_report_facts(report) -> list[tuple[str, str]]:
    """Counts from ingest's report.json; lists are counted (their items may name source files)."""
    facts = []
    if not isinstance(report, dict):
        return facts
    for k, v in report.items():
        if isinstance(v, bool) or isinstance(v, numbers.Number) or v is None:
            facts.append((k, card.fmt(v)))
        elif isinstance(v, list):
            reasons = Counter(str(i.get("reason")) for i in v if isinstance(i, dict) and i.get("reason"))
            facts.append((k, f"{len(v)}" + (f" ({', '.join(f'{r}: {n}' for r, n in reasons.most_common())})" if reasons else "")))
        elif isinstance(v, dict) and all(isinstance(x, (numbers.Number, type(None))) for x in v.values()):
            facts.append((k, ", ".join(f"{a}: {card.fmt(b)}" for a, b in v.items())))
        elif isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()) and all(
            isinstance(y, numbers.Number) for x in v.values() for y in x.values()
        ):
            facts.append((k, "; ".join(f"{a}: " + ", ".join(f"{c}={card.fmt(n)}" for c, n in x.items()) for a, x in v.items())))
    return facts


def _plot_rows(data):
    """The list of row dicts inside a dvc plots JSON file, with its name."""
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return data
    if isinstance(data, dict):
        for v in data.values():
            rows = _plot_rows(v)
            if rows:
                return rows
    return None


def _model_facts(ev: dict) -> list[tuple[str, str]]:
    m, w, exp, git = ev["model"], ev.get("weights") or {}, ev.get("experiment"), ev["git"]
    facts = [
        ("file", m["path"]), ("sha256", m["sha256"]), ("size", f"{m['size']} bytes"),
        ("architecture", str(m.get("arch", "n/a"))), ("classes", ", ".join(map(str, m.get("classes", [])))),
        ("input channels", str(m.get("in_channels", "n/a"))), ("parameters (state_dict elements)", str(m.get("parameters", "n/a"))),
        ("fine-tuning strategy", json.dumps(m.get("strategy")) if not isinstance(m.get("strategy"), str) else m["strategy"]),
        ("preprocessing", json.dumps(m.get("preprocessing"))),
        ("pretrained weights", f"{w.get('name') or 'n/a'} from {w.get('origin') or 'n/a'}, sha256 {w.get('sha256') or 'n/a'}"),
        ("domain adaptation", json.dumps(w.get("adaptation")) if w.get("adaptation") else "n/a"),
        ("code commit", f"{git.get('commit') or 'none'}" + (" (dirty working tree)" if git.get("dirty") else "")),
        ("experiment", f"{exp['name']} ({exp.get('ref') or 'no ref'})" if exp else "none (workspace run)"),
        ("audit generated", ev["generated"]),
    ]
    return facts


def _env_facts(ev: dict) -> list[tuple[str, str]]:
    e = ev["environment"]
    facts = [("python", f"{e.get('python')} ({e.get('implementation')})"), ("platform", str(e.get("platform")))]
    facts += [(k, str(v)) for k, v in (e.get("packages") or {}).items()]
    facts += [(f"accelerator.{k}", json.dumps(v) if not isinstance(v, str) else v) for k, v in (e.get("accelerator") or {}).items()]
    facts.append(("uv.lock sha256", str(e.get("uv_lock_sha256"))))
    if ev.get("hardware"):
        facts += [(f"hardware.{k}", json.dumps(v) if not isinstance(v, str) else v) for k, v in ev["hardware"].items()]
    facts.append(("locked packages", str(len(ev.get("packages") or []))))
    return facts


def _banner(ev: dict) -> list[str]:
    ws = ev["workspace"]
    if ws["clean"]:
        return []
    return ["WORKSPACE NOT CLEAN: this evidence does not describe a reproducible state."] + ws["problems"]


# ---- markdown ----------------------------------------------------------------------------

def _md_table(header: list[str], rows: list[list]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render_markdown(ev: dict) -> str:
    m, src = ev["model"], ev.get("source_data") or {}
    out = []
    banner = _banner(ev)
    if banner:
        out += ["> **" + banner[0] + "**", ">"] + [f"> - {p}" for p in banner[1:]] + [""]
    out += [f"# Model card: {m['path']}", ""]
    out += ["## Model details", "", _md_table(["", ""], _model_facts(ev)), ""]
    out += ["## Intended use", "", card.intended_use(ev), ""]
    for lim in card.limitations(ev):
        out.append(f"- Limitation: {lim}")
    out += ["", "## Data", ""]
    if src:
        classes = src["classes"]
        out += [f"{src['images']} images, {src['patients_total']} patients (pseudonymous groups). Manifest `{src['manifest']}` sha256 `{src['manifest_sha256']}`.", ""]
        rows = [[s] + [c.get(k, 0) for k in classes] + [sum(c.values()), src["patients_per_split"].get(s, 0)] for s, c in src["per_split_class"].items()]
        out += [_md_table(["split"] + classes + ["images", "patients"], rows), ""]
        out += [f"Patients in more than one split: **{src['patients_in_several_splits']}**.", ""]
        for col, table in src["subgroups"].items():
            values = sorted({v for c in table.values() for v in c})
            out += [f"Subgroup `{col}`:", "", _md_table(["split"] + values, [[s] + [c.get(v, 0) for v in values] for s, c in table.items()]), ""]
    facts = _safe_report_facts(ev.get("ingest_report"))
    if facts:
        out += ["Ingest report:", "", _md_table(["item", "value"], facts), ""]
    out += ["## Evaluation metrics", ""]
    rows = card.metric_rows(ev.get("metrics") or {})
    if rows:
        out += [_md_table(["metric", "value", "95% CI"], [[r["name"], card.fmt(r["value"]), f"{card.fmt(r['low'])} – {card.fmt(r['high'])}" if r["low"] is not None else ""] for r in rows]), ""]
    else:
        out += ["No metrics file found.", ""]
    for name, mat in card.matrices(ev.get("metrics") or {}).items():
        classes = m.get("classes") or [str(i) for i in range(len(mat))]
        labels = classes if len(classes) == len(mat) else [str(i) for i in range(len(mat))]
        out += [f"`{name}` (rows: true, columns: predicted):", "", _md_table([""] + labels, [[labels[i]] + row for i, row in enumerate(mat)]), ""]
    if ev.get("plots"):
        out += ["## Plots", ""] + [f"- [{p}](../../{p})" if not p.endswith((".png", ".svg")) else f"![{p}](../../{p})" for p in ev["plots"]] + [""]
    out += ["## Pipeline", "", "```mermaid", "graph LR"]
    out += [f"  {a}[{a}] -->|{art}| {b}[{b}]" for a, b, art in ev["edges"]] or [f"  {s['name']}" for s in ev["stages"]]
    out += ["```", ""]
    out += _md_table(["stage", "command", "record"], [[s["name"], s["cmd"], "yes" if s.get("record") else "MISSING"] for s in ev["stages"]]).splitlines() + [""]
    out += ["## Parameters", "", "```yaml", yaml.safe_dump(ev.get("params") or {}, sort_keys=False).rstrip(), "```", ""]
    out += ["## Environment", "", _md_table(["", ""], _env_facts(ev)), ""]
    out += ["## Lineage", "", "Every artifact with its sha256 (folders: sha256 over the file manifest) and the md5 DVC locked.", ""]
    lin = []
    for a in ev["artifacts"]:
        lin.append([a["path"], a["type"], a.get("stage") or "", a["sha256"], a.get("dvc_md5") or ""])
        for rel, sha in list(a.get("files", {}).items())[:MAX_TABLE_ROWS]:
            lin.append([f"{a['path']}/{rel}", "file", "", sha, ""])
    out += [_md_table(["artifact", "type", "stage", "sha256", "dvc md5"], lin), ""]
    out += ["## Regulatory checklist", "", _md_table(["framework", "item", "status", "evidence"], [[c["framework"], c["item"], "met" if c["ok"] else "NOT MET", c["evidence"]] for c in checklist(ev)]), ""]
    return "\n".join(out)


# ---- html --------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}code,.hash{font-family:ui-monospace,monospace;font-size:.85em;word-break:break-all}
.banner{background:#fde2e1;border:2px solid #c0392b;padding:.8em 1em;margin-bottom:1em}.ok{color:#1e7b34;font-weight:600}.bad{color:#c0392b;font-weight:600}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}figcaption{font-size:.85em;color:#555}pre{background:#f7f7f7;padding:.6em;overflow-x:auto}
"""


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _table(header: list[str] | None, rows: list[list], cls: str = "", raw_cols: tuple[int, ...] = ()) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c if i in raw_cols else _e(c)}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="{cls}">{head}{body}</table>'


def _line_chart(rows: list[dict], x: str, y: str, title: str) -> str:
    pts = [(float(r[x]), float(r[y])) for r in rows if isinstance(r.get(x), numbers.Real) and isinstance(r.get(y), numbers.Real)]
    w, h, pad = 320, 240, 36
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    sx = lambda v: pad + (v - x0) / ((x1 - x0) or 1) * (w - 2 * pad)  # noqa: E731
    sy = lambda v: h - pad - (v - y0) / ((y1 - y0) or 1) * (h - 2 * pad)  # noqa: E731
    poly = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in pts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{_e(title)}">'
        f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="none" stroke="#999"/>'
        f'<polyline points="{poly}" fill="none" stroke="#1f77b4" stroke-width="2"/>'
        f'<text x="{w / 2}" y="{h - 6}" text-anchor="middle" font-size="11">{_e(x)} [{x0:.3g}, {x1:.3g}]</text>'
        f'<text x="10" y="{h / 2}" font-size="11" transform="rotate(-90 10 {h / 2})" text-anchor="middle">{_e(y)} [{y0:.3g}, {y1:.3g}]</text>'
        f'<text x="{w / 2}" y="14" text-anchor="middle" font-size="12" font-weight="600">{_e(title)}</text></svg>'
    )


def _plot_html(root: Path, rel: str) -> str:
    p = root / rel
    if p.suffix.lower() in (".png", ".svg"):
        mime = "image/png" if p.suffix.lower() == ".png" else "image/svg+xml"
        # as an <img> data URI an SVG cannot run scripts; the report stays one file
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        return f'<figure><img alt="{_e(rel)}" src="data:{mime};base64,{data}" style="max-width:480px"><figcaption>{_e(rel)}</figcaption></figure>'
    try:
        rows = _plot_rows(json.loads(p.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return f"<p>{_e(rel)}: not readable JSON</p>"
    if not rows:
        return f"<p>{_e(rel)}: no rows</p>"
    keys = list(rows[0].keys())
    numeric = [k for k in keys if all(isinstance(r.get(k), numbers.Real) and not isinstance(r.get(k), bool) for r in rows)]
    if {"actual", "predicted"} <= set(keys):
        counts = Counter((str(r["actual"]), str(r["predicted"])) for r in rows)
        labels = sorted({a for a, _ in counts} | {b for _, b in counts})
        body = _table(["actual \\ predicted"] + labels, [[a] + [counts.get((a, b), 0) for b in labels] for a in labels])
        return f"<figure>{body}<figcaption>{_e(rel)} (counts)</figcaption></figure>"
    if len(numeric) >= 2:
        return f"<figure>{_line_chart(rows, numeric[0], numeric[1], Path(rel).stem)}<figcaption>{_e(rel)}</figcaption></figure>"
    body = _table(keys, [[card.fmt(r.get(k)) for k in keys] for r in rows[:MAX_TABLE_ROWS]])
    return f"<figure>{body}<figcaption>{_e(rel)}{' (first rows)' if len(rows) > MAX_TABLE_ROWS else ''}</figcaption></figure>"


def _graph_svg(ev: dict) -> str:
    names = [s["name"] for s in ev["stages"]]
    level = {n: 0 for n in names}
    for _ in names:  # longest-path layering; stages are few
        for a, b, _art in ev["edges"]:
            level[b] = max(level[b], level[a] + 1)
    cols: dict[int, list[str]] = {}
    for n in names:
        cols.setdefault(level[n], []).append(n)
    bw, bh, gx, gy = 130, 34, 60, 20
    pos = {n: (20 + lv * (bw + gx), 20 + i * (bh + gy)) for lv, ns in cols.items() for i, n in enumerate(ns)}
    w = 40 + (max(cols) + 1) * (bw + gx) if cols else 200
    h = 40 + max(len(v) for v in cols.values()) * (bh + gy) if cols else 80
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="pipeline graph">',
             '<defs><marker id="arr" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>']
    for a, b in sorted({(a, b) for a, b, _ in ev["edges"]}):
        (ax, ay), (bx, by) = pos[a], pos[b]
        parts.append(f'<line x1="{ax + bw}" y1="{ay + bh / 2}" x2="{bx}" y2="{by + bh / 2}" stroke="#555" marker-end="url(#arr)"/>')
    for n, (x, y) in pos.items():
        parts.append(f'<rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="6" fill="#eef4fb" stroke="#1f77b4"/>'
                     f'<text x="{x + bw / 2}" y="{y + bh / 2 + 4}" text-anchor="middle" font-size="12">{_e(n)}</text>')
    return "".join(parts) + "</svg>"


def render_html(ev: dict, root: Path) -> str:
    m, src = ev["model"], ev.get("source_data") or {}
    b = []
    banner = _banner(ev)
    if banner:
        b.append(f'<div class="banner" id="workspace-warning"><strong>{_e(banner[0])}</strong><ul>' + "".join(f"<li>{_e(p)}</li>" for p in banner[1:]) + "</ul></div>")
    b.append(f"<h1>Model card: {_e(m['path'])}</h1>")
    b.append("<h2>Model details</h2>" + _table(None, _model_facts(ev)))
    b.append(f"<h2>Intended use</h2><p>{_e(card.intended_use(ev))}</p>" + "".join(f"<p><em>Limitation:</em> {_e(x)}</p>" for x in card.limitations(ev)))
    b.append("<h2>Data</h2>")
    if src:
        classes = src["classes"]
        b.append(f"<p>{src['images']} images, {src['patients_total']} patients (pseudonymous groups). Manifest <code>{_e(src['manifest'])}</code>, sha256 <span class=hash>{_e(src['manifest_sha256'])}</span>.</p>")
        rows = [[s] + [c.get(k, 0) for k in classes] + [sum(c.values()), src["patients_per_split"].get(s, 0)] for s, c in src["per_split_class"].items()]
        b.append(_table(["split"] + classes + ["images", "patients"], rows, "data-summary"))
        cls = "ok" if src["patients_in_several_splits"] == 0 else "bad"
        b.append(f'<p>Patients in more than one split: <span class="{cls}">{src["patients_in_several_splits"]}</span></p>')
        for col, table in src["subgroups"].items():
            values = sorted({v for c in table.values() for v in c})
            b.append(f"<p>Subgroup <code>{_e(col)}</code></p>" + _table(["split"] + values, [[s] + [c.get(v, 0) for v in values] for s, c in table.items()]))
    facts = _safe_report_facts(ev.get("ingest_report"))
    if facts:
        b.append("<p>Ingest report</p>" + _table(["item", "value"], facts))
    b.append("<h2>Evaluation metrics</h2>")
    rows = card.metric_rows(ev.get("metrics") or {})
    if rows:
        b.append(_table(["metric", "value", "95% CI"], [[r["name"], card.fmt(r["value"]), f"{card.fmt(r['low'])} – {card.fmt(r['high'])}" if r["low"] is not None else ""] for r in rows], "metrics"))
    else:
        b.append("<p>No metrics file found.</p>")
    for name, mat in card.matrices(ev.get("metrics") or {}).items():
        classes = m.get("classes") or []
        labels = classes if len(classes) == len(mat) else [str(i) for i in range(len(mat))]
        b.append(f"<p><code>{_e(name)}</code> (rows: true, columns: predicted)</p>" + _table([""] + labels, [[labels[i]] + row for i, row in enumerate(mat)], "confusion"))
    if ev.get("plots"):
        b.append('<h2>Plots</h2><div class="plots">' + "".join(_plot_html(root, p) for p in ev["plots"]) + "</div>")
    b.append("<h2>Pipeline</h2>" + _graph_svg(ev))
    b.append(_table(["stage", "command", "record"], [[s["name"], s["cmd"], "yes" if s.get("record") else "MISSING"] for s in ev["stages"]]))
    b.append("<h2>Parameters</h2><pre>" + _e(yaml.safe_dump(ev.get("params") or {}, sort_keys=False)) + "</pre>")
    b.append("<h2>Environment</h2>" + _table(None, _env_facts(ev)))
    lin = []
    for a in ev["artifacts"]:
        files = a.get("files") or {}
        detail = ""
        if files:
            detail = "<details><summary>" + f"{len(files)} files</summary>" + _table(None, [[rel, f"<span class=hash>{_e(sha)}</span>"] for rel, sha in files.items()], raw_cols=(1,)) + "</details>"
        lin.append([_e(a["path"]) + detail, _e(a["type"]), _e(a.get("stage") or ""), f"<span class=hash>{_e(a['sha256'])}</span>", f"<span class=hash>{_e(a.get('dvc_md5') or '')}</span>"])
    b.append("<h2>Lineage</h2><p>Every artifact with its sha256 (folders: sha256 over the file manifest) and the md5 DVC locked.</p>"
             + _table(["artifact", "type", "stage", "sha256", "dvc md5"], lin, "lineage", raw_cols=(0, 1, 2, 3, 4)))
    b.append("<h2>Regulatory checklist</h2>" + _table(
        ["framework", "item", "status", "evidence"],
        [[_e(c["framework"]), _e(c["item"]), f'<span class="{"ok" if c["ok"] else "bad"}">{"met" if c["ok"] else "NOT MET"}</span>', _e(c["evidence"])] for c in checklist(ev)],
        "checklist", raw_cols=(0, 1, 2, 3)))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Model card: {_e(m["path"])}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(b) + "\n</body></html>\n")
