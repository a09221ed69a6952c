"""The reviewer's model card: report.md and a self-contained report.html (no scripts, no external files).

report.html is rendered from templates/report.html by Jinja2 with autoescaping.
"""
from __future__ import annotations

import base64
import json
import numbers
from collections import Counter
from pathlib import Path

import yaml

from medtl.provenance import card, report_robustness, transfer
from medtl.provenance.charts import line_chart, md_table

MAX_TABLE_ROWS = 25


# ---- content shared by both renderings -------------------------------------------------

PRESENT, MISSING, NOT_APPLICABLE = "evidence present", "missing", "not applicable"


def checklist(ev: dict) -> list[dict]:
    """Evidence mapped to FDA GMLP principles and EU AI Act Annex IV items.

    Each item says whether evidence is present, missing or not applicable, never
    that a requirement is met: that judgement is the reviewer's. `concern` marks
    evidence that is present but shows a problem (e.g. the public pseudonym key on
    real data).
    """
    src = ev.get("source_data") or {}
    w = ev.get("weights") or {}
    stages = {s["name"]: s for s in ev["stages"]}
    recorded = [n for n, s in stages.items() if s.get("record")]
    overlap = src.get("patients_in_several_splits")
    seeds = {k: v for s in stages.values() if s.get("record") for k, v in (s["record"].get("seeds") or {}).items()}
    group = card.grouping(ev)
    with_ci = card.headline(ev.get("metrics") or {})[0]
    key_text, key_concern = card.pseudonym_key(ev)
    kept, allowed = card.identifier_columns(ev)
    subs = card.subgroups(ev.get("evaluation") or {})
    external = [r for r in card.validation_sets(ev.get("evaluation") or {}) if r["kind"] == "external"]
    mc = ev.get("model_card") or {}

    def item(framework, what, status, evidence, concern=False):
        return {"framework": framework, "item": what, "status": status, "evidence": evidence, "concern": concern or status == MISSING}

    if not src:
        split = item("FDA GMLP", "Training data sets are independent of test sets (split by patient)", MISSING, "no manifest: independence cannot be shown")
    elif not group["patient_level"]:
        split = item("FDA GMLP", "Training data sets are independent of test sets (split by patient)", MISSING,
                     f"{group['text']}; {src.get('images')} images split image by image")
    else:
        shared = f" ({', '.join(f'{k}: {v}' for k, v in src.get('shared_between', {}).items())})" if overlap else ""
        split = item("FDA GMLP", "Training data sets are independent of test sets (split by patient)", PRESENT if overlap == 0 else MISSING,
                     f"{src.get('patients_total')} patients ({group['text']}); {overlap} patients appear in more than one split{shared}")
    if card.demo_card_on_real_data(ev):
        use = item("EU AI Act Annex IV 1(a)", "Intended purpose stated for this model", MISSING,
                   f"the model card is the shipped demo text, unedited, but the model was trained on {card.data_source(ev)} data: edit model_card in params.yaml")
    elif mc.get("intended_use"):
        use = item("EU AI Act Annex IV 1(a)", "Intended purpose stated for this model", PRESENT, "model_card.intended_use in params.yaml (see Intended use)")
    else:
        use = item("EU AI Act Annex IV 1(a)", "Intended purpose stated for this model", MISSING, "no model_card.intended_use in params.yaml")
    return [
        item("FDA GMLP", "Data management: data sets are documented, traceable and versioned", PRESENT if src else MISSING,
             f"source manifest {src.get('manifest')} (sha256 {str(src.get('manifest_sha256'))[:16]}…) lists {src.get('images')} source files by "
             "pseudonym with their sha256; every artifact is hashed in the lineage table and locked in dvc.lock" if src else "no source manifest found"),
        split,
        item("FDA GMLP", "Reference standard and evaluation: metrics with confidence intervals on held-out data", PRESENT if with_ci else MISSING,
             f"{ev.get('metrics_path') or 'no metrics file'}: {len(with_ci)} metrics with 95% intervals"
             + (f" on the {ev['metrics']['split']} split" if isinstance(ev.get("metrics"), dict) and ev["metrics"].get("split") else "")
             + ("" if group["patient_level"] else "; intervals resample images, not patients (image-level groups)")),
        item("FDA GMLP", "Performance on an independent (external) data set", PRESENT if external else MISSING,
             f"{len(external)} external set(s) evaluated at the validation-fitted operating point: "
             + ", ".join(f"{r['name']} ({card.fmt(r['n'])} images{'; shift flagged' if r['intensity_shift'] or r['operating_point_shift'] else ''}"
                         f"{'; transductive (adapted on some of its images)' if r.get('transductive') else ''})" for r in external)
             if external else "only a held-out split of the development source; no external set (evaluate.external)",
             concern=any(r["intensity_shift"] or r["operating_point_shift"] for r in external)),
        item("FDA GMLP", "Performance across clinically relevant subgroups", PRESENT if subs else NOT_APPLICABLE,
             f"{len({s['column'] for s in subs})} subgroup columns, {len(subs)} subgroups with intervals" if subs
             else "the data carry none of the subgroup columns evaluate looks for (evaluate.subgroups)"),
        use,
        item("EU AI Act Annex IV 2(a)", "Development methods and steps, including use of pre-trained systems",
             PRESENT if len(recorded) == len(stages) else MISSING,
             f"pipeline stages {' → '.join(stages)} with commands, params and records ({len(recorded)}/{len(stages)} recorded); "
             + (f"pretrained weights {w.get('name')} from {w.get('origin') or 'unknown origin'} (sha256 {str(w.get('sha256'))[:16]}…)"
                if w.get("name") and str(w.get("name")) != "none" else "no pretrained weights (trained from random initialisation)")),
        item("EU AI Act Annex IV 2(b)/2(d)", "Design choices and data requirements: data provenance, labelling, selection",
             PRESENT if src and ev.get("params") else MISSING,
             "params.yaml sections " + ", ".join((ev.get("params") or {}).keys()) + (f"; source {card.data_source(ev)}" if card.data_source(ev) else "")),
        item("EU AI Act Annex IV 2(d)", "Data governance: de-identification of the training data",
             PRESENT if (ev.get("ingest_report") or {}).get("pseudonym_key") else MISSING,
             f"pseudonym key: {key_text}; identifier columns kept because the user allowed them: {', '.join(allowed) or 'none'}; "
             f"metadata columns kept: {', '.join(kept) or 'none'}", concern=key_concern or bool(allowed)),
        item("EU AI Act Annex IV 2(g)/3", "Validation and testing procedures, metrics, logs, reproducibility",
             PRESENT if ev["workspace"]["clean"] and ev["git"].get("commit") else MISSING,
             f"code commit {ev['git'].get('commit') or 'none'}; uv.lock sha256 {str(ev['environment'].get('uv_lock_sha256'))[:16]}…; "
             f"seeds {json.dumps(seeds) if seeds else 'not recorded'}; workspace {'matches' if ev['workspace']['clean'] else 'does NOT match'} dvc.lock and git"),
    ]


def flags(ev: dict) -> list[str]:
    """Red flags shown at the top of both reports, after the workspace banner."""
    out = []
    if card.demo_card_on_real_data(ev):
        out.append(f"MODEL CARD NOT EDITED: the intended use and scope are the shipped demo text, but this model was trained on "
                   f"{card.data_source(ev)} data. Describe this model in model_card in params.yaml.")
    group = card.grouping(ev)
    if (ev.get("source_data") or {}) and not group["patient_level"]:
        out.append(f"{group['text'][0].upper()}{group['text'][1:]}.")
    text, concern = card.pseudonym_key(ev)
    if concern:
        out.append(f"Pseudonyms: {text}.")
    return out


def data_facts(ev: dict) -> list[tuple[str, str]]:
    """Grouping, pseudonym key and identifier columns: how the data were de-identified and split."""
    kept, allowed = card.identifier_columns(ev)
    return [
        ("source", card.data_source(ev) or "not recorded"),
        ("grouping", card.grouping(ev)["text"]),
        ("pseudonym key", card.pseudonym_key(ev)[0]),
        ("identifier columns allowed by the user", ", ".join(allowed) or "none"),
        ("metadata columns kept", ", ".join(kept) or "none"),
    ]


def _safe_report_facts(report) -> list[tuple[str, str]]:
    """Counts from ingest's report.json; lists are counted (their items may name source files)."""
    facts = []
    if not isinstance(report, dict):
        return facts
    for k, v in report.items():
        if k in ("grouping", "pseudonym_key", "metadata_columns", "allowed_identifier_columns"):
            continue  # stated in words by data_facts
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


def _target_facts(m: dict) -> list[tuple[str, str]]:
    """The deployment site's unlabelled images the model was adapted on (finetune.target), if any."""
    t = m.get("target")
    if not isinstance(t, dict):
        return []
    facts = [("target images (unlabelled)", f"{t.get('images')} images from source {t.get('source')}, pixels sha256 "
                                             f"{t.get('pixels_sha256')}; skipped {json.dumps(t.get('skipped') or {})}")]
    dann = m.get("domain_adversarial")
    if isinstance(dann, dict):
        facts.append(("domain-adversarial fine-tuning", f"DANN, weight {dann.get('weight')}, ramp gamma {dann.get('gamma')}, "
                                                         f"domain accuracy {card.fmt(dann.get('domain_accuracy'), 3)} at the kept epoch"))
    if isinstance(m.get("target_adaptation"), dict):
        facts.append(("target adaptation", _adaptation_text(m["target_adaptation"])))
    return facts


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
        *_target_facts(m),
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


def _type_text(a: dict) -> str:
    if a.get("kind") == "source-folder":
        return f"dir: source data, {a.get('nfiles')} files (names withheld)"
    return a["type"]


def _banner(ev: dict) -> list[str]:
    ws = ev["workspace"]
    if ws["clean"]:
        return []
    return ["WORKSPACE NOT CLEAN: this evidence does not describe a reproducible state."] + ws["problems"]


# ---- markdown ----------------------------------------------------------------------------

def render_markdown(ev: dict) -> str:
    m, src = ev["model"], ev.get("source_data") or {}
    out = []
    banner = _banner(ev)
    if banner:
        out += ["> **" + banner[0] + "**", ">"] + [f"> - {p}" for p in banner[1:]] + [""]
    for flag in flags(ev):
        out += [f"> **{flag}**", ""]
    out += [f"# Model card: {m['path']}", ""]
    out += ["## Summary", ""] + _md_summary(ev) + [""]
    out += ["## Intended use", "", card.intended_use(ev), ""]
    if card.demo_card_on_real_data(ev):
        out += ["**This is the shipped demo text, unedited: it does not describe a model trained on "
                f"{card.data_source(ev)} data.**", ""]
    for lim in card.limitations(ev):
        out.append(f"- Limitation: {lim}")
    out += ["", "## Data", ""]
    group = card.grouping(ev)
    if src:
        classes = src["classes"]
        unit = "patients" if group["patient_level"] else "groups (images)"
        out += [f"{src['images']} images, {src['patients_total']} {unit} (pseudonymous). Manifest `{src['manifest']}` sha256 `{src['manifest_sha256']}`.", ""]
        rows = [[s] + [c.get(k, 0) for k in classes] + [sum(c.values()), src["patients_per_split"].get(s, 0)] for s, c in src["per_split_class"].items()]
        out += [md_table(["split"] + classes + ["images", unit], rows), ""]
        if group["patient_level"]:
            out += [f"Patients in more than one split: **{src['patients_in_several_splits']}** ({group['text']}).", ""]
        else:
            out += [f"**{group['text'][0].upper()}{group['text'][1:]}.**", ""]
        for col, table in src["subgroups"].items():
            values = sorted({v for c in table.values() for v in c})
            out += [f"Subgroup `{col}`:", "", md_table(["split"] + values, [[s] + [c.get(v, 0) for v in values] for s, c in table.items()]), ""]
    demo = demographics(ev)
    if demo:
        out += ["Demographics by split:", "", md_table(demo["header"], demo["rows"]), ""]
    out += ["Preprocessing:", ""] + [f"- {line}" for line in card.preprocessing_words(m.get("preprocessing"))] + [""]
    out += ["De-identification and grouping:", "", md_table(["", ""], data_facts(ev)), ""]
    facts = _safe_report_facts(ev.get("ingest_report"))
    if facts:
        out += ["Ingest report:", "", md_table(["item", "value"], facts), ""]
    out += ["## Evaluation metrics", ""]
    with_ci, facts_m = card.headline(ev.get("metrics") or {})
    if with_ci or facts_m:
        out += [f"From `{ev.get('metrics_path')}`.", ""]
    if with_ci:
        out += [md_table(["metric", "key", "value", "95% CI"], [[card.metric_name(r["name"]), r["name"], card.fmt(r["value"]), card.ci_text(r)] for r in with_ci]), ""]
    if facts_m:
        out += [md_table(["fact", "value"], [[card.metric_name(r["name"]), card.fmt(r["value"])] for r in facts_m]), ""]
    glossary = _glossary([r["name"] for r in with_ci + facts_m])
    if glossary:
        out += ["What each metric means:", ""] + [f"- **{name}**: {meaning}" for name, meaning in glossary] + [""]
    if not with_ci and not facts_m:
        out += ["No metrics file found.", ""]
    details = ev.get("evaluation") or {}
    header, rows = card.per_class(details)
    if rows:
        out += ["Per class:", "", md_table(header, rows), ""]
    cm = card.confusion(ev)
    if cm:
        labels, mat = cm
        out += ["Confusion matrix (rows: true, columns: predicted):", "", md_table([""] + labels, [[labels[i]] + list(row) for i, row in enumerate(mat)]), ""]
    vheader, vrows = card.validation_table(details)
    if vrows:
        out += ["Test split and external sets (operating point fitted on validation, never refitted):", "",
                md_table(vheader, vrows), ""]
    subs = card.subgroups(details)
    if subs:
        out += ["Subgroups:", "", md_table(["subgroup", "value", "images", "patients", "ROC AUC", "95% CI", "flag"],
                                            [[x["column"], x["value"], card.fmt(x["n"]), card.fmt(x["patients"]), card.fmt(x["metric"]), card.ci_text(x), x["flag"]] for x in subs]), ""]
    if ev.get("plots"):
        out += ["## Plots", ""] + [f"- [{p}](../../{p})" if not p.endswith((".png", ".svg")) else f"![{p}](../../{p})" for p in ev["plots"]] + [""]
    out += report_robustness.markdown(ev)
    out += ["## Regulatory checklist", "", "Whether the evidence for each item is present; whether it satisfies the item is the reviewer's judgement.", ""]
    out += [md_table(["framework", "item", "status", "evidence"],
                      [[c["framework"], c["item"], f"**{c['status']}**" if c["concern"] else c["status"], c["evidence"]]
                       for c in checklist(ev) + claim_checklist(ev)]), ""]
    out += ["## Appendix", "", "### Model details", "", md_table(["", ""], [(k, v) for k, v in _model_facts(ev) if k != "preprocessing"]), ""]
    out += ["## Pipeline", "", "```mermaid", "graph LR"]
    out += [f"  {a}[{a}] -->|{art}| {b}[{b}]" for a, b, art in ev["edges"]] or [f"  {s['name']}" for s in ev["stages"]]
    out += ["```", ""]
    out += md_table(["stage", "command", "record"], [[s["name"], s["cmd"], "yes" if s.get("record") else "MISSING"] for s in ev["stages"]]).splitlines() + [""]
    out += ["## Parameters", "", "```yaml", yaml.safe_dump(ev.get("params") or {}, sort_keys=False).rstrip(), "```", ""]
    out += ["## Environment", "", md_table(["", ""], _env_facts(ev)), ""]
    out += transfer.markdown(ev)
    out += ["## Lineage", "", "Every artifact with its sha256 (folders: sha256 over the file manifest) and the md5 DVC locked.", ""]
    lin = []
    for a in ev["artifacts"]:
        lin.append([a["path"], _type_text(a), a.get("stage") or "", a["sha256"], a.get("dvc_md5") or ""])
        for rel, sha in list(a.get("files", {}).items())[:MAX_TABLE_ROWS]:
            lin.append([f"{a['path']}/{rel}", "file", "", sha, ""])
    out += [md_table(["artifact", "type", "stage", "sha256", "dvc md5"], lin), ""]
    return "\n".join(out)


def _md_summary(ev: dict) -> list[str]:
    s = summary(ev)
    out = [f"**What it does.** {s['task']}", "", f"**For whom.** {s['use']}", ""]
    if s["flagged"] and s["false_alarms"]:
        f, a = s["flagged"], s["false_alarms"]
        out += [f"- Of 100 cases with {s['positive']}, about {f['n']} are flagged (95% CI {f['low']} to {f['high']}).",
                f"- Of 100 cases without {s['positive']} ({s['negative']}), about {a['n']} are flagged (95% CI {a['low']} to {a['high']}).", ""]
    if s["auc"]:
        out += [f"ROC AUC {card.fmt(s['auc']['value'], 2)} (95% CI {card.fmt(s['auc']['low'], 2)} to {card.fmt(s['auc']['high'], 2)}); 0.5 is a coin toss, 1 is perfect.", ""]
    out.append(f"Measured on the {s['split'] or 'held-out'} split: {s['n']} cases (one image each) from {s['patients']} patients.")
    return out


# ---- html --------------------------------------------------------------------------------
# The page is rendered by a Jinja2 template with autoescaping: every value from the evidence is
# escaped by the engine. The Python below only computes what to show (text, numbers, chart
# geometry); no HTML is assembled from strings here.

TEMPLATES = Path(__file__).with_name("templates")
MAX_IMAGES = 24
# The page, in reading order: (anchor, title in the contents bar, template under templates/sections/).
# A section is one self-contained template; add one by adding its file and a line here (before "checklist":
# lineage, hashes and environment stay last, in the appendix).
SECTIONS = [
    ("summary", "Summary", "summary.html"),
    ("use", "Intended use", "use.html"),
    ("data", "Data", "data.html"),
    ("evaluation", "Evaluation", "evaluation.html"),
    ("figures", "Figures", "figures.html"),
    ("robustness", "Robustness", "robustness.html"),
    ("transfer", "Transfer", "transfer.html"),
    ("checklist", "Regulatory checklist", "checklist.html"),
    ("appendix", "Appendix: model, pipeline, environment, lineage", "appendix.html"),
]

# how the plot files evaluate writes are drawn: (needed keys, x, y, title, x label, y label, diagonal)
_CHARTS = [
    ({"fpr", "tpr"}, "fpr", "tpr", "ROC curve", "false positive rate (1 − specificity)", "true positive rate (sensitivity)", True),
    ({"recall", "precision"}, "recall", "precision", "Precision–recall curve", "recall (sensitivity)", "precision (PPV)", False),
    ({"mean_predicted", "observed"}, "mean_predicted", "observed", "Reliability (calibration)", "mean predicted probability", "observed frequency", True),
]
SITE_COLUMNS = ("site", "institution", "hospital", "centre", "center")
OUTCOMES = {"TP": "true positive", "FP": "false positive", "TN": "true negative", "FN": "false negative"}


def _span(kind: str, text) -> dict:
    """A table cell drawn with a style: hash, code, ok, bad, muted."""
    return {"kind": kind, "text": str(text)}


def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True)


def _ci_bar(r: dict) -> dict | None:
    """The point estimate and its interval on [0, 1], for metrics that live there."""
    vals = (r["value"], r["low"], r["high"])
    if not all(isinstance(v, numbers.Real) and 0 <= v <= 1 for v in vals):
        return None
    x = lambda v: round(4 + v * 112, 1)  # noqa: E731
    return {"kind": "bar", "low": x(r["low"]), "high": x(r["high"]), "value": x(r["value"])}


def _forest(rows: list[dict], title: str) -> dict | None:
    """Per-set estimates with their 95% interval as horizontal bars on [0, 1] (reports/plots/sets.json)."""
    rows = [r for r in rows if isinstance(r.get("value"), numbers.Real)]
    if not rows:
        return None
    left, right, row_h, top = 230, 20, 22, 30
    w = 640
    span = w - left - right
    sx = lambda v: round(left + max(0.0, min(1.0, float(v))) * span, 1)  # noqa: E731
    items = []
    for i, r in enumerate(rows):
        y = top + i * row_h + row_h / 2
        has_ci = isinstance(r.get("low"), numbers.Real) and isinstance(r.get("high"), numbers.Real)
        metric = str(r.get("metric") or "")
        label = f"{r.get('set', '')}: {card.metric_name(metric)}" if metric else str(r.get("label", ""))
        items.append({"y": y, "label": label, "x": sx(r["value"]), "lo": sx(r["low"]) if has_ci else None,
                      "hi": sx(r["high"]) if has_ci else None,
                      "text": f"{card.fmt(r['value'], 3)}" + (f" ({card.fmt(r['low'], 3)}–{card.fmt(r['high'], 3)})" if has_ci else "")})
    h = top + len(rows) * row_h + 40
    return {"w": w, "h": h, "left": left, "right": w - right, "top": top, "bottom": top + len(rows) * row_h, "title": title,
            "ticks": [{"x": sx(t / 4), "t": f"{t / 4:g}"} for t in range(5)], "rows": items, "mid_x": left + span / 2}


def _saliency_caption(name: str) -> str:
    """FN_0_img000011.png -> false negative · img000011."""
    stem = Path(name).stem
    parts = stem.split("_")
    if parts and parts[0] in OUTCOMES:
        return f"{OUTCOMES[parts[0]]} · {parts[-1]}"
    return Path(name).name


def _image(root: Path, rel: str, caption: str) -> dict:
    p = root / rel
    # as an <img> data URI an SVG cannot run scripts; the report stays one file
    return {"kind": "image", "alt": rel, "caption": caption, "mime": "image/png" if p.suffix.lower() == ".png" else "image/svg+xml",
            "data": base64.b64encode(p.read_bytes()).decode("ascii")}


def _prevalence(ev: dict) -> float | None:
    details = ev.get("evaluation") if isinstance(ev.get("evaluation"), dict) else {}
    prev = (details.get("shift") or {}).get("prevalence") if isinstance(details.get("shift"), dict) else None
    if isinstance(prev, numbers.Real):
        return float(prev)
    cm = card.confusion(ev)
    if cm and len(cm[1]) == 2:
        total = sum(sum(r) for r in cm[1])
        return sum(cm[1][1]) / total if total else None
    return None


def _plot(root: Path, rel: str, ev: dict | None = None) -> dict | None:
    ev = ev or {}
    p = root / rel
    if p.suffix.lower() in (".png", ".svg"):
        return _image(root, rel, rel)
    try:
        rows = _plot_rows(json.loads(p.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {"kind": "note", "text": f"{rel}: not readable JSON"}
    if not rows:
        return {"kind": "note", "text": f"{rel}: no rows (e.g. a single class in the split)"}
    keys = list(rows[0].keys())
    metrics = ev.get("metrics") if isinstance(ev.get("metrics"), dict) else {}
    if {"actual", "predicted"} <= set(keys):
        if card.confusion(ev):
            return None  # the evaluation section's confusion matrix shows the same counts
        counts = Counter((str(r["actual"]), str(r["predicted"])) for r in rows)
        labels = sorted({a for a, _ in counts} | {b for _, b in counts})
        return {"kind": "table", "caption": "Confusion matrix (rows: true class, columns: predicted; image counts)",
                "header": ["true \\ predicted"] + labels,
                "rows": [[a] + [counts.get((a, b), 0) for b in labels] for a in labels], "num": list(range(1, len(labels) + 1))}
    if {"set", "value"} <= set(keys):
        return {"kind": "forest", "chart": _forest(rows, "Test and external sets: estimate and 95% CI"),
                "caption": "Each set at the operating point fitted on validation; bars are 95% patient-bootstrap intervals."}
    for need, x, y, title, xl, yl, diag in _CHARTS:
        if need <= set(keys):
            baseline = None
            if x == "fpr" and isinstance(metrics.get("roc_auc"), numbers.Real):
                title = f"ROC curve, AUC {metrics['roc_auc']:.3f}"
            elif x == "recall":
                baseline = _prevalence(ev)
                if isinstance(metrics.get("pr_auc"), numbers.Real):
                    title = f"Precision–recall, AUC {metrics['pr_auc']:.3f}"
            caption = {"fpr": "Dashed: chance (a coin toss).", "recall": "Dashed: the prevalence, what chance achieves.",
                       "mean_predicted": "Dashed: perfect calibration."}[x]
            return {"kind": "chart", "chart": line_chart(rows, x, y, title, xl, yl, diag, baseline), "caption": caption}
    numeric = [k for k in keys if all(isinstance(r.get(k), numbers.Real) and not isinstance(r.get(k), bool) for r in rows)]
    if len(numeric) >= 2:
        return {"kind": "chart", "chart": line_chart(rows, numeric[0], numeric[1], Path(rel).stem), "caption": rel}
    return {"kind": "table", "caption": rel + (" (first rows)" if len(rows) > MAX_TABLE_ROWS else ""), "header": keys,
            "rows": [[card.fmt(r.get(k)) for k in keys] for r in rows[:MAX_TABLE_ROWS]], "num": []}


def _graph(ev: dict) -> dict:
    names = [s["name"] for s in ev["stages"]]
    level = {n: 0 for n in names}
    for _ in names:  # longest-path layering; stages are few
        for a, b, _art in ev["edges"]:
            level[b] = max(level[b], level[a] + 1)
    cols: dict[int, list[str]] = {}
    for n in names:
        cols.setdefault(level[n], []).append(n)
    bw, bh, gx, gy = 110, 36, 26, 20
    pos = {n: (10 + lv * (bw + gx), 10 + i * (bh + gy)) for lv, ns in cols.items() for i, n in enumerate(ns)}
    recorded = {s["name"] for s in ev["stages"] if s.get("record")}
    edges = []
    for a, b in sorted({(a, b) for a, b, _ in ev["edges"]}):
        (ax, ay), (bx, by) = pos[a], pos[b]
        edges.append(f"M{ax + bw},{ay + bh / 2} C{ax + bw + gx / 2},{ay + bh / 2} {bx - gx / 2},{by + bh / 2} {bx - 2},{by + bh / 2}")
    return {
        "w": 20 + (max(cols) + 1) * (bw + gx) - gx if cols else 200,
        "h": 20 + max(len(v) for v in cols.values()) * (bh + gy) - gy if cols else 80,
        "bw": bw, "bh": bh, "edges": edges,
        "boxes": [{"name": n, "x": x, "y": y, "cx": x + bw / 2, "cy": y + bh / 2 + 4, "recorded": n in recorded} for n, (x, y) in pos.items()],
    }


def _cards(ev: dict) -> list[tuple[str, str, str]]:
    m, src = ev["model"], ev.get("source_data") or {}
    with_ci, _ = card.headline(ev.get("metrics") or {})
    main_metric = next((r for r in with_ci if r["name"] in ("roc_auc", "auc")), with_ci[0] if with_ci else None)
    split = (ev.get("metrics") or {}).get("split") if isinstance(ev.get("metrics"), dict) else None
    n = (ev.get("metrics") or {}).get("n") if isinstance(ev.get("metrics"), dict) else None
    group = card.grouping(ev)
    data_detail = (f"{src.get('patients_total', 'n/a')} patients · {src.get('patients_in_several_splits', 'n/a')} in several splits"
                   if group["patient_level"] else "image-level split: patients not identified")
    return [
        ("model", str(m.get("arch", "n/a")), f"{len(m.get('classes') or [])} classes · {m.get('parameters', 'n/a')} parameters"),
        (card.metric_name(main_metric["name"]) if main_metric else "metrics", card.fmt(main_metric["value"], 3) if main_metric else "n/a",
         (f"95% CI {card.fmt(main_metric['low'], 3)} – {card.fmt(main_metric['high'], 3)}" if main_metric else "no metrics file")
         + (f" · {split} split, {n} images" if split and n is not None else "")),
        ("data", f"{src.get('images', 'n/a')} images", data_detail),
        ("code", str(ev["git"].get("commit") or "none")[:12], "dirty working tree" if ev["git"].get("dirty") else "clean git tree"),
    ]


def _per_hundred(value, low, high, flip: bool = False) -> dict | None:
    """A proportion as 'about N of 100' with its interval; flip turns specificity into the share flagged."""
    if not all(isinstance(v, numbers.Real) for v in (value, low, high)):
        return None
    if flip:
        value, low, high = 1 - value, 1 - high, 1 - low
    return {"n": round(100 * value), "low": round(100 * low), "high": round(100 * high)}


def summary(ev: dict) -> dict:
    """The plain-language summary: what the model does, for whom, and what it does to 100 cases with and without the finding."""
    metrics = ev.get("metrics") if isinstance(ev.get("metrics"), dict) else {}
    classes = [str(c) for c in (ev.get("model") or {}).get("classes") or []]
    positive = metrics.get("positive_class") or (classes[-1] if len(classes) == 2 else None)
    others = [c for c in classes if c != positive]
    flagged = _per_hundred(metrics.get("sensitivity"), metrics.get("sensitivity_ci_low"), metrics.get("sensitivity_ci_high"))
    false_alarms = _per_hundred(metrics.get("specificity"), metrics.get("specificity_ci_low"), metrics.get("specificity_ci_high"), flip=True)
    auc = metrics.get("roc_auc")
    src = ev.get("source_data") or {}
    return {
        "task": (f"The model sorts single images into {len(classes)} classes ({', '.join(classes)})"
                 + (f" and flags those it finds to show {positive}." if positive and len(classes) == 2 else ".")) if classes else "Classes not recorded.",
        "use": card.intended_use(ev),
        "positive": positive, "negative": " / ".join(others) or "the other class",
        "flagged": flagged, "false_alarms": false_alarms,
        "threshold": metrics.get("threshold"),
        "split": metrics.get("split"), "n": metrics.get("n"), "patients": metrics.get("n_groups"),
        "auc": {"value": auc, "low": metrics.get("roc_auc_ci_low"), "high": metrics.get("roc_auc_ci_high")} if isinstance(auc, numbers.Real) else None,
        "data": f"{src.get('images')} images from {src.get('patients_total')} patients ({card.data_source(ev) or 'source not recorded'} data)" if src else None,
        "demo": card.data_source(ev) == "demo",
    }


def _metric_rows(with_ci: list[dict]) -> list[list]:
    return [[card.metric_name(r["name"]), _span("code", r["name"]), card.fmt(r["value"], 3),
             f"{card.fmt(r['low'], 3)} – {card.fmt(r['high'], 3)}", _ci_bar(r) or ""] for r in with_ci]


def _glossary(names) -> list[tuple[str, str]]:
    seen, out = set(), []
    for key in names:
        last = str(key).rpartition(".")[2]
        if card.metric_name(last) in seen or not card.metric_meaning(last):
            continue
        seen.add(card.metric_name(last))
        out.append((card.metric_name(last), card.metric_meaning(last)))
    return out


def _per_class_rows(details) -> dict | None:
    """The per-class table, narrow: each metric with its interval in one cell."""
    table = (details or {}).get("per_class") if isinstance(details, dict) else None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        return None
    names = []
    for v in table.values():
        names += [k for k, x in v.items() if k not in names and (isinstance(x, numbers.Real) or x is None)
                  and not k.endswith(("_ci_low", "_ci_high"))]
    rows = []
    for c, v in table.items():
        row = [c]
        for k in names:
            lo, hi = v.get(f"{k}_ci_low"), v.get(f"{k}_ci_high")
            row.append(card.fmt(v.get(k), 3) + (f" ({card.fmt(lo, 2)}–{card.fmt(hi, 2)})" if lo is not None and hi is not None else ""))
        rows.append(row)
    return {"header": ["class"] + [card.metric_name(k) for k in names], "rows": rows, "num": list(range(1, len(names) + 1)), "keys": names}


def _evaluation(ev: dict) -> dict:
    metrics = ev.get("metrics") or {}
    details = ev.get("evaluation") if isinstance(ev.get("evaluation"), dict) else {}
    with_ci, facts = card.headline(metrics)
    boot = details.get("bootstrap")
    op, cal = details.get("operating_point"), details.get("calibration")
    per_class = _per_class_rows(details)
    cm = card.confusion(ev)
    subs = card.subgroups(details)
    fact_rows = [[card.metric_name(r["name"]), card.fmt(r["value"])] for r in facts]
    return {
        "empty": not with_ci and not facts,
        "path": ev.get("metrics_path"),
        "bootstrap": boot if isinstance(boot, dict) else None,
        "with_ci": _metric_rows(with_ci),
        "glossary": _glossary([r["name"] for r in with_ci + facts] + ((per_class or {}).get("keys") or [])),
        "facts": fact_rows,
        "operating_point": [[k.replace("_", " "), card.fmt(v)] for k, v in op.items() if not isinstance(v, (dict, list))] if isinstance(op, dict) else [],
        "per_class": per_class,
        "confusion": {"header": ["true \\ predicted"] + cm[0], "rows": [[cm[0][i]] + list(row) for i, row in enumerate(cm[1])],
                      "num": list(range(1, len(cm[0]) + 1))} if cm else None,
        "calibration": [[k.replace("_", " "), card.fmt(v)] for k, v in cal.items() if not isinstance(v, (dict, list))] if isinstance(cal, dict) else [],
        "validation": _validation(details),
        "subgroups": [[x["column"], x["value"], card.fmt(x["n"]), card.fmt(x["patients"]), card.fmt(x["metric"], 3),
                       card.ci_text(x), x["flag"]] for x in subs],
    }


def _validation(details) -> dict | None:
    """The side-by-side table of test and external sets, folded to fit a page: metrics with their CI in one cell."""
    sets = card.validation_sets(details)
    if not sets:
        return None
    header = ["set", "kind", "images (patients)"] + [card.metric_name(m) for m in card.VALIDATION_METRICS] + ["prevalence true / predicted", "flags"]
    _, text = card.validation_table(details)
    rows = []
    for r, t in zip(sets, text):
        rows.append([r["name"], r["kind"], f"{card.fmt(r['n'])} ({card.fmt(r['patients'])})"] + t[4:4 + len(card.VALIDATION_METRICS)]
                    + [t[-2], t[-1] + (f"; intensity distance {t[-3]}" if t[-3] != "n/a" else "")])
    return {"header": header, "rows": rows}


def _site_column(src: dict) -> str | None:
    return next((c for c in (src.get("subgroups") or {}) if c.lower() in SITE_COLUMNS), None)


def flow(ev: dict) -> dict | None:
    """The participant flow: files seen -> quarantined (by reason) -> decoded -> duplicates -> images -> each split."""
    report = ev.get("ingest_report") if isinstance(ev.get("ingest_report"), dict) else {}
    src = ev.get("source_data") or {}
    if not report and not src:
        return None
    reasons = Counter()
    for k, v in (report.get("quarantine_reasons") or {}).items():
        if isinstance(v, numbers.Real) and v:
            reasons[str(k)] += int(v)
    if not reasons:
        reasons.update(str(i.get("reason")) for i in report.get("quarantine") or [] if isinstance(i, dict) and i.get("reason"))
    site = _site_column(src)
    count = lambda v: len(v) if isinstance(v, list) else v if isinstance(v, numbers.Real) else None  # noqa: E731
    splits = []
    for s, c in (src.get("per_split_class") or {}).items():
        sites = (src.get("subgroups") or {}).get(site, {}).get(s) if site else None
        splits.append({"name": s, "images": sum(c.values()), "patients": (src.get("patients_per_split") or {}).get(s),
                       "classes": ", ".join(f"{k} {n}" for k, n in c.items()),
                       "sites": ", ".join(f"{k} {n}" for k, n in sites.items()) if sites else None})
    steps = [
        {"label": "files found in the source", "n": count(report.get("files_seen"))},
        {"label": "images decoded", "n": report.get("images_decoded", report.get("files_decoded")),
         "out": {"label": "quarantined (not used)", "n": count(report.get("quarantined")),
                 "why": [f"{r.replace('_', ' ')}: {n}" for r, n in reasons.most_common()]}},
        {"label": "images used", "n": report.get("images", src.get("images")),
         "out": {"label": "duplicates removed", "n": count(report.get("duplicates_removed", report.get("duplicates"))), "why": []}},
    ]
    steps = [s for s in steps if s["n"] is not None]
    # geometry: a column of boxes, exclusions to the right, splits side by side at the bottom
    w, bw, bh, gap = 660, 250, 40, 26
    x = 20
    y = 10
    boxes, arrows, sides = [], [], []
    for i, st in enumerate(steps):
        boxes.append({"x": x, "y": y, "w": bw, "h": bh, "lines": [f"{card.fmt(st['n'])} {st['label']}"], "split": False})
        out = st.get("out")
        if i and out and out.get("n") is not None:
            oy = y - gap / 2 - bh / 2 - 3
            arrows.append(f"M{x + bw / 2},{oy + bh / 2} L{x + bw + 40},{oy + bh / 2}")
            lines = [f"{card.fmt(out['n'])} {out['label']}"] + out["why"][:4]
            sides.append({"x": x + bw + 42, "y": oy + bh / 2 - 12, "w": w - (x + bw + 42) - 4, "h": 16 * len(lines) + 8, "lines": lines})
        if i:
            arrows.append(f"M{x + bw / 2},{y - gap} L{x + bw / 2},{y - 2}")
        y += bh + gap
    if splits:
        n = len(splits)
        sw = (w - 20 - 10 * (n - 1)) / n
        lines_n = 3 + (1 if any(s["sites"] for s in splits) else 0)
        top = y + 10
        for j, s in enumerate(splits):
            sx = 10 + j * (sw + 10)
            lines = [f"{s['name']}: {card.fmt(s['images'])} images", f"{card.fmt(s['patients'])} patients", s["classes"]]
            if s["sites"]:
                lines.append(f"{site}: {s['sites']}")
            boxes.append({"x": round(sx, 1), "y": top, "w": round(sw, 1), "h": 16 * lines_n + 10, "lines": lines, "split": True})
            arrows.append(f"M{x + bw / 2},{y - gap} C{x + bw / 2},{top - 10} {sx + sw / 2},{y - 10} {sx + sw / 2},{top - 2}")
        y = top + 16 * lines_n + 20
    return {"w": w, "h": y, "boxes": boxes, "sides": sides, "arrows": arrows}


def demographics(ev: dict) -> dict | None:
    """Per split: images, patients, age (median, quartiles), sex and site counts, where the manifest has them."""
    src = ev.get("source_data") or {}
    if not src.get("per_split_class"):
        return None
    subgroups = src.get("subgroups") or {}
    ages = (src.get("ages") or {}).get("by_split") or {}
    sex = next((c for c in subgroups if c.lower() in ("sex", "patient_sex", "gender")), None)
    site = _site_column(src)
    splits = list(src["per_split_class"])
    rows = [["images"] + [card.fmt(sum(src["per_split_class"][s].values())) for s in splits],
            ["patients"] + [card.fmt((src.get("patients_per_split") or {}).get(s)) for s in splits]]
    if ages:
        def age(s):
            a = ages.get(s) or {}
            if not a.get("n"):
                return "not recorded"
            return f"{card.fmt(a['median'], 3)} ({card.fmt(a['q1'], 3)}–{card.fmt(a['q3'], 3)})" + (f"; {a['missing']} missing" if a.get("missing") else "")
        rows.append(["age, median (quartiles)"] + [age(s) for s in splits])
    for col in (sex, site):
        if col:
            rows.append([col] + [", ".join(f"{k} {n}" for k, n in (subgroups[col].get(s) or {}).items()) or "none" for s in splits])
    missing = [what for what, col in (("age", ages), ("sex", sex), ("site", site)) if not col]
    return {"header": [""] + splits, "rows": rows, "missing": missing}


def claim_checklist(ev: dict) -> list[dict]:
    """CLAIM 2024 (Checklist for Artificial Intelligence in Medical Imaging) items this evidence can speak to.

    Items about the manuscript itself (title, abstract, discussion, registration, funding) are left to its authors.
    """
    src = ev.get("source_data") or {}
    params = ev.get("params") or {}
    details = ev.get("evaluation") if isinstance(ev.get("evaluation"), dict) else {}
    metrics = ev.get("metrics") if isinstance(ev.get("metrics"), dict) else {}
    report = ev.get("ingest_report") if isinstance(ev.get("ingest_report"), dict) else {}
    w = ev.get("weights") or {}
    group = card.grouping(ev)
    with_ci, _ = card.headline(metrics)
    external = [r for r in card.validation_sets(details) if r["kind"] == "external"]
    images = [p for p in ev.get("plots") or [] if p.lower().endswith((".png", ".svg"))]
    demo = demographics(ev)
    ft = params.get("finetune") or {}
    mc = ev.get("model_card") or {}

    def item(n, what, ok, where, na=False, concern=False):
        status = NOT_APPLICABLE if na else PRESENT if ok else MISSING
        return {"framework": f"CLAIM 2024 item {n}", "item": what, "status": status, "evidence": where,
                "concern": concern or status == MISSING}

    return [
        item(3, "Intended use and clinical role of the AI approach", bool(mc.get("intended_use")) and not card.demo_card_on_real_data(ev),
             "Intended use section (model_card.intended_use in params.yaml)"),
        item(7, "Data sources", bool(src), f"Data section: source {card.data_source(ev) or 'not recorded'}; manifest {src.get('manifest')}" if src else "no source manifest"),
        item(9, "Data preprocessing steps", bool((ev.get("model") or {}).get("preprocessing")), "Data section, Preprocessing (the record stored in the model file)"),
        item(12, "De-identification methods", bool(report.get("pseudonym_key")), "Data section, De-identification (keyed pseudonyms; DICOM headers reduced to whitelisted columns)"),
        item(13, "How missing data were handled", "quarantine_reasons" in report or "quarantine" in report,
             "Data section, participant flow: undecodable or conflicting files are quarantined with a reason, never imputed"),
        item(15, "Definition of the reference standard (ground truth)", bool(mc.get("reference_standard")),
             f"model_card.reference_standard: {mc['reference_standard']}" if mc.get("reference_standard") else
             "not stated: labels come from the source as given; say how they were established in model_card.reference_standard"),
        item(20, "How data were assigned to partitions; proportions", bool(src.get("per_split_class")),
             "Data section, participant flow (ingest split ratios and seed in params.yaml)"),
        item(21, "Level at which partitions are disjoint (patient, image)", group["patient_level"] and src.get("patients_in_several_splits") == 0,
             f"Data section: {group['text']}; {src.get('patients_in_several_splits', 'n/a')} patients in more than one split"),
        item(22, "Detailed description of the model (inputs, outputs, architecture)", bool((ev.get("model") or {}).get("arch")),
             f"Appendix, model details: {(ev.get('model') or {}).get('arch')}, {len((ev.get('model') or {}).get('classes') or [])} classes"),
        item(23, "Software libraries, frameworks and packages", bool(ev.get("packages") or (ev.get("environment") or {}).get("packages")),
             "Appendix, environment (versions) and ml-bom.json (every locked package)"),
        item(24, "Initialisation of model parameters (random, transfer learning)", bool(w),
             _weights_text(w) if w else "pretrained weights not recorded"),
        item(25, "Training approach: augmentation, hyperparameters", bool(ft), "Appendix, parameters (finetune section)"),
        item(26, "Method of selecting the final model", "monitor" in ft or "patience" in ft,
             f"early stopping on {ft.get('monitor', 'the validation metric')} with patience {ft.get('patience', 'n/a')}; best epoch kept"),
        item(28, "Metrics of model performance", bool(with_ci), "Evaluation section, each metric with a glossary line"),
        item(29, "Statistical measures of uncertainty (confidence intervals)", bool(with_ci),
             f"Evaluation section: 95% {(details.get('bootstrap') or {}).get('unit', 'patient')}-level bootstrap intervals"),
        item(31, "Methods for explainability (e.g. saliency maps)", bool(images),
             f"Figures section: {len(images)} Grad-CAM images of true/false positives and negatives" if images else "no saliency images (evaluate.saliency)"),
        item(32, "Validation or testing on external data", bool(external),
             f"Evaluation section: {len(external)} external set(s)" if external else "no external set (evaluate.external)"),
        item(33, "Flow of participants or cases, with a diagram", bool(report), "Data section, participant flow diagram" if report else "no ingest report"),
        item(34, "Demographic and clinical characteristics of cases in each partition", bool(demo) and not (demo or {}).get("missing"),
             "Data section, demographics by split" + (f" (not in the data: {', '.join(demo['missing'])})" if demo and demo["missing"] else "")),
        item(35, "Performance metrics on all data partitions", bool(with_ci),
             f"Evaluation section: test split ({metrics.get('n', 'n/a')} images); validation used only to fit the operating point"),
        item(36, "Estimates of diagnostic accuracy and their precision (95% CI)", all(k in metrics for k in ("sensitivity_ci_low", "specificity_ci_low")),
             "Summary and Evaluation sections: sensitivity, specificity, predictive values with 95% intervals"),
        item(37, "Failure analysis of incorrectly classified cases", any(Path(p).name.startswith(("FP", "FN")) for p in images),
             "Figures section: Grad-CAM of false positives and false negatives" if images else "no failure cases shown"),
        item(38, "Study limitations (bias, uncertainty, generalisability)", bool(card.limitations(ev)), "Intended use section, Limitations"),
        item(41, "Where the code and protocol can be accessed", bool(ev["git"].get("commit")),
             f"code commit {ev['git'].get('commit') or 'none'}; the pipeline's dvc.yaml, params.yaml and dvc.lock (Appendix, lineage)"),
    ]


def _data(ev: dict) -> dict | None:
    src = ev.get("source_data")
    if not src:
        return None
    group = card.grouping(ev)
    classes = src["classes"]
    unit = "patients" if group["patient_level"] else "groups (images)"
    return {
        "src": src, "group": group, "unit": unit,
        "header": ["split"] + classes + ["images", unit],
        "rows": [[s] + [c.get(k, 0) for k in classes] + [sum(c.values()), src["patients_per_split"].get(s, 0)] for s, c in src["per_split_class"].items()],
        "num": list(range(1, len(classes) + 3)),
        "subgroups": [{"column": col, "header": ["split"] + (vals := sorted({v for c in t.values() for v in c})),
                       "rows": [[s] + [c.get(v, 0) for v in vals] for s, c in t.items()], "num": list(range(1, len(vals) + 1))}
                      for col, t in src["subgroups"].items()],
    }


def _lineage(ev: dict) -> list[list]:
    rows = []
    for a in ev["artifacts"]:
        files = a.get("files") or {}
        first = {"kind": "files", "text": a["path"], "rows": [[rel, _span("hash", sha)] for rel, sha in files.items()]} if files else a["path"]
        rows.append([first, _type_text(a), a.get("stage") or "", _span("hash", a["sha256"]), _span("hash", a.get("dvc_md5") or "")])
    return rows


def _env_facts_short(ev: dict) -> list[tuple[str, str]]:
    return [(k, v if len(v) < 200 else v[:200] + "…") for k, v in _env_facts(ev)]


def render_html(ev: dict, root: Path) -> str:
    m = ev["model"]
    mc = ev.get("model_card") or {}
    plots = ev.get("plots") or []
    images = [p for p in plots if p.lower().endswith((".png", ".svg"))]
    checks = checklist(ev)
    claim = claim_checklist(ev)
    order = ("roc", "pr", "reliability", "sets")  # the reader's order: ranking, then precision, calibration, other sets
    data_plots = sorted((p for p in plots if p not in images), key=lambda p: (order.index(Path(p).stem) if Path(p).stem in order else len(order), p))
    charts = [c for c in (_plot(root, p, ev) for p in data_plots) if c]
    context = {
        "m": m, "ev": ev, "sections": SECTIONS, "banner": _banner(ev), "flags": flags(ev), "cards": _cards(ev),
        "summary": summary(ev),
        "model_facts": [(k, v) for k, v in _model_facts(ev) if k != "preprocessing"],
        "intended_use": card.intended_use(ev), "demo_card": card.demo_card_on_real_data(ev),
        "data_source": card.data_source(ev),
        "card_extra": [[k.replace("_", " "), v if isinstance(v, str) else ", ".join(map(str, v)) if isinstance(v, list) else json.dumps(v)]
                       for k, v in mc.items() if k not in ("intended_use", "limitations")],
        "limitations": card.limitations(ev),
        "data": _data(ev), "data_facts": data_facts(ev), "ingest_facts": _safe_report_facts(ev.get("ingest_report")),
        "flow": flow(ev), "demographics": demographics(ev), "preprocessing": card.preprocessing_words(m.get("preprocessing")),
        "evaluation": _evaluation(ev),
        "charts": charts,
        "images": [_image(root, p, _saliency_caption(p)) for p in images[:MAX_IMAGES]], "more_images": max(0, len(images) - MAX_IMAGES),
        "graph": _graph(ev),
        "stages": [[s["name"], _span("code", s["cmd"]), (s.get("record") or {}).get("started", ""),
                    card.fmt((s.get("record") or {}).get("duration_s")) + " s" if s.get("record") else "",
                    _span("ok", "yes") if s.get("record") else _span("bad", "MISSING")] for s in ev["stages"]],
        "params_yaml": yaml.safe_dump(ev.get("params") or {}, sort_keys=False),
        "env_facts": _env_facts_short(ev), "lineage": _lineage(ev),
        "checklist": checks, "claim": claim,
        "checklist_counts": Counter(c["status"] for c in checks + claim),
        "robustness": report_robustness.robustness_section(ev), "failures": report_robustness.failures_section(ev, root),
        "transfer": transfer.html_context(ev),
    }
    return _environment().get_template("report.html").render(**context)
