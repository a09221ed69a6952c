"""Classification metrics on predicted probabilities: the engine (metrics, bootstrap, operating points, calibration).

The report built from them (per class, subgroups, curves) is `medtl.evaluate.metrics_report`.

Everything here is a pure function of numpy arrays: labels `y_true` (N,) as
integers 0..K-1 and class probabilities `probs` (N, K) (a 1-D `probs` is read
as the positive-class probability of a binary task). For a binary task the
positive class is index 1 and an image is called positive when
`p_pos >= threshold` (0.5 unless an operating point fitted on validation data
is given); for K > 2 the predicted class is the argmax.

Point estimates and bootstrap replicates go through one code path: a metric is
computed from per-image weights, all ones for the point estimate and the
number of times each image was drawn for a resample. Drawing whole patients
(groups) then only changes the weights, so thousands of resamples cost a few
sparse matrix products instead of thousands of Python-level metric calls.

Undefined values (a sensitivity without positives, an AUC with one class) are
NaN inside this module and None in every dict it returns, so reports are
valid JSON.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property

import numpy as np
from scipy import sparse
from scipy.special import log_softmax, softmax

from medtl.errors import MedtlError

DEFAULT_THRESHOLD = 0.5
THRESHOLD_RULES = ("fixed", "youden", "sensitivity", "specificity")

# Headline metrics, in report order; the binary-only ones read the positive class at the threshold.
BINARY_HEADLINE = (
    "roc_auc", "pr_auc", "sensitivity", "specificity", "ppv", "npv", "f1",
    "accuracy", "balanced_accuracy", "f1_macro", "kappa", "brier", "ece",
)
MULTICLASS_HEADLINE = (
    "roc_auc", "pr_auc", "accuracy", "balanced_accuracy", "f1_macro", "kappa", "brier", "ece",
)
_BINARY_ONLY = frozenset({"sensitivity", "specificity", "ppv", "npv", "f1"})
_CONFUSION = frozenset({"accuracy", "balanced_accuracy", "f1_macro", "kappa"}) | _BINARY_ONLY
_RANKING = frozenset({"roc_auc", "pr_auc"})
_CALIBRATION = frozenset({"brier", "ece"})
METRIC_NAMES = tuple(sorted(_CONFUSION | _RANKING | _CALIBRATION))

# Resamples are evaluated in chunks so that the (resamples x images) weight matrix stays small.
_CHUNK_ELEMENTS = 4_000_000

MetricFn = Callable[[np.ndarray, np.ndarray], "float | None"]


# ---------------------------------------------------------------- validation


def _labels_and_probs(y_true, probs, name_y: str = "y_true", name_p: str = "probs") -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"{name_y} must be 1-D (N,), got shape {y.shape}")
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"{name_p} must be (N, K) with K >= 2 or 1-D positive-class probabilities, got shape {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"{name_y} has {y.shape[0]} entries but {name_p} has {p.shape[0]} rows; expected one row per label")
    if y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y)))):
        raise ValueError(f"{name_y} must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    k = p.shape[1]
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"{name_y} must hold class indices in 0..{k - 1} for {k} classes, got values {y.min()}..{y.max()}")
    if not np.all(np.isfinite(p)) or (p.size and (p.min() < -1e-9 or p.max() > 1 + 1e-9)):
        raise ValueError(f"{name_p} must be finite probabilities in [0, 1]; got values outside that range (pass softmax outputs, not logits)")
    return y, np.clip(p, 0.0, 1.0)


def _check_threshold(threshold, k: int) -> float | None:
    if k > 2:
        return None  # K > 2 predicts by argmax; a threshold has no meaning there
    if threshold is None:
        return DEFAULT_THRESHOLD
    t = float(threshold)
    if not math.isfinite(t):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    return t


def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def _metric_names(metrics, k: int) -> tuple[list[str], dict[str, MetricFn]]:
    """Split `metrics` into built-in names (fast weighted path) and custom callables."""
    if metrics is None:
        return list(headline_metrics(k)), {}
    if isinstance(metrics, str):
        metrics = [metrics]
    if isinstance(metrics, Mapping):
        names, custom = [], {}
        for name, fn in metrics.items():
            if fn is None:
                names.append(name)
            elif callable(fn):
                custom[str(name)] = fn
            else:
                raise ValueError(f"metrics[{name!r}] must be a callable fn(y_true, probs) -> float or None, got {type(fn).__name__}")
    else:
        names, custom = list(metrics), {}
    for name in names:
        if name not in METRIC_NAMES:
            raise ValueError(f"unknown metric {name!r}; expected one of {', '.join(METRIC_NAMES)} or a callable")
        if k > 2 and name in _BINARY_ONLY:
            raise ValueError(
                f"metric {name!r} is defined for binary tasks only; for {k} classes use per_class values or one of "
                + ", ".join(MULTICLASS_HEADLINE)
            )
    return names, custom


def headline_metrics(n_classes: int) -> tuple[str, ...]:
    """The metrics reported (with intervals) at the top of a report for a task with `n_classes` classes."""
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    return BINARY_HEADLINE if n_classes == 2 else MULTICLASS_HEADLINE


# ---------------------------------------------------------------- small helpers


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den == 0 (an undefined rate, not a zero one)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    safe = np.where(den > 0, den, 1.0)
    return np.where(den > 0, num / safe, np.nan)


def _indicator(index: np.ndarray, n_cols: int, values: np.ndarray | None = None) -> sparse.csr_array:
    """(N, n_cols) sparse matrix with `values` (default 1) at column index[i] of row i."""
    n = index.shape[0]
    data = np.ones(n) if values is None else np.asarray(values, dtype=np.float64)
    return sparse.csr_array((data, (np.arange(n), index)), shape=(n, n_cols))


def _column_sums(s: sparse.csr_array, w: np.ndarray) -> np.ndarray:
    """For weights w (R, N): (R, n_cols) weighted sums per column of s."""
    return np.asarray(s.T @ w.T).T


def _nan_to_none(x):
    if isinstance(x, dict):
        return {str(k): _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, np.ndarray):
        return _nan_to_none(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def predict_labels(probs, threshold: float | None = None) -> np.ndarray:
    """Predicted class per image: p_pos >= threshold (default 0.5) for binary, argmax for K > 2."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must be (N, K) with K >= 2 or 1-D positive-class probabilities, got shape {p.shape}")
    t = _check_threshold(threshold, p.shape[1])
    if t is None:
        return p.argmax(axis=1)
    return (p[:, 1] >= t).astype(np.int64)


# ---------------------------------------------------------------- weighted engine


class _Scorer:
    """Built-in metrics of one set of predictions under per-image weights W (R, N)."""

    def __init__(self, y: np.ndarray, probs: np.ndarray, threshold: float | None, n_bins: int = 15):
        self.y = y
        self.probs = probs
        self.k = probs.shape[1]
        self.n = y.shape[0]
        self.threshold = _check_threshold(threshold, self.k)
        self.y_pred = predict_labels(probs, self.threshold)
        self.n_bins = n_bins

    @cached_property
    def _cells(self) -> sparse.csr_array:
        return _indicator(self.y * self.k + self.y_pred, self.k * self.k)

    @cached_property
    def _ranking(self) -> list[tuple[sparse.csr_array, sparse.csr_array]]:
        # One score column for binary (p_pos), one per class (one-vs-rest) otherwise.
        columns = [1] if self.k == 2 else list(range(self.k))
        out = []
        for c in columns:
            distinct, block = np.unique(self.probs[:, c], return_inverse=True)
            target = (self.y == c).astype(np.float64)
            out.append((_indicator(block, len(distinct), target), _indicator(block, len(distinct), 1.0 - target)))
        return out

    @cached_property
    def _calibration(self) -> tuple[sparse.csr_array, sparse.csr_array, np.ndarray]:
        conf, observed = _calibration_inputs(self.y, self.probs)
        bins = _bin_index(conf, self.n_bins)
        onehot = np.zeros_like(self.probs)
        onehot[np.arange(self.n), self.y] = 1.0
        brier = ((self.probs - onehot) ** 2).mean(axis=1)
        return _indicator(bins, self.n_bins, conf), _indicator(bins, self.n_bins, observed), brier

    def confusion(self, w: np.ndarray) -> np.ndarray:
        """(R, K, K) weighted confusion matrices, rows = true class, columns = predicted."""
        return _column_sums(self._cells, w).reshape(-1, self.k, self.k)

    def per_class(self, w: np.ndarray) -> dict[str, np.ndarray]:
        cm = self.confusion(w)
        total = cm.sum(axis=(1, 2))
        tp = np.diagonal(cm, axis1=1, axis2=2)
        support = cm.sum(axis=2)
        predicted = cm.sum(axis=1)
        fn = support - tp
        fp = predicted - tp
        tn = total[:, None] - tp - fn - fp
        return {
            "cm": cm, "total": total, "tp": tp, "support": support, "predicted": predicted,
            "sensitivity": _div(tp, support),
            "specificity": _div(tn, tn + fp),
            "ppv": _div(tp, predicted),
            "npv": _div(tn, tn + fn),
            "f1": _div(2 * tp, 2 * tp + fp + fn),
        }

    def _confusion_metrics(self, w: np.ndarray) -> dict[str, np.ndarray]:
        pc = self.per_class(w)
        total, sens = pc["total"], pc["sensitivity"]
        present = pc["support"] > 0
        # Balanced accuracy averages recall over the classes present, as scikit-learn does.
        bal = _div(np.where(present, sens, 0.0).sum(axis=1), present.sum(axis=1))
        p_o = _div(pc["tp"].sum(axis=1), total)
        p_e = _div((pc["support"] * pc["predicted"]).sum(axis=1), total**2)
        out = {
            "accuracy": p_o,
            "balanced_accuracy": bal,
            "f1_macro": pc["f1"].mean(axis=1),  # NaN if any class is undefined
            "kappa": _div(p_o - p_e, 1.0 - p_e),
        }
        if self.k == 2:
            for name in _BINARY_ONLY:
                out[name] = pc[name][:, 1]
        return out

    def _ranking_metrics(self, w: np.ndarray) -> dict[str, np.ndarray]:
        aucs, aps = [], []
        for s_pos, s_neg in self._ranking:
            pos = _column_sums(s_pos, w)  # (R, B): weight of positives per distinct score, ascending
            neg = _column_sums(s_neg, w)
            n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
            neg_below = np.cumsum(neg, axis=1) - neg
            # Mann-Whitney: a positive beats every lower-scored negative, ties count half.
            aucs.append(_div((pos * (neg_below + 0.5 * neg)).sum(axis=1), n_pos * n_neg))
            # Average precision, step-wise as scikit-learn: sum over thresholds of delta-recall * precision.
            tp_at = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]
            fp_at = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]
            precision = np.nan_to_num(_div(tp_at, tp_at + fp_at))
            aps.append(_div((pos * precision).sum(axis=1), n_pos))
        # Macro one-vs-rest: undefined unless every class is defined.
        return {"roc_auc": np.mean(aucs, axis=0), "pr_auc": np.mean(aps, axis=0)}

    def _calibration_metrics(self, w: np.ndarray) -> dict[str, np.ndarray]:
        s_conf, s_obs, brier = self._calibration
        total = w.sum(axis=1)
        gap = np.abs(_column_sums(s_conf, w) - _column_sums(s_obs, w)).sum(axis=1)
        return {"ece": _div(gap, total), "brier": _div(w @ brier, total)}

    def evaluate(self, w: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        wanted = set(names)
        out: dict[str, np.ndarray] = {}
        if wanted & _CONFUSION:
            out.update(self._confusion_metrics(w))
        if wanted & _RANKING:
            out.update(self._ranking_metrics(w))
        if wanted & _CALIBRATION:
            out.update(self._calibration_metrics(w))
        return {name: out[name] for name in names}


def point_estimates(y_true, probs, metrics: Sequence[str] | None = None, *, threshold: float | None = None,
                    n_bins: int = 15) -> dict[str, float | None]:
    """Built-in metrics by name (default: the headline set) on the whole data set."""
    y, p = _labels_and_probs(y_true, probs)
    names, custom = _metric_names(metrics, p.shape[1])
    if custom:
        raise ValueError("point_estimates takes metric names only; call custom metric functions directly")
    if y.size == 0:
        return {name: None for name in names}
    scorer = _Scorer(y, p, threshold, _check_n_bins(n_bins))
    values = scorer.evaluate(np.ones((1, y.size)), names)
    return _nan_to_none({name: values[name][0] for name in names})


# ---------------------------------------------------------------- single metrics


def confusion_matrix(y_true, y_pred, n_classes: int, *, normalize: bool = False) -> np.ndarray:
    """(K, K) counts, rows = true class, columns = predicted; `normalize` divides each row by its total (NaN rows if empty)."""
    y = np.asarray(y_true, dtype=np.int64)
    yp = np.asarray(y_pred, dtype=np.int64)
    if y.shape != yp.shape or y.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of equal length, got shapes {y.shape} and {yp.shape}")
    for name, arr in (("y_true", y), ("y_pred", yp)):
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            raise ValueError(f"{name} must hold class indices in 0..{n_classes - 1}, got values {arr.min()}..{arr.max()}")
    cm = np.bincount(y * n_classes + yp, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    if not normalize:
        return cm
    return _div(cm, cm.sum(axis=1, keepdims=True))


def roc_auc(y_true, probs) -> float | None:
    """ROC AUC of p_pos (binary) or the macro mean of one-vs-rest AUCs (K > 2); None if a class is absent."""
    return point_estimates(y_true, probs, ["roc_auc"])["roc_auc"]


def pr_auc(y_true, probs) -> float | None:
    """Average precision of p_pos (binary) or its macro mean over classes (K > 2); None if a class is absent."""
    return point_estimates(y_true, probs, ["pr_auc"])["pr_auc"]


def cohen_kappa(y_true, y_pred, n_classes: int) -> float | None:
    """Cohen's kappa between true and predicted classes; None when chance agreement is 1."""
    cm = confusion_matrix(y_true, y_pred, n_classes).astype(np.float64)
    total = cm.sum()
    if total == 0:
        return None
    p_o = np.trace(cm) / total
    p_e = float(cm.sum(axis=1) @ cm.sum(axis=0)) / total**2
    return None if p_e == 1.0 else float((p_o - p_e) / (1.0 - p_e))


# ---------------------------------------------------------------- calibration


def _calibration_inputs(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted probability, observed outcome) per image.

    Binary: p_pos against "is positive", the reliability diagram a clinician
    reads. K > 2: top-label confidence against "argmax was right".
    """
    if probs.shape[1] == 2:
        return probs[:, 1], (y == 1).astype(np.float64)
    return probs.max(axis=1), (probs.argmax(axis=1) == y).astype(np.float64)


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    # Equal-width bins on [0, 1]; 1.0 falls in the last bin.
    return np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)


def expected_calibration_error(y_true, probs, n_bins: int = 15) -> float | None:
    """Sum over equal-width bins of (bin share) * |mean predicted - observed frequency|."""
    return point_estimates(y_true, probs, ["ece"], n_bins=n_bins)["ece"]


def brier_score(y_true, probs) -> float | None:
    """Binary: mean (p_pos - y)^2. K > 2: mean over images and classes of the squared error to the one-hot label."""
    return point_estimates(y_true, probs, ["brier"])["brier"]


def reliability_diagram(y_true, probs, n_bins: int = 15) -> list[dict]:
    """One row per equal-width bin: bin_centre, mean_predicted, observed (None if empty), count."""
    y, p = _labels_and_probs(y_true, probs)
    n_bins = _check_n_bins(n_bins)
    conf, observed = _calibration_inputs(y, p)
    bins = _bin_index(conf, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    mean_pred = _div(np.bincount(bins, weights=conf, minlength=n_bins), count)
    obs = _div(np.bincount(bins, weights=observed, minlength=n_bins), count)
    rows = [
        {"bin_centre": (b + 0.5) / n_bins, "mean_predicted": mean_pred[b], "observed": obs[b], "count": count[b]}
        for b in range(n_bins)
    ]
    return _nan_to_none(rows)


def _check_logits(logits, y, name_logits: str = "logits", name_y: str = "y") -> tuple[np.ndarray, np.ndarray | None]:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"{name_logits} must be (N, K) with K >= 2, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError(f"{name_logits} must be finite")
    if y is None:
        return z, None
    labels = np.asarray(y)
    if labels.shape != (z.shape[0],):
        raise ValueError(f"{name_y} must be 1-D with one label per row of {name_logits} ({z.shape[0]}), got shape {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= z.shape[1]):
        raise ValueError(f"{name_y} must hold class indices in 0..{z.shape[1] - 1}")
    return z, labels


def negative_log_likelihood(logits, y, temperature: float = 1.0) -> float:
    """Mean cross-entropy of softmax(logits / temperature) against integer labels y."""
    z, labels = _check_logits(logits, y)
    if z.shape[0] == 0:
        raise ValueError("logits must have at least one row")
    return float(-log_softmax(z / temperature, axis=1)[np.arange(z.shape[0]), labels].mean())


def fit_temperature(logits_val, y_val, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature T > 0 that minimises the validation NLL of softmax(logits / T).

    NLL is convex in 1/T, hence unimodal in log T, so a bounded 1-D search on
    log T finds the optimum. Fit on validation data, never on the test split.
    """
    z, labels = _check_logits(logits_val, y_val, "logits_val", "y_val")
    if z.shape[0] == 0:
        raise MedtlError("cannot fit a temperature on an empty validation set; logits_val has no rows")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must be (low, high) with 0 < low < high, got {bounds!r}")
    rows = np.arange(z.shape[0])

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / math.exp(log_t), axis=1)[rows, labels].mean())

    from scipy import optimize  # only here: importing it costs every `medtl predict` a third of a second

    res = optimize.minimize_scalar(nll, bounds=(math.log(lo), math.log(hi)), method="bounded",
                                   options={"xatol": 1e-6})
    return float(math.exp(res.x))


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """Class probabilities softmax(logits / temperature), (N, K)."""
    z, _ = _check_logits(logits, None)
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return softmax(z / t, axis=1)


# ---------------------------------------------------------------- operating point


def threshold_rule_problem(rule: str, target: float | None) -> str | None:
    """What is wrong with a threshold rule and its target, or None: the one check, for params and calls alike."""
    if rule not in THRESHOLD_RULES:
        return f"a rule among {', '.join(THRESHOLD_RULES)}"
    if rule in ("sensitivity", "specificity"):
        if target is None or isinstance(target, bool) or not 0.0 < float(target) <= 1.0:
            return f"a target {rule} to reach on validation, a number in (0, 1]"
    elif rule == "fixed":
        if target is not None and (isinstance(target, bool) or not 0.0 <= float(target) <= 1.0):
            return "a target that is the threshold itself, a number in [0, 1] (null: 0.5)"
    elif target is not None:
        return "no target: rule 'youden' takes none (target is for rules sensitivity, specificity and fixed)"
    return None


def check_binary_scores(y_true, p_pos, purpose: str) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels (0/1) and positive-class scores as int64 / float64 1-D arrays of equal length."""
    y = np.asarray(y_true)
    s = np.asarray(p_pos, dtype=np.float64)
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"y_true and p_pos must be 1-D of equal length, got shapes {y.shape} and {s.shape}")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError(f"y_true must hold binary labels 0 (negative) and 1 (positive) {purpose}")
    return y.astype(np.int64), s


def choose_threshold(y_true, p_pos, rule: str, target: float | None = None) -> float:
    """Operating threshold on the positive-class probability, fitted on VALIDATION data.

    An image is called positive when p_pos >= threshold; candidate thresholds
    are the observed validation scores.
    - "youden": maximises sensitivity + specificity - 1 (the highest such threshold on ties).
    - "sensitivity": the highest threshold whose sensitivity is >= target.
    - "specificity": the lowest threshold whose specificity is >= target.
    - "fixed": `target` itself (default 0.5); the data are not looked at.
    """
    problem = threshold_rule_problem(rule, target)
    if problem:
        raise MedtlError(f"threshold rule {rule!r} with target {target!r}: expected {problem}")
    if rule == "fixed":
        return DEFAULT_THRESHOLD if target is None else float(target)
    y, s = check_binary_scores(y_true, p_pos, "to choose a threshold")
    if not np.all(np.isfinite(s)):
        raise ValueError("p_pos must be finite")
    pos, neg = s[y == 1], s[y == 0]
    needs_pos = rule in ("youden", "sensitivity")
    needs_neg = rule in ("youden", "specificity")
    if (needs_pos and pos.size == 0) or (needs_neg and neg.size == 0):
        raise MedtlError(
            f"cannot choose a threshold by rule {rule!r}: the validation labels have {pos.size} positives and "
            f"{neg.size} negatives; the rule needs both classes in the validation split"
        )
    candidates = np.unique(s)[::-1]  # descending
    if rule == "specificity":
        # Above every score nothing is called positive: specificity 1 is always reachable.
        candidates = np.concatenate([[np.nextafter(candidates[0], np.inf)], candidates])
    sorted_pos, sorted_neg = np.sort(pos), np.sort(neg)
    tp = sorted_pos.size - np.searchsorted(sorted_pos, candidates, side="left")
    fp = sorted_neg.size - np.searchsorted(sorted_neg, candidates, side="left")
    eps = 1e-12  # so that e.g. 9/10 counts as reaching a target of 0.9
    if rule == "youden":
        j = tp / pos.size - fp / neg.size
        return float(candidates[int(np.argmax(j))])
    if rule == "sensitivity":
        ok = np.flatnonzero(tp / pos.size >= float(target) - eps)
        return float(candidates[ok[0]])
    ok = np.flatnonzero(1.0 - fp / neg.size >= float(target) - eps)
    return float(candidates[ok[-1]])


def operating_point(y_val, probs_val, rule: str, target: float | None = None) -> dict:
    """choose_threshold on validation data, with what a report needs to say about it."""
    y, p = _labels_and_probs(y_val, probs_val, "y_val", "probs_val")
    if p.shape[1] != 2:
        raise MedtlError(f"an operating threshold applies to binary tasks; probs_val has {p.shape[1]} classes (K > 2 uses argmax)")
    threshold = choose_threshold(y, p[:, 1], rule, target)
    at = point_estimates(y, p, ["sensitivity", "specificity"], threshold=threshold) if y.size else {}
    return _nan_to_none({
        "rule": rule,
        "target": None if target is None else float(target),
        "threshold": threshold,
        "fitted_on": "fixed" if rule == "fixed" else "validation",
        "n_val": int(y.size),
        "val_sensitivity": at.get("sensitivity"),
        "val_specificity": at.get("specificity"),
    })


# ---------------------------------------------------------------- bootstrap


def _units(groups, n: int) -> tuple[np.ndarray, int]:
    """Resampling unit index per image: its group (patient), or the image itself."""
    if groups is None:
        return np.arange(n), n
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must be 1-D with one entry per image ({n}), got shape {g.shape}")
    _, unit = np.unique(g.astype(str), return_inverse=True)
    return unit.reshape(-1), int(unit.max()) + 1 if n else 0


def _check_bootstrap_args(n_resamples, alpha) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1) (0.05 gives a 95% interval), got {alpha!r}")


def _resample_weights(unit: np.ndarray, n_units: int, n_resamples: int, seed: int):
    """(start, W) chunks: W (r, N) holds how often each image enters each resample (whole units drawn)."""
    n = unit.size
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, _CHUNK_ELEMENTS // max(n, n_units, 1)))
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        # One row of unit draws per resample, so results do not depend on the chunk size.
        draws = np.stack([rng.integers(n_units, size=n_units) for _ in range(r)])
        counts = np.bincount((draws + n_units * np.arange(r)[:, None]).ravel(), minlength=r * n_units)
        yield start, counts.reshape(r, n_units)[:, unit].astype(np.float64)


def _bootstrap_replicates(y, p, unit, n_units, names, custom, n_resamples, seed, threshold, n_bins) -> dict[str, np.ndarray]:
    """(n_resamples,) replicate values per metric, NaN where a resample leaves it undefined."""
    scorer = _Scorer(y, p, threshold, n_bins)
    reps = {name: np.empty(n_resamples) for name in [*names, *custom]}
    images = np.arange(y.size)
    for start, w in _resample_weights(unit, n_units, n_resamples, seed):
        r = len(w)
        if names:
            for name, values in scorer.evaluate(w, names).items():
                reps[name][start:start + r] = values
        for name, fn in custom.items():
            for i in range(r):
                idx = np.repeat(images, w[i].astype(np.int64))
                value = fn(y[idx], p[idx])
                reps[name][start + i] = np.nan if value is None else float(value)
    return reps


def _interval(values: np.ndarray, alpha: float) -> dict:
    valid = values[np.isfinite(values)]
    skipped = int(values.size - valid.size)
    if valid.size == 0:
        return {"low": None, "high": None, "skipped": skipped}
    low, high = np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"low": float(low), "high": float(high), "skipped": skipped}


def bootstrap_ci(y_true, probs, groups=None, metrics: Sequence[str] | Mapping[str, MetricFn | None] | None = None,
                 n_resamples: int = 1000, seed: int = 0, threshold: float | None = None, alpha: float = 0.05,
                 *, n_bins: int = 15) -> dict[str, dict]:
    """Percentile bootstrap intervals, resampling groups (patients) with replacement.

    `groups` (N,) names each image's patient; None resamples images. `metrics`
    is a list of built-in names (default: the headline set) or a mapping of
    name -> fn(y_true, probs) -> float | None (None value: a built-in). The
    threshold is fixed, not refitted per resample: it belongs to the model.
    Resamples where a metric is undefined (e.g. one class only) are skipped
    and counted. Returns {metric: {"low", "high", "skipped"}}.
    """
    y, p = _labels_and_probs(y_true, probs)
    names, custom = _metric_names(metrics, p.shape[1])
    _check_bootstrap_args(n_resamples, alpha)
    n_bins = _check_n_bins(n_bins)
    threshold = _check_threshold(threshold, p.shape[1])
    unit, n_units = _units(groups, y.size)
    if y.size == 0:
        return {name: {"low": None, "high": None, "skipped": int(n_resamples)} for name in [*names, *custom]}
    reps = _bootstrap_replicates(y, p, unit, n_units, names, custom, int(n_resamples), seed, threshold, n_bins)
    return {name: _interval(values, float(alpha)) for name, values in reps.items()}




PER_CLASS_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1")


def per_class_metrics(y_true, probs, groups=None, *, threshold: float | None = None, n_resamples: int = 1000,
                      seed: int = 0, alpha: float = 0.05) -> tuple[list[dict], np.ndarray]:
    """Per class (one-vs-rest at the operating threshold): support and each of PER_CLASS_METRICS with a
    percentile interval from the same group (patient) bootstrap as the headline metrics; and the confusion counts."""
    y, p = _labels_and_probs(y_true, probs)
    _check_bootstrap_args(n_resamples, alpha)
    threshold = _check_threshold(threshold, p.shape[1])
    scorer = _Scorer(y, p, threshold)
    point = scorer.per_class(np.ones((1, y.size)))
    unit, n_units = _units(groups, y.size)
    k = p.shape[1]
    reps = {m: np.empty((n_resamples, k)) for m in PER_CLASS_METRICS}
    if y.size:
        for start, w in _resample_weights(unit, n_units, int(n_resamples), seed):
            pc = scorer.per_class(w)
            for m in PER_CLASS_METRICS:
                reps[m][start:start + len(w)] = pc[m]
    out = []
    for c in range(k):
        entry: dict = {"support": int(point["support"][0, c])}
        for m in PER_CLASS_METRICS:
            ci = _interval(reps[m][:, c], float(alpha)) if y.size else {"low": None, "high": None}
            entry[m] = point[m][0, c]
            entry[f"{m}_ci_low"], entry[f"{m}_ci_high"] = ci["low"], ci["high"]
        out.append(_nan_to_none(entry))
    return out, point["cm"][0].astype(np.int64)
