"""evaluate: models/model.pt on validation and test -> reports/ (metrics, operating point, predictions, plots, saliency)."""
import sys
from pathlib import Path

# The medtl beside this script, whatever the environment installs: a queued or --temp experiment runs in a copy
# of the project, and dvc.lock records that copy's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json

from medtl.evaluate.evaluation import EvaluateParams, run_evaluate
from medtl.evaluate.external import set_columns
from medtl.evaluate.reports import load_evaluation, load_robustness
from medtl.params import load_section
from medtl.provenance import stage_record
from medtl.stage import main

MODEL, PREPARED, OUT = Path("models/model.pt"), Path("data/prepared"), Path("reports")
MANIFEST = Path("data/ingested/manifest.csv")  # source refs of the failure cases
OUTPUTS = [OUT / "metrics.json", OUT / "evaluation.json", OUT / "operating_point.json", OUT / "predictions.csv",
           OUT / "val_predictions.csv", OUT / "external_predictions.csv", OUT / "plots", OUT / "saliency",
           OUT / "robustness.json", OUT / "failures"]


def _fmt(m: dict, name: str) -> str:
    if m.get(name) is None:
        return "n/a"
    low, high = m.get(f"{name}_ci_low"), m.get(f"{name}_ci_high")
    return f"{m[name]:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")


def run() -> str:
    params = load_section("evaluate", EvaluateParams)
    external = [Path(x) for e in params.external for x in e.source_inputs()]
    with stage_record("evaluate", params, inputs=[MODEL, PREPARED, MANIFEST, *external], outputs=OUTPUTS) as rec:
        m = run_evaluate(params, MODEL, PREPARED, OUT, manifest=MANIFEST)
        rec.hardware = load_evaluation(OUT)["hardware"]
    line = f"{params.split} split, {m['n']} images / {m['n_groups']} patients: ROC AUC {_fmt(m, 'roc_auc')}, " \
           f"accuracy {m['accuracy']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f}"
    if m.get("threshold") is not None:
        line += f"; at threshold {m['threshold']:.3f} ({m['threshold_rule']}, fitted on val): " \
                f"sensitivity {_fmt(m, 'sensitivity')}, specificity {_fmt(m, 'specificity')}"
    for name in (e.name for e in params.external):
        e = set_columns(m, name)
        flags = [f for f in ("intensity_shift", "operating_point_shift", "transductive") if e.get(f)]
        line += f"; external {name}, {e['n']} images: ROC AUC {_fmt(e, 'roc_auc')}" + \
                (f" [{', '.join(flags)}]" if flags else "")
    worst = (load_robustness(OUT) or {}).get("worst")
    if worst:
        line += f"; robustness: largest ROC AUC drop {worst['roc_auc_drop']:.3f} ({worst['perturbation']} " \
                f"severity {worst['severity']}, {worst['flipped']:.0%} of decisions flipped)"
    return line


if __name__ == "__main__":
    main("evaluate", run)
