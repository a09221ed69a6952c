"""The robustness report: the evaluated split re-scored under a fixed, seeded set of perturbations.

Each perturbation works on the prepared images in [0, 1] (the model's input
before normalisation) at a few severities, from mild to strong, with its
parameters fixed here so that two models are always compared on the same
perturbed images:

- what scanners and pipelines do to images: gaussian noise, blur, lower
  contrast, a gamma change, JPEG re-compression, a small rotation, a small
  shift, and resolution loss (down- then up-sampling);
- what an attacker does: FGSM and PGD (medtl.train.attacks) at `epsilons`, against
  the true labels, on the plain eager model.

Every condition is scored at the operating point fitted on validation (never
refitted) with the same patient bootstrap as the clean metrics, and compared
with the clean images: the drop of each metric and the share of decisions
that flip. Random draws (noise, rotation sign, shift direction, PGD start)
come from generators seeded by (seed, perturbation), and the same draws are
scaled across severities, so a higher severity is the same change, larger.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np
import torch

from medtl import hardware
from medtl.metrics import apply_temperature, bootstrap_ci, point_estimates, predict_labels
from medtl.model.inference import predict_logits
from medtl.params import require
from medtl.train import attacks

ROBUSTNESS_FORMAT = "medtl-robustness/1"

Perturb = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _per_image(images: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """fn on each (H, W, C) float32 image; the result back as (N, C, H, W)."""
    out = np.empty_like(images, dtype=np.float32)
    for i, img in enumerate(images):
        res = fn(np.ascontiguousarray(img.transpose(1, 2, 0), dtype=np.float32))
        out[i] = (res[:, :, None] if res.ndim == 2 else res).transpose(2, 0, 1)
    return out


def gaussian_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + std * rng.standard_normal(x.shape, dtype=np.float32), 0.0, 1.0)


def blur(x: np.ndarray, sigma_fraction: float, rng: np.random.Generator) -> np.ndarray:
    sigma = sigma_fraction * x.shape[-1]
    return _per_image(x, lambda img: cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT))


def contrast(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Intensities pulled towards each image's mean by `factor` (1: unchanged)."""
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return np.clip(mean + factor * (x - mean), 0.0, 1.0)


def gamma(x: np.ndarray, g: float, rng: np.random.Generator) -> np.ndarray:
    return np.power(np.clip(x, 0.0, 1.0), g)


def jpeg(x: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    def one(img: np.ndarray) -> np.ndarray:
        u8 = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
        colour = u8.shape[2] == 3
        # OpenCV encodes BGR; the prepared arrays are RGB
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(u8[:, :, ::-1]) if colour else u8,
                               [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        dec = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).astype(np.float32) / 255.0
        return dec[:, :, ::-1] if colour else dec
    return _per_image(x, one)


def _affine(x: np.ndarray, matrices: list[np.ndarray]) -> np.ndarray:
    side = x.shape[-1]
    it = iter(matrices)
    # zero outside the image, like preprocess's padding
    return _per_image(x, lambda img: cv2.warpAffine(img, next(it), (side, side), flags=cv2.INTER_LINEAR,
                                                    borderMode=cv2.BORDER_CONSTANT, borderValue=0))


def rotation(x: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Each image turned by `degrees` about its centre, clockwise or not (a seeded draw per image)."""
    side = x.shape[-1]
    signs = rng.choice([-1.0, 1.0], size=len(x))
    return _affine(x, [cv2.getRotationMatrix2D(((side - 1) / 2, (side - 1) / 2), s * degrees, 1.0) for s in signs])


def shift(x: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by `fraction` of its side in a seeded random direction."""
    side = x.shape[-1]
    angles = rng.uniform(0, 2 * np.pi, size=len(x))
    d = fraction * side
    return _affine(x, [np.float32([[1, 0, d * np.cos(a)], [0, 1, d * np.sin(a)]]) for a in angles])


def resolution(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Down-sampled by `factor` (area average) and back up (bilinear): detail finer than the coarse grid is lost."""
    side = x.shape[-1]
    small = max(1, round(side / factor))

    def one(img: np.ndarray) -> np.ndarray:
        low = cv2.resize(img, (small, small), interpolation=cv2.INTER_AREA)
        return cv2.resize(low, (side, side), interpolation=cv2.INTER_LINEAR)
    return _per_image(x, one)


@dataclass(frozen=True)
class Perturbation:
    fn: Perturb
    parameter: str  # what the severity values mean
    severities: tuple[float, ...]  # mild to strong


# The fixed set: names, meaning of each severity, and its values.
PERTURBATIONS: dict[str, Perturbation] = {
    "gaussian_noise": Perturbation(gaussian_noise, "standard deviation (intensity units of [0, 1])", (0.02, 0.05, 0.1)),
    "blur": Perturbation(blur, "gaussian sigma as a fraction of the image side", (0.01, 0.02, 0.04)),
    "contrast": Perturbation(contrast, "contrast factor towards the image mean", (0.75, 0.5, 0.25)),
    "gamma": Perturbation(gamma, "gamma exponent", (1.25, 1.6, 2.0)),
    "jpeg": Perturbation(jpeg, "JPEG quality", (50, 25, 10)),
    "rotation": Perturbation(rotation, "degrees", (5, 10, 15)),
    "shift": Perturbation(shift, "fraction of the image side", (0.03, 0.06, 0.1)),
    "resolution": Perturbation(resolution, "down-sampling factor", (2, 3, 4)),
}
ATTACKS = attacks.METHODS
ALL = (*PERTURBATIONS, *ATTACKS)


@dataclass(frozen=True)
class RobustnessParams:
    """evaluate.robustness: off by default (see docs/evaluation.md for its cost)."""

    enabled: bool = False
    perturbations: list[str] = field(default_factory=lambda: list(ALL))
    epsilons: list[float] = field(default_factory=lambda: [0.002, 0.005, 0.01])  # fgsm and pgd, [0, 1] pixel units
    pgd_steps: int = 5  # step size 2.5 epsilon / steps, so the steps can reach the ball's edge (Madry et al.)
    seed: int = 0

    def check(self, key: str) -> None:
        unknown = [p for p in self.perturbations if p not in ALL]
        require(not unknown, f"{key}.perturbations", unknown[0] if unknown else None,
                "perturbation names from " + ", ".join(ALL))
        require(len(set(self.perturbations)) == len(self.perturbations), f"{key}.perturbations", self.perturbations,
                "a list of distinct names")
        require(1 <= len(self.epsilons) <= 5 and all(0 < e <= 1 for e in self.epsilons)
                and list(self.epsilons) == sorted(set(self.epsilons)), f"{key}.epsilons", self.epsilons,
                "1 to 5 increasing numbers in (0, 1] (pixel units of the [0, 1] input)")
        require(self.pgd_steps >= 1, f"{key}.pgd_steps", self.pgd_steps, "a positive integer (PGD takes at least one step)")


def _seed(seed: int, name: str) -> list[int]:
    return [seed, zlib.crc32(name.encode())]


def perturb(name: str, images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """`images` (N, C, S, S) in [0, 1] under perturbation `name` at severity 1..3 (not the attacks)."""
    p = PERTURBATIONS[name]
    rng = np.random.default_rng(_seed(seed, name))
    return p.fn(np.asarray(images, dtype=np.float32), float(p.severities[severity - 1]), rng).astype(np.float32)


def adversarial(method: str, model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, epsilon: float,
                steps: int, batch_size: int, device: torch.device, seed: int) -> np.ndarray:
    """Adversarial versions of `images` against their true labels, in batches, on the eager fp32 model."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence(_seed(seed, method)).generate_state(1)[0]))
    out = np.empty(images.shape, dtype=np.float32)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.asarray(images[start:start + batch_size], dtype=np.float32)).to(device)
        y = torch.from_numpy(np.asarray(labels[start:start + batch_size], dtype=np.int64)).to(device)
        adv = attacks.attack(method, model, x, y, epsilon, steps=steps, alpha=2.5 * epsilon / steps, generator=gen)
        out[start:start + len(x)] = adv.cpu().numpy()
    return out


def conditions(params: RobustnessParams) -> list[tuple[str, int, float]]:
    """(name, severity counted from 1, value) for every condition to score, in report order."""
    out = []
    for name in params.perturbations:
        values = params.epsilons if name in ATTACKS else PERTURBATIONS[name].severities
        out += [(name, i + 1, float(v)) for i, v in enumerate(values)]
    return out


def metric_names(k: int) -> list[str]:
    return ["roc_auc", "sensitivity", "specificity"] if k == 2 else ["roc_auc", "balanced_accuracy", "accuracy"]


def _scores(labels, probs, groups, names, threshold, bootstrap) -> dict:
    point = point_estimates(labels, probs, names, threshold=threshold)
    ci = bootstrap_ci(labels, probs, groups, names, bootstrap.n_resamples, bootstrap.seed, threshold, bootstrap.alpha)
    out = {}
    for n in names:
        out[n], out[f"{n}_ci_low"], out[f"{n}_ci_high"] = point[n], ci[n]["low"], ci[n]["high"]
    return out


def run_robustness(params: RobustnessParams, bootstrap, model: torch.nn.Module, hw: hardware.Hardware,
                   images: np.ndarray, labels: np.ndarray, groups: list[str], clean_probs: np.ndarray,
                   temperature: float, threshold: float | None, batch_size: int, split: str) -> dict:
    """The robustness.json record: clean and perturbed metrics with intervals, drops and flipped decisions."""
    k = clean_probs.shape[1]
    names = metric_names(k)
    clean = _scores(labels, clean_probs, groups, names, threshold, bootstrap)
    clean_pred = predict_labels(clean_probs, threshold)
    rows = []
    for name, severity, value in conditions(params):
        if name in ATTACKS:
            x = adversarial(name, model, images, labels, value, params.pgd_steps, batch_size, hw.device, params.seed)
        else:
            x = perturb(name, images, severity, params.seed)
        probs = apply_temperature(predict_logits(model, x, batch_size, hw, f"robustness {name} {severity}"), temperature)
        scores = _scores(labels, probs, groups, names, threshold, bootstrap)
        flipped = int((predict_labels(probs, threshold) != clean_pred).sum())
        drops = {f"{n}_drop": None if clean[n] is None or scores[n] is None else clean[n] - scores[n] for n in names}
        rows.append({"perturbation": name, "kind": "attack" if name in ATTACKS else "corruption", "severity": severity,
                     "parameter": "epsilon (L-infinity, [0, 1] pixel units)" if name in ATTACKS else PERTURBATIONS[name].parameter,
                     "value": value, **scores, **drops, "flipped": flipped / len(labels), "n_flipped": flipped})
    return {
        "format": ROBUSTNESS_FORMAT,
        "enabled": True,
        "split": split,
        "n": int(len(labels)),
        "n_groups": len(set(groups)),
        "threshold": threshold,
        "metrics": names,
        "seed": params.seed,
        "pgd_steps": params.pgd_steps,
        "bootstrap": {"unit": "group", "n_resamples": bootstrap.n_resamples, "seed": bootstrap.seed, "alpha": bootstrap.alpha},
        "clean": clean,
        "conditions": rows,
        "worst": worst(rows),
    }


def curve_rows(record: dict) -> list[dict]:
    """Wide rows for `dvc plots` (reports/plots/robustness.json): severity 0 (clean) to the highest, a column of
    ROC AUC and one of flipped decisions per perturbation (null where not run), one line per perturbation.

    A separate file: dvc merges every list of rows in a JSON file by index, so the report's own list of
    conditions would overwrite these.
    """
    clean, rows = record.get("clean"), record.get("conditions") or []
    top = max([r["severity"] for r in rows], default=3)
    out = []
    for s in range(top + 1):
        row: dict = {"severity": s}
        for name in ALL:
            hit = next((r for r in rows if r["perturbation"] == name and r["severity"] == s), None)
            if s == 0:
                row[name] = clean["roc_auc"] if clean and any(r["perturbation"] == name for r in rows) else None
                row[f"{name}_flipped"] = 0.0 if clean and any(r["perturbation"] == name for r in rows) else None
            else:
                row[name] = hit["roc_auc"] if hit else None
                row[f"{name}_flipped"] = hit["flipped"] if hit else None
        out.append(row)
    return out


def worst(rows: list[dict]) -> dict | None:
    """The condition with the largest ROC AUC drop."""
    scored = [r for r in rows if r.get("roc_auc_drop") is not None]
    if not scored:
        return None
    r = max(scored, key=lambda r: r["roc_auc_drop"])
    return {"perturbation": r["perturbation"], "severity": r["severity"], "value": r["value"], "roc_auc": r["roc_auc"],
            "roc_auc_drop": r["roc_auc_drop"], "flipped": r["flipped"]}


def disabled_record() -> dict:
    """What robustness.json holds when the report is off: the plots stay drawable (empty lines)."""
    return {"format": ROBUSTNESS_FORMAT, "enabled": False, "note": "robustness report off (evaluate.robustness.enabled: false)"}
