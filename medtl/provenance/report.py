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
            "ok": bool(card.headline(ev.get("metrics") or {})[0]),
            "evidence": f"{ev.get('metrics_path') or 'no metrics file'}: {len(card.headline(ev.get('metrics') or {})[0])} metrics with 95% intervals"
                        + (f" on the {ev['metrics']['split']} split" if isinstance(ev.get("metrics"), dict) and ev["metrics"].get("split") else ""),
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
            facts.append((k, ", ".join(f"{a}: {card.fmt(b)}" for a, b in v.items()) or "none"))
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


def _weights_text(w: dict) -> str:
    if not w:
        return "not recorded"
    if str(w.get("name")) == "none":
        return "none: the backbone was trained from random initialisation"
    return f"{w.get('name')} from {w.get('origin') or 'unknown origin'}, sha256 {w.get('sha256') or 'not pinned'}"


def _adaptation_text(a) -> str:
    if not isinstance(a, dict):
        return "not recorded"
    hw = a.get("hardware") if isinstance(a.get("hardware"), dict) else {}
    rest = {k: v for k, v in a.items() if k not in ("method", "hardware")}
    text = str(a.get("method", "n/a"))
    if hw:
        text += f" (on {hw.get('device', '?')}/{hw.get('precision', '?')})"
    return text + (f"; {json.dumps(rest)}" if rest else "")


def _model_facts(ev: dict) -> list[tuple[str, str]]:
    m, w, exp, git = ev["model"], ev.get("weights") or {}, ev.get("experiment"), ev["git"]
    facts = [
        ("file", m["path"]), ("sha256", m["sha256"]), ("size", f"{m['size']} bytes"),
        ("architecture", str(m.get("arch", "n/a"))), ("classes", ", ".join(map(str, m.get("classes", [])))),
        ("input channels", str(m.get("in_channels", "n/a"))), ("parameters (state_dict elements)", str(m.get("parameters", "n/a"))),
        ("fine-tuning strategy", json.dumps(m.get("strategy")) if not isinstance(m.get("strategy"), str) else m["strategy"]),
        ("preprocessing", json.dumps(m.get("preprocessing"))),
        ("pretrained weights", _weights_text(w)),
        ("domain adaptation", _adaptation_text(w.get("adaptation"))),
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
    with_ci, facts_m = card.headline(ev.get("metrics") or {})
    if with_ci or facts_m:
        out += [f"From `{ev.get('metrics_path')}`.", ""]
    if with_ci:
        out += [_md_table(["metric", "value", "95% CI"], [[r["name"], card.fmt(r["value"]), card.ci_text(r)] for r in with_ci]), ""]
    if facts_m:
        out += [_md_table(["fact", "value"], [[r["name"], card.fmt(r["value"])] for r in facts_m]), ""]
    if not with_ci and not facts_m:
        out += ["No metrics file found.", ""]
    details = ev.get("evaluation") or {}
    header, rows = card.per_class(details)
    if rows:
        out += ["Per class:", "", _md_table(header, rows), ""]
    cm = card.confusion(ev)
    if cm:
        labels, mat = cm
        out += ["Confusion matrix (rows: true, columns: predicted):", "", _md_table([""] + labels, [[labels[i]] + list(row) for i, row in enumerate(mat)]), ""]
    subs = card.subgroups(details)
    if subs:
        out += ["Subgroups:", "", _md_table(["subgroup", "value", "images", "patients", "ROC AUC", "95% CI", "flag"],
                                            [[x["column"], x["value"], card.fmt(x["n"]), card.fmt(x["patients"]), card.fmt(x["metric"]), card.ci_text(x), x["flag"]] for x in subs]), ""]
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
:root{--ink:#1d2433;--muted:#5b6476;--line:#d9dee7;--soft:#f5f7fa;--accent:#1f5fa8;--ok:#1e7b34;--bad:#b42318}
*{box-sizing:border-box}
body{font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--ink);margin:0;background:#fff}
header.top{background:#17324d;color:#fff;padding:22px 0 18px}
.wrap{max-width:1120px;margin:0 auto;padding:0 28px}
header.top h1{margin:0 0 4px;font-size:24px;font-weight:650;letter-spacing:.2px}
header.top .sub{color:#c8d6e5;font-size:13px}
.badge{display:inline-block;border-radius:999px;padding:2px 10px;font-size:12px;font-weight:600;margin-left:8px;vertical-align:middle}
.badge.ok{background:#d7f0dd;color:#14532d}.badge.bad{background:#fde2e1;color:#8a1c12}
nav.toc{border-bottom:1px solid var(--line);background:var(--soft);font-size:13px}
nav.toc a{color:var(--accent);text-decoration:none;margin-right:16px;line-height:38px;white-space:nowrap}
main{padding:8px 0 40px}
h2{font-size:18px;margin:32px 0 10px;padding-bottom:6px;border-bottom:2px solid var(--line)}
h3{font-size:14px;margin:18px 0 6px;color:var(--muted);text-transform:uppercase;letter-spacing:.5px}
.cards{display:grid;grid-template-columns:repeat(4,1fr);gap:12px;margin:18px 0 6px}
.card{border:1px solid var(--line);border-radius:8px;padding:12px 14px;background:#fff}
.card .k{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.4px}
.card .v{font-size:20px;font-weight:650;margin-top:2px}.card .d{font-size:12px;color:var(--muted)}
table{border-collapse:collapse;margin:6px 0 14px;font-size:13px}
td,th{border-bottom:1px solid var(--line);padding:5px 10px;text-align:left;vertical-align:top}
th{background:var(--soft);font-weight:600;border-top:1px solid var(--line)}
table.kv td:first-child{color:var(--muted);white-space:nowrap;width:220px}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
code,.hash,pre{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace;font-size:12px}
.hash{word-break:break-all;color:#334}
pre.params{column-count:3;column-gap:24px}
pre{background:var(--soft);border:1px solid var(--line);border-radius:6px;padding:10px;overflow-x:auto}
.banner{background:#fde2e1;border:2px solid var(--bad);border-radius:8px;padding:12px 16px;margin:18px 0}
.banner strong{color:var(--bad)}
.ok{color:var(--ok);font-weight:600}.bad{color:var(--bad);font-weight:600}.muted{color:var(--muted)}
.grid{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;border:1px solid var(--line);border-radius:8px;padding:10px;background:#fff}
figcaption{font-size:12px;color:var(--muted);margin-top:4px}
.gallery figure img{width:150px;height:150px;object-fit:contain;image-rendering:pixelated;background:#000;display:block}
details summary{cursor:pointer;color:var(--accent)}
footer{color:var(--muted);font-size:12px;border-top:1px solid var(--line);padding:14px 0;margin-top:24px}
@media print{nav.toc{display:none}header.top{background:#fff;color:#000}header.top .sub{color:#333}}
"""

_SECTIONS = [("details", "Model"), ("use", "Intended use"), ("data", "Data"), ("evaluation", "Evaluation"),
             ("plots", "Plots"), ("pipeline", "Pipeline"), ("params", "Parameters"), ("environment", "Environment"),
             ("lineage", "Lineage"), ("checklist", "Regulatory checklist")]


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _table(header: list[str] | None, rows: list[list], cls: str = "", raw_cols: tuple[int, ...] = (), num_cols: tuple[int, ...] = ()) -> str:
    def cell(tag: str, i: int, c) -> str:
        klass = ' class="num"' if i in num_cols else ""
        return f"<{tag}{klass}>{c if (tag == 'td' and i in raw_cols) else _e(c)}</{tag}>"

    head = "<thead><tr>" + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def _ci_bar(r: dict) -> str:
    """The point estimate and its interval drawn on [0, 1], for metrics that live there."""
    vals = (r["value"], r["low"], r["high"])
    if not all(isinstance(v, numbers.Real) and 0 <= v <= 1 for v in vals):
        return ""
    w, x = 160, lambda v: 4 + v * 152  # noqa: E731
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="14" role="img" aria-label="interval">'
            f'<line x1="4" y1="7" x2="156" y2="7" stroke="#e3e7ee" stroke-width="6" stroke-linecap="round"/>'
            f'<line x1="{x(r["low"]):.1f}" y1="7" x2="{x(r["high"]):.1f}" y2="7" stroke="#8fb3dd" stroke-width="6" stroke-linecap="round"/>'
            f'<circle cx="{x(r["value"]):.1f}" cy="7" r="4" fill="#1f5fa8"/></svg>')


# how the plot files evaluate writes are drawn: (x, y, title, x label, y label, diagonal)
_CHARTS = [
    ({"fpr", "tpr"}, "fpr", "tpr", "ROC curve", "false positive rate (1 − specificity)", "true positive rate (sensitivity)", True),
    ({"recall", "precision"}, "recall", "precision", "Precision–recall curve", "recall (sensitivity)", "precision (PPV)", False),
    ({"mean_predicted", "observed"}, "mean_predicted", "observed", "Reliability (calibration)", "mean predicted probability", "observed frequency", True),
]


def _line_chart(rows: list[dict], x: str, y: str, title: str, xlabel: str = "", ylabel: str = "", diagonal: bool = False) -> str:
    pts = [(float(r[x]), float(r[y])) for r in rows if isinstance(r.get(x), numbers.Real) and isinstance(r.get(y), numbers.Real)]
    if not pts:
        return ""
    w, h, left, right, top, bottom = 340, 280, 48, 14, 28, 44
    unit = all(0 <= a <= 1 and 0 <= b <= 1 for a, b in pts)
    x0, x1 = (0.0, 1.0) if unit else (min(p[0] for p in pts), max(p[0] for p in pts))
    y0, y1 = (0.0, 1.0) if unit else (min(p[1] for p in pts), max(p[1] for p in pts))
    sx = lambda v: left + (v - x0) / ((x1 - x0) or 1) * (w - left - right)  # noqa: E731
    sy = lambda v: h - bottom - (v - y0) / ((y1 - y0) or 1) * (h - top - bottom)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{_e(title)}" font-family="system-ui,sans-serif">',
             f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13" font-weight="600" fill="#1d2433">{_e(title)}</text>']
    for i in range(5):
        tx, ty = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        parts.append(f'<line x1="{left}" y1="{sy(ty):.1f}" x2="{w - right}" y2="{sy(ty):.1f}" stroke="#edf0f4"/>'
                     f'<line x1="{sx(tx):.1f}" y1="{top}" x2="{sx(tx):.1f}" y2="{h - bottom}" stroke="#edf0f4"/>'
                     f'<text x="{sx(tx):.1f}" y="{h - bottom + 14}" text-anchor="middle" font-size="10" fill="#5b6476">{tx:.3g}</text>'
                     f'<text x="{left - 6}" y="{sy(ty) + 3:.1f}" text-anchor="end" font-size="10" fill="#5b6476">{ty:.3g}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" fill="none" stroke="#9aa4b2"/>')
    if diagonal:
        parts.append(f'<line x1="{sx(x0):.1f}" y1="{sy(y0):.1f}" x2="{sx(x1):.1f}" y2="{sy(y1):.1f}" stroke="#9aa4b2" stroke-dasharray="4 4"/>')
    poly = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in pts)
    parts.append(f'<polyline points="{poly}" fill="none" stroke="#1f5fa8" stroke-width="2" stroke-linejoin="round"/>')
    if len(pts) <= 20:
        parts += [f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="2.5" fill="#1f5fa8"/>' for a, b in pts]
    parts.append(f'<text x="{left + (w - left - right) / 2}" y="{h - 8}" text-anchor="middle" font-size="11" fill="#1d2433">{_e(xlabel or x)}</text>'
                 f'<text x="12" y="{top + (h - top - bottom) / 2}" font-size="11" fill="#1d2433" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + (h - top - bottom) / 2})">{_e(ylabel or y)}</text></svg>')
    return "".join(parts)


def _image(root: Path, rel: str, caption: str) -> str:
    p = root / rel
    mime = "image/png" if p.suffix.lower() == ".png" else "image/svg+xml"
    # as an <img> data URI an SVG cannot run scripts; the report stays one file
    data = base64.b64encode(p.read_bytes()).decode("ascii")
    return f'<figure><img alt="{_e(rel)}" src="data:{mime};base64,{data}"><figcaption>{_e(caption)}</figcaption></figure>'


def _plot_html(root: Path, rel: str) -> str:
    p = root / rel
    if p.suffix.lower() in (".png", ".svg"):
        return _image(root, rel, rel)
    try:
        rows = _plot_rows(json.loads(p.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return f"<figure><p>{_e(rel)}: not readable JSON</p></figure>"
    if not rows:
        return f"<figure><p class=muted>{_e(rel)}: no rows (e.g. a single class in the split)</p></figure>"
    keys = list(rows[0].keys())
    if {"actual", "predicted"} <= set(keys):
        counts = Counter((str(r["actual"]), str(r["predicted"])) for r in rows)
        labels = sorted({a for a, _ in counts} | {b for _, b in counts})
        body = _table(["actual \\ predicted"] + labels, [[a] + [counts.get((a, b), 0) for b in labels] for a in labels], num_cols=tuple(range(1, len(labels) + 1)))
        return f"<figure>{body}<figcaption>{_e(rel)} (image counts)</figcaption></figure>"
    for need, x, y, title, xl, yl, diag in _CHARTS:
        if need <= set(keys):
            return f"<figure>{_line_chart(rows, x, y, title, xl, yl, diag)}<figcaption>{_e(rel)}</figcaption></figure>"
    numeric = [k for k in keys if all(isinstance(r.get(k), numbers.Real) and not isinstance(r.get(k), bool) for r in rows)]
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
    bw, bh, gx, gy = 130, 36, 56, 20
    pos = {n: (10 + lv * (bw + gx), 10 + i * (bh + gy)) for lv, ns in cols.items() for i, n in enumerate(ns)}
    w = 20 + (max(cols) + 1) * (bw + gx) - gx if cols else 200
    h = 20 + max(len(v) for v in cols.values()) * (bh + gy) - gy if cols else 80
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="pipeline graph" font-family="system-ui,sans-serif">',
             '<defs><marker id="arr" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#5b6476"/></marker></defs>']
    for a, b in sorted({(a, b) for a, b, _ in ev["edges"]}):
        (ax, ay), (bx, by) = pos[a], pos[b]
        parts.append(f'<path d="M{ax + bw},{ay + bh / 2} C{ax + bw + gx / 2},{ay + bh / 2} {bx - gx / 2},{by + bh / 2} {bx - 2},{by + bh / 2}" '
                     'fill="none" stroke="#5b6476" marker-end="url(#arr)"/>')
    recorded = {s["name"] for s in ev["stages"] if s.get("record")}
    for n, (x, y) in pos.items():
        stroke = "#1f5fa8" if n in recorded else "#b42318"
        parts.append(f'<rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="7" fill="#eef4fb" stroke="{stroke}" stroke-width="1.5"/>'
                     f'<text x="{x + bw / 2}" y="{y + bh / 2 + 4}" text-anchor="middle" font-size="12" fill="#1d2433">{_e(n)}</text>')
    return "".join(parts) + "</svg>"


def _cards(ev: dict) -> str:
    m, src = ev["model"], ev.get("source_data") or {}
    with_ci, _ = card.headline(ev.get("metrics") or {})
    main_metric = next((r for r in with_ci if r["name"] in ("roc_auc", "auc")), with_ci[0] if with_ci else None)
    split = (ev.get("metrics") or {}).get("split") if isinstance(ev.get("metrics"), dict) else None
    n = (ev.get("metrics") or {}).get("n") if isinstance(ev.get("metrics"), dict) else None
    cards = [
        ("model", str(m.get("arch", "n/a")), f"{len(m.get('classes') or [])} classes · {m.get('parameters', 'n/a')} parameters"),
        (main_metric["name"].replace("roc_auc", "ROC AUC").replace("_", " ") if main_metric else "metrics", card.fmt(main_metric["value"], 3) if main_metric else "n/a",
         (f"95% CI {card.fmt(main_metric['low'], 3)} – {card.fmt(main_metric['high'], 3)}" if main_metric else "no metrics file")
         + (f" · {split} split, {n} images" if split and n is not None else "")),
        ("data", f"{src.get('images', 'n/a')} images", f"{src.get('patients_total', 'n/a')} patients · {src.get('patients_in_several_splits', 'n/a')} in several splits"),
        ("code", str(ev["git"].get("commit") or "none")[:12], "dirty working tree" if ev["git"].get("dirty") else "clean git tree"),
    ]
    return '<div class="cards">' + "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div><div class="d">{_e(d)}</div></div>' for k, v, d in cards) + "</div>"


def _evaluation_html(ev: dict) -> list[str]:
    b = []
    metrics = ev.get("metrics") or {}
    details = ev.get("evaluation") or {}
    with_ci, facts = card.headline(metrics)
    if not with_ci and not facts:
        return ["<p>No metrics file found.</p>"]
    where = f"<code>{_e(ev.get('metrics_path'))}</code>"
    boot = details.get("bootstrap") if isinstance(details, dict) else None
    if isinstance(boot, dict):
        where += (f"; 95% intervals by {_e(boot.get('method', 'bootstrap'))} bootstrap over {_e(boot.get('unit', 'image'))}s "
                  f"({_e(boot.get('n_units', '?'))} units, {_e(boot.get('n_resamples', '?'))} resamples)")
    b.append(f"<p>From {where}.</p>")
    if with_ci:
        b.append(_table(["metric", "value", "95% CI", ""], [[r["name"], card.fmt(r["value"]), card.ci_text(r), _ci_bar(r)] for r in with_ci],
                        "metrics", raw_cols=(3,), num_cols=(1,)))
    if facts:
        b.append("<h3>Evaluation facts</h3>" + _table(None, [[r["name"], card.fmt(r["value"])] for r in facts], "kv"))
    op = details.get("operating_point") if isinstance(details, dict) else None
    if isinstance(op, dict):
        b.append("<h3>Operating point</h3>" + _table(None, [[k, card.fmt(v)] for k, v in op.items() if not isinstance(v, (dict, list))], "kv"))
    header, rows = card.per_class(details)
    if rows:
        b.append("<h3>Per class</h3>" + _table(header, rows, "per-class", num_cols=tuple(range(1, len(header)))))
    cm = card.confusion(ev)
    if cm:
        labels, mat = cm
        b.append("<h3>Confusion matrix (rows: true class, columns: predicted)</h3>"
                 + _table([""] + labels, [[labels[i]] + list(row) for i, row in enumerate(mat)], "confusion", num_cols=tuple(range(1, len(labels) + 1))))
    cal = details.get("calibration") if isinstance(details, dict) else None
    if isinstance(cal, dict):
        b.append("<h3>Calibration</h3>" + _table(None, [[k, card.fmt(v)] for k, v in cal.items() if not isinstance(v, (dict, list))], "kv"))
    subs = card.subgroups(details)
    if subs:
        b.append("<h3>Subgroups (ROC AUC with 95% CI)</h3>" + _table(
            ["subgroup", "value", "images", "patients", "ROC AUC", "95% CI", "flag"],
            [[s["column"], s["value"], card.fmt(s["n"]), card.fmt(s["patients"]), card.fmt(s["metric"]), card.ci_text(s), s["flag"]] for s in subs],
            "subgroups", num_cols=(2, 3, 4)))
    return b


def _plots_html(ev: dict, root: Path) -> str:
    charts = [p for p in ev.get("plots") or [] if not p.lower().endswith((".png", ".svg"))]
    images = [p for p in ev.get("plots") or [] if p.lower().endswith((".png", ".svg"))]
    out = []
    if charts:
        out.append('<div class="grid">' + "".join(_plot_html(root, p) for p in charts) + "</div>")
    if images:
        shown = images[:MAX_IMAGES]
        out.append("<h3>Saliency and other images</h3><p class=muted>File names give the outcome (TP, FP, TN, FN) and the image id; "
                   "the images are derived from pixels only.</p>")
        out.append('<div class="grid gallery">' + "".join(_image(root, p, Path(p).name) for p in shown) + "</div>")
        if len(images) > len(shown):
            out.append(f"<p class=muted>{len(images) - len(shown)} more images not shown.</p>")
    return "".join(out) or "<p>No plots found.</p>"


MAX_IMAGES = 24


def render_html(ev: dict, root: Path) -> str:
    m, src = ev["model"], ev.get("source_data") or {}
    ws = ev["workspace"]
    b = []
    status = '<span class="badge ok">workspace matches dvc.lock and git</span>' if ws["clean"] else '<span class="badge bad">workspace not clean</span>'
    b.append(f'<header class="top"><div class="wrap"><h1>Model card: {_e(m["path"])}{status}</h1>'
             f'<div class="sub">sha256 <span class="hash" style="color:#c8d6e5">{_e(m["sha256"])}</span> · audit generated {_e(ev["generated"])} '
             f'· verify offline with <code>medtl verify reports/audit/provenance.json</code></div></div></header>')
    b.append('<nav class="toc"><div class="wrap">' + "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in _SECTIONS) + "</div></nav>")
    b.append('<main><div class="wrap">')
    banner = _banner(ev)
    if banner:
        b.append(f'<div class="banner" id="workspace-warning"><strong>{_e(banner[0])}</strong><ul>' + "".join(f"<li>{_e(p)}</li>" for p in banner[1:]) + "</ul></div>")
    b.append(_cards(ev))
    b.append('<h2 id="details">Model details</h2>' + _table(None, _model_facts(ev), "kv"))
    b.append(f'<h2 id="use">Intended use</h2><p>{_e(card.intended_use(ev))}</p>')
    mc = ev.get("model_card") or {}
    extra = [[k.replace("_", " "), v if isinstance(v, str) else ", ".join(map(str, v)) if isinstance(v, list) else json.dumps(v)]
             for k, v in mc.items() if k not in ("intended_use", "limitations")]
    if extra:
        b.append(_table(None, extra, "kv"))
    lims = card.limitations(ev)
    if lims:
        b.append("<h3>Limitations</h3><ul>" + "".join(f"<li>{_e(x)}</li>" for x in lims) + "</ul>")
    b.append('<h2 id="data">Data</h2>')
    if src:
        classes = src["classes"]
        b.append(f"<p>{src['images']} images from {src['patients_total']} patients (pseudonymous groups). Source manifest <code>{_e(src['manifest'])}</code>, "
                 f"sha256 <span class=hash>{_e(src['manifest_sha256'])}</span>.</p>")
        rows = [[s] + [c.get(k, 0) for k in classes] + [sum(c.values()), src["patients_per_split"].get(s, 0)] for s, c in src["per_split_class"].items()]
        b.append(_table(["split"] + classes + ["images", "patients"], rows, "data-summary", num_cols=tuple(range(1, len(classes) + 3))))
        cls = "ok" if src["patients_in_several_splits"] == 0 else "bad"
        b.append(f'<p>Patients in more than one split: <span class="{cls}">{src["patients_in_several_splits"]}</span> '
                 '(training and test data are independent at the patient level when this is 0).</p>')
        for col, table in src["subgroups"].items():
            values = sorted({v for c in table.values() for v in c})
            b.append(f"<h3>Subgroup: {_e(col)}</h3>" + _table(["split"] + values, [[s] + [c.get(v, 0) for v in values] for s, c in table.items()],
                                                              num_cols=tuple(range(1, len(values) + 1))))
    else:
        b.append("<p class=bad>No source manifest: the training data cannot be traced to source files.</p>")
    facts = _safe_report_facts(ev.get("ingest_report"))
    if facts:
        b.append("<h3>Ingest report</h3>" + _table(None, facts, "kv"))
    b.append('<h2 id="evaluation">Evaluation</h2>' + "".join(_evaluation_html(ev)))
    b.append('<h2 id="plots">Plots</h2>' + _plots_html(ev, root))
    stage_rows = []
    for s in ev["stages"]:
        r = s.get("record") or {}
        stage_rows.append([s["name"], f"<code>{_e(s['cmd'])}</code>", _e(r.get("started", "")), _e(card.fmt(r.get("duration_s")) + " s" if r else ""),
                           '<span class="ok">yes</span>' if r else '<span class="bad">MISSING</span>'])
    b.append('<h2 id="pipeline">Pipeline</h2>' + _graph_svg(ev)
             + _table(["stage", "command", "started (UTC)", "duration", "record"], stage_rows, raw_cols=(1, 2, 3, 4)))
    b.append('<h2 id="params">Parameters</h2><pre class="params">' + _e(yaml.safe_dump(ev.get("params") or {}, sort_keys=False)) + "</pre>")
    b.append('<h2 id="environment">Environment</h2>' + _table(None, _env_facts(ev), "kv"))
    lin = []
    for a in ev["artifacts"]:
        files = a.get("files") or {}
        detail = ""
        if files:
            detail = f"<details><summary>{len(files)} files</summary>" + _table(None, [[rel, f"<span class=hash>{_e(sha)}</span>"] for rel, sha in files.items()], raw_cols=(1,)) + "</details>"
        lin.append([_e(a["path"]) + detail, _e(a["type"]), _e(a.get("stage") or ""), f"<span class=hash>{_e(a['sha256'])}</span>", f"<span class=hash>{_e(a.get('dvc_md5') or '')}</span>"])
    b.append('<h2 id="lineage">Lineage</h2><p>Every artifact with its sha256 (folders: sha256 over the file manifest) and the md5 DVC locked.</p>'
             + _table(["artifact", "type", "stage", "sha256", "dvc md5"], lin, "lineage", raw_cols=(0, 1, 2, 3, 4)))
    b.append('<h2 id="checklist">Regulatory checklist</h2>' + _table(
        ["framework", "item", "status", "evidence"],
        [[_e(c["framework"]), _e(c["item"]), f'<span class="{"ok" if c["ok"] else "bad"}">{"met" if c["ok"] else "NOT MET"}</span>', _e(c["evidence"])] for c in checklist(ev)],
        "checklist", raw_cols=(0, 1, 2, 3)))
    b.append(f'<footer>Written by <code>medtl audit</code>. The machine-readable evidence beside this file: provenance.json (in-toto Statement v1, SLSA Provenance v1) '
             f'and ml-bom.json (CycloneDX {_e("1.6")}).</footer></div></main>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>Model card: {_e(m["path"])}</title><style>{_CSS}</style></head><body>\n' + "\n".join(b) + "\n</body></html>\n")
