"""Model-card content shared by the ML-BOM and the report: metric rows, intended use."""
from __future__ import annotations

import numbers

_POINT_KEYS = ("value", "estimate", "point", "mean")
_CI_PAIRS = (("ci_low", "ci_high"), ("ci_lower", "ci_upper"), ("lower", "upper"), ("low", "high"), ("lo", "hi"))
_CI_LISTS = ("ci", "ci95", "interval", "ci_95")

DEFAULT_INTENDED_USE = (
    "Not stated. Add `model_card: {intended_use: ...}` to params.yaml to state the clinical task, "
    "population and setting this model is meant for."
)


def _num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _interval(d: dict, name: str | None = None):
    """A (low, high) pair found in `d`, for the metric `name` when given (e.g. auc_ci, auc_low/auc_high)."""
    keys = [f"{name}_{k}" for k in _CI_LISTS] if name else list(_CI_LISTS)
    for k in keys:
        v = d.get(k)
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(_num(x) for x in v):
            return (v[0], v[1]), {k}
        if isinstance(v, dict):
            iv, _ = _interval(v)
            if iv:
                return iv, {k}
    for lo, hi in _CI_PAIRS:
        klo, khi = (f"{name}_{lo}", f"{name}_{hi}") if name else (lo, hi)
        if _num(d.get(klo)) and _num(d.get(khi)):
            return (d[klo], d[khi]), {klo, khi}
    return None, set()


def metric_rows(metrics, prefix: str = "") -> list[dict]:
    """Flatten metrics.json into rows {name, value, low, high}, whatever its nesting.

    A dict with a point value and an interval (value + ci_low/ci_high, or
    estimate + ci [lo, hi]) is one row; `<metric>_ci` beside `<metric>` is its
    interval. Matrices and other lists are left to their own tables.
    """
    if not isinstance(metrics, dict):
        return []
    own: list[dict] = []
    nested: list[dict] = []
    point_key = next((k for k in _POINT_KEYS if _num(metrics.get(k))), None)
    consumed: set = set()
    if point_key and prefix:
        iv, used = _interval(metrics)
        own.append({"key": None, "name": prefix, "value": metrics[point_key], "low": iv[0] if iv else None, "high": iv[1] if iv else None})
        consumed |= used | {point_key}
    for k, v in metrics.items():
        if k in consumed:
            continue
        name = f"{prefix}.{k}" if prefix else str(k)
        if _num(v) or v is None:
            iv, used = _interval(metrics, str(k))
            consumed |= used
            own.append({"key": k, "name": name, "value": v, "low": iv[0] if iv else None, "high": iv[1] if iv else None})
        elif isinstance(v, dict):
            nested += metric_rows(v, name)
    # an interval bound (auc_low) met before its metric (auc) was emitted as a row of its own
    own = [r for r in own if r["key"] is None or r["key"] not in consumed]
    return [{k: v for k, v in r.items() if k != "key"} for r in own] + nested


def matrices(metrics, prefix: str = "") -> dict[str, list]:
    """Every list of equal-length numeric lists in metrics.json (confusion matrices), by dotted name."""
    out = {}
    if isinstance(metrics, dict):
        for k, v in metrics.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, list) and v and all(isinstance(r, list) and r and all(_num(x) for x in r) for r in v):
                out[name] = v
            elif isinstance(v, dict):
                out.update(matrices(v, name))
    return out


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


# The model card params.yaml ships with, written for the synthetic demo. Left unedited on real data it
# would describe the wrong model, so the report flags it (tests/test_report.py keeps the two in step).
DEMO_INTENDED_USE = (
    "Research and engineering demonstration: binary classification (normal vs lesion) of single "
    "grayscale CT-like images, to show the pipeline, its evidence and its audit trail. Replace this "
    "text with the clinical task, patient population, care setting and intended users of your model."
)
DEMO_OUT_OF_SCOPE = (
    "Any clinical decision. The default data are synthetic; a model trained on them says nothing "
    "about real patients."
)

# ingest's grouping kinds that are real patient ids; "image" (or no record) means each image is its own group
PATIENT_GROUPINGS = {"patient_id": "DICOM PatientID", "column": "a patient column of the source",
                     "rule": "a rule over the file path", "source": "the source's own patient grouping"}
IMAGE_LEVEL = "image-level split: patient independence not established"


def _words(text) -> str:
    return " ".join(str(text or "").split())


def data_source(ev: dict) -> str | None:
    """ingest.source from params.yaml (demo, folder, csv, dicom, medmnist), else from the ingest record."""
    sources = ((ev.get("params") or {}).get("ingest") or {}).get("sources")
    if sources and isinstance(sources, list):  # several sources replace the single one (docs/data.md)
        named = [s for s in sources if isinstance(s, dict)]
        if named and all(s.get("source") == "demo" for s in named):
            return "demo"
        return "sources: " + ", ".join(f"{s.get('name')} ({s.get('source')})" for s in named)
    src = ((ev.get("params") or {}).get("ingest") or {}).get("source")
    if src:
        return str(src)
    desc = (ev.get("source_data") or {}).get("description")
    return str(desc.get("source")) if isinstance(desc, dict) and desc.get("source") else None


def demo_card_on_real_data(ev: dict) -> bool:
    """The shipped demo model card, unedited, describing a model trained on non-demo data."""
    mc = ev.get("model_card") or {}
    unedited = _words(mc.get("intended_use")) == _words(DEMO_INTENDED_USE) or _words(mc.get("out_of_scope")) == _words(DEMO_OUT_OF_SCOPE)
    return unedited and data_source(ev) not in (None, "demo")


def grouping(ev: dict) -> dict:
    """How ingest grouped images into patients: {kind, rule, patient_level, text}; no record counts as image-level."""
    report = ev.get("ingest_report") if isinstance(ev.get("ingest_report"), dict) else {}
    g = report.get("grouping") if isinstance(report.get("grouping"), dict) else {}
    kind = str(g.get("kind") or "image")
    rule = g.get("rule")
    if kind in PATIENT_GROUPINGS:
        text = f"patient groups from {PATIENT_GROUPINGS[kind]}" + (f" ({rule})" if kind in ("rule", "column") and rule else "")
        return {"kind": kind, "rule": rule, "patient_level": True, "text": text}
    why = "no grouping recorded by ingest" if not g else "the source has no patient ids: each image is its own group"
    return {"kind": "image", "rule": rule, "patient_level": False, "text": f"{IMAGE_LEVEL} ({why})"}


def pseudonym_key(ev: dict) -> tuple[str, bool]:
    """(what the report says about the pseudonym key, whether it is a concern)."""
    report = ev.get("ingest_report") if isinstance(ev.get("ingest_report"), dict) else {}
    kind = report.get("pseudonym_key")
    if kind == "user":
        return "a user-held key (MEDTL_PSEUDONYM_KEY): pseudonyms cannot be recomputed without it", False
    if kind == "default":
        demo = data_source(ev) == "demo"
        return ("the public default key: anyone who can list real ids can recompute the pseudonyms"
                + ("" if not demo else " (acceptable for the synthetic demo)")), not demo
    return "not recorded by ingest", data_source(ev) not in (None, "demo")


def identifier_columns(ev: dict) -> tuple[list[str], list[str]]:
    """(metadata columns kept, identifier-like columns kept only because the user allowed them)."""
    report = ev.get("ingest_report") if isinstance(ev.get("ingest_report"), dict) else {}
    kept = [str(c) for c in report.get("metadata_columns") or [] if c is not None]
    allowed = [str(c) for c in report.get("allowed_identifier_columns") or [] if c is not None]
    return kept, allowed


def intended_use(ev: dict) -> str:
    card = ev.get("model_card") or {}
    return str(card.get("intended_use") or DEFAULT_INTENDED_USE)


def limitations(ev: dict) -> list[str]:
    card = ev.get("model_card") or {}
    lim = card.get("limitations") or []
    lim = [lim] if isinstance(lim, str) else [str(x) for x in lim]
    src = (ev.get("source_data") or {}).get("description") or {}
    if isinstance(src, dict) and src.get("source") == "demo":
        lim.append("Trained and evaluated on the built-in synthetic demo dataset: not for clinical use.")
    return lim


# ---- evaluation: headline numbers, per class, subgroups (evaluate's output, read defensively) ----

def headline(metrics) -> tuple[list[dict], list[dict]]:
    """(metrics with a confidence interval, other numeric facts) from metrics.json, leaving nested detail aside."""
    if not isinstance(metrics, dict):
        return [], []
    top = {k: v for k, v in metrics.items() if k != "detail"}
    # external sets and shift statistics have their own table (validation_sets)
    rows = [r for r in metric_rows(top) if ("." not in r["name"] or r["low"] is not None)
            and not r["name"].startswith(("external.", "shift."))]
    return [r for r in rows if r["low"] is not None], [r for r in rows if r["low"] is None]


def per_class(details) -> tuple[list[str], list[list]]:
    """Header and rows of the per-class table in evaluate's report (support, sensitivity, ...)."""
    table = (details or {}).get("per_class") if isinstance(details, dict) else None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        return [], []
    cols: list[str] = []
    for v in table.values():
        cols += [k for k, x in v.items() if k not in cols and (_num(x) or x is None)]
    return ["class"] + cols, [[c] + [fmt(v.get(k)) for k in cols] for c, v in table.items()]


def subgroups(details, metric: str = "roc_auc") -> list[dict]:
    """One row per subgroup value: n, patients, the metric with its interval, and why it is flagged."""
    table = (details or {}).get("subgroups") if isinstance(details, dict) else None
    out = []
    if not isinstance(table, dict):
        return out
    for col, values in table.items():
        if not isinstance(values, dict):
            continue
        for value, e in values.items():
            if not isinstance(e, dict):
                continue
            iv, _ = _interval(e, metric)
            out.append({"column": str(col), "value": str(value), "n": e.get("n"), "patients": e.get("n_groups"),
                        "metric": e.get(metric), "low": iv[0] if iv else None, "high": iv[1] if iv else None,
                        "flag": e.get("reason") if e.get("too_small") else ""})
    return out


def confusion(ev: dict) -> tuple[list[str], list[list]] | None:
    """(class labels, matrix) from evaluate's report, or the first matrix in metrics.json."""
    details = ev.get("evaluation") or {}
    mat = details.get("confusion_matrix") if isinstance(details, dict) else None
    if not (isinstance(mat, list) and mat and all(isinstance(r, list) for r in mat)):
        found = matrices(ev.get("metrics") or {})
        mat = next((m for name, m in found.items() if "normalized" not in name), None)
    if not mat:
        return None
    classes = [str(c) for c in (ev.get("model") or {}).get("classes") or []]
    labels = classes if len(classes) == len(mat) else [str(i) for i in range(len(mat))]
    return labels, mat


def ci_text(r: dict) -> str:
    return f"{fmt(r['low'])} – {fmt(r['high'])}" if r.get("low") is not None else ""


VALIDATION_METRICS = ("roc_auc", "sensitivity", "specificity")


def validation_sets(details) -> list[dict]:
    """The held-out test split and every external set, side by side (evaluate's `external` and `shift`).

    Each row: name, kind (internal/external), n, patients, the headline metrics with their intervals, the
    intensity distance to the training images, and the shift flags. Empty when evaluate ran no external set.
    """
    if not isinstance(details, dict) or not isinstance(details.get("external"), dict) or not details["external"]:
        return []

    def row(name: str, kind: str, report: dict, shift) -> dict:
        shift = shift if isinstance(shift, dict) else {}
        metrics = {m: {"value": report.get(m), "low": report.get(f"{m}_ci_low"), "high": report.get(f"{m}_ci_high")}
                   for m in VALIDATION_METRICS}
        return {"name": name, "kind": kind, "n": report.get("n"), "patients": report.get("n_groups"), "metrics": metrics,
                "intensity_distance": shift.get("intensity_wasserstein"), "intensity_shift": shift.get("intensity_shift"),
                "operating_point_shift": shift.get("operating_point_shift"),
                "prevalence": shift.get("prevalence"), "predicted_prevalence": shift.get("predicted_prevalence")}

    rows = [row(str(details.get("split") or "test"), "internal", details, details.get("shift"))]
    rows += [row(name, "external", r, r.get("shift")) for name, r in details["external"].items() if isinstance(r, dict)]
    return rows


def validation_table(details) -> tuple[list[str], list[list[str]]]:
    """Header and text rows of the side-by-side table; a flag names what moved."""
    header = ["set", "kind", "images", "patients"] + [f"{m} (95% CI)" for m in VALIDATION_METRICS] + \
             ["intensity distance", "prevalence (true / predicted)", "flags"]
    out = []
    for r in validation_sets(details):
        flags = [f for f, on in (("intensity shift", r["intensity_shift"]),
                                 ("operating point moved", r["operating_point_shift"])) if on]
        out.append([r["name"], r["kind"], fmt(r["n"]), fmt(r["patients"])] +
                   [f"{fmt(m['value'], 3)} ({fmt(m['low'], 3)} – {fmt(m['high'], 3)})" if m["low"] is not None
                    else fmt(m["value"], 3) for m in r["metrics"].values()] +
                   [fmt(r["intensity_distance"], 3), f"{fmt(r['prevalence'], 3)} / {fmt(r['predicted_prevalence'], 3)}",
                    ", ".join(flags) or "none"])
    return header, out
