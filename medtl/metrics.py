"""Classification metrics on predicted probabilities."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Headline metrics for integer labels `y_true` (N,) and class probabilities `probs` (N, K)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    y_pred = probs.argmax(axis=1)
    out: dict = {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
    }
    present = np.unique(y_true)
    if len(present) < 2:
        out["roc_auc"] = None
    elif k == 2:
        out["roc_auc"] = float(skm.roc_auc_score(y_true, probs[:, 1]))
    else:
        out["roc_auc"] = float(skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=range(k)))
    cm = skm.confusion_matrix(y_true, y_pred, labels=range(k))
    per_class = {}
    for i, name in enumerate(classes):
        tp = cm[i, i]
        fn = cm[i].sum() - tp
        fp = cm[:, i].sum() - tp
        tn = cm.sum() - tp - fn - fp
        sens = tp / (tp + fn) if tp + fn else 0.0
        spec = tn / (tn + fp) if tn + fp else 0.0
        prec = tp / (tp + fp) if tp + fp else 0.0
        f1 = 2 * prec * sens / (prec + sens) if prec + sens else 0.0
        per_class[name] = {"sensitivity": float(sens), "specificity": float(spec), "f1": float(f1)}
    out["per_class"] = per_class
    out["f1_macro"] = float(np.mean([c["f1"] for c in per_class.values()]))
    if k == 2:
        pos = per_class[classes[1]]
        out["sensitivity"] = pos["sensitivity"]
        out["specificity"] = pos["specificity"]
    out["confusion_matrix"] = cm.tolist()
    return out
