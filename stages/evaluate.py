"""evaluate: models/model.pt on the test split -> reports/metrics.json, predictions and plots."""
from pathlib import Path

from medtl.evaluation import EvaluateParams, run_evaluate
from medtl.params import load_section
from medtl.provenance import stage_record
from medtl.stage import main

MODEL, PREPARED, OUT = Path("models/model.pt"), Path("data/prepared"), Path("reports")
OUTPUTS = [OUT / "metrics.json", OUT / "predictions.csv", OUT / "plots"]


def run() -> str:
    params = load_section("evaluate", EvaluateParams)
    with stage_record("evaluate", params, inputs=[MODEL, PREPARED], outputs=OUTPUTS):
        m = run_evaluate(params, MODEL, PREPARED, OUT)
    auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}"
    return f"{params.split} split, {m['n']} images: ROC AUC {auc}, accuracy {m['accuracy']:.3f}, " \
           f"balanced accuracy {m['balanced_accuracy']:.3f}"


if __name__ == "__main__":
    main("evaluate", run)
