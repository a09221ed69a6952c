"""Adversarial examples (FGSM, PGD) in the model's input space, for training and for the robustness report.

Images are perturbed in [0, 1], the space of the prepared arrays, before the
normalisation the classifier carries inside itself; an epsilon therefore means
the same intensity change on any data set. Attacks run on the plain eager
model in fp32 and evaluation mode (batch-norm statistics are not updated by
the attack's forward passes, dropout is off), and only the gradient with
respect to the input is taken: the model's parameter gradients are untouched.

PGD starts from a random point in the epsilon ball drawn from a generator the
caller seeds, so an attack is a deterministic function of (model, images,
labels, seed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from medtl.params import require

METHODS = ("fgsm", "pgd")


@dataclass(frozen=True)
class AdversarialParams:
    """finetune.adversarial: adversarial examples mixed into training (off with method none)."""

    method: Literal["none", "fgsm", "pgd"] = "none"
    epsilon: float = 0.01  # L-infinity radius in [0, 1] pixel units (1/255 = 0.0039)
    steps: int = 5  # pgd: gradient steps
    alpha: float = 0.0025  # pgd: step size
    fraction: float = 0.5  # share of each training batch replaced by its adversarial version

    def check(self, key: str) -> None:
        require(0 < self.epsilon <= 1, f"{key}.epsilon", self.epsilon, "a number in (0, 1] (pixel units of the [0, 1] input)")
        require(self.steps >= 1 or self.method != "pgd", f"{key}.steps", self.steps,
                "a positive integer (PGD takes at least one gradient step)")
        require(self.steps >= 0, f"{key}.steps", self.steps, "a non-negative integer")
        require(0 < self.alpha <= 1, f"{key}.alpha", self.alpha, "a step size in (0, 1]")
        require(0 < self.fraction <= 1, f"{key}.fraction", self.fraction, "a number in (0, 1] (1: every image of a batch)")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def _input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x).float(), y)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _eval_mode(model: nn.Module):
    modes = [m.training for m in model.modules()]
    model.eval()
    return modes


def _restore(model: nn.Module, modes: list[bool]) -> None:
    for m, training in zip(model.modules(), modes):
        m.training = training


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float) -> torch.Tensor:
    """One signed-gradient step of size epsilon that raises the cross-entropy of the true labels; clipped to [0, 1]."""
    modes = _eval_mode(model)
    try:
        grad = _input_gradient(model, x.float(), y)
    finally:
        _restore(model, modes)
    return (x.float() + epsilon * grad.sign()).clamp_(0.0, 1.0).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, steps: int, alpha: float,
        generator: torch.Generator) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) in the L-infinity ball of radius epsilon, from a seeded random start."""
    if steps < 1:
        raise ValueError(f"PGD needs at least one step, got {steps}")
    x0 = x.detach().float()
    start = torch.empty(x0.shape, dtype=torch.float32).uniform_(-epsilon, epsilon, generator=generator)
    adv = (x0 + start.to(x0.device)).clamp_(0.0, 1.0)
    modes = _eval_mode(model)
    try:
        for _ in range(steps):
            grad = _input_gradient(model, adv, y)
            adv = adv + alpha * grad.sign()
            adv = torch.min(torch.max(adv, x0 - epsilon), x0 + epsilon).clamp_(0.0, 1.0).detach()
    finally:
        _restore(model, modes)
    return adv


def attack(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, *, steps: int = 5,
           alpha: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    if method == "fgsm":
        return fgsm(model, x, y, epsilon)
    if method == "pgd":
        return pgd(model, x, y, epsilon, steps, epsilon / 4 if alpha is None else alpha,
                   generator if generator is not None else torch.Generator().manual_seed(0))
    raise ValueError(f"unknown attack {method!r}; allowed: {', '.join(METHODS)}")


class TrainingAttack:
    """Replaces the first `fraction` of each (already shuffled) training batch by its adversarial version."""

    def __init__(self, params: AdversarialParams, model: nn.Module):
        self.params, self.model = params, model
        self.generator = torch.Generator().manual_seed(0)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = max(1, round(self.params.fraction * len(x)))
        p = self.params
        adv = attack(p.method, self.model, x[:k], y[:k], p.epsilon, steps=p.steps, alpha=p.alpha, generator=self.generator)
        out = torch.cat([adv.to(x.dtype), x[k:]])
        channels_last = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out
