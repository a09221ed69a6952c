"""Adapting a model to unlabelled images: AdaBN (pretrain.adapt: adabn, on the training images) and, for
the fine-tuned model and the deployment site's unlabelled images (medtl.train.target), two methods that combine:

- Target AdaBN (`finetune.adapt: adabn_target`, Li et al. 2016): after
  fine-tuning, every batch-norm layer's running statistics are re-estimated
  on the target images; no weight changes and no label is read.
- Domain-adversarial fine-tuning (`finetune.domain_adversarial`, DANN, Ganin
  et al. 2016): a small domain classifier learns to tell training images from
  target images by their backbone features, behind a gradient-reversal layer,
  so the backbone learns features the domain classifier cannot separate while
  the head still learns the task from the labelled training batches. Its
  weight ramps from 0 to `weight` as 2 / (1 + exp(-gamma p)) - 1 over the
  training progress p, as in the paper, so the task is learned first.

Every random draw (target batch order, target augmentation, the domain
classifier's initial weights) comes from a seed derived from (seed, epoch,
rank), like the rest of fine-tune, so a run is deterministic and resumable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from medtl import hardware
from medtl.errors import ParamsError
from medtl.model.backbones import Backbone
from medtl.model.classifier import Normalize
from medtl.model.inference import iter_batches
from medtl.params import require
from medtl.train import distributed
from medtl.train.data import TrainBatches
from medtl.train.distributed import World, derive_seed


@dataclass(frozen=True)
class DomainAdversarialParams:
    weight: float = 0.0  # lambda, the domain loss's final weight; 0: off
    gamma: float = 10.0  # steepness of the ramp from 0 to weight
    hidden: int = 256  # units of the domain classifier's hidden layer
    lr_mult: float = 1.0  # the domain classifier's learning rate, as a multiple of finetune.lr

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def check(self, key: str) -> None:
        require(0 <= self.weight <= 10, f"{key}.weight", self.weight, "a number in [0, 10] (0: off; 0.1-1 usual)")
        require(0 < self.gamma <= 100, f"{key}.gamma", self.gamma, "a number in (0, 100] (10 in the DANN paper)")
        require(2 <= self.hidden <= 4096, f"{key}.hidden", self.hidden, "an integer between 2 and 4096")
        require(0 < self.lr_mult <= 100, f"{key}.lr_mult", self.lr_mult, "a number in (0, 100]")


# ---------------------------------------------------------------- gradient reversal


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """Identity forward; the gradient flowing back is multiplied by -coeff."""
    return _GradReverse.apply(x, float(coeff))


def ramp(weight: float, gamma: float, progress: float) -> float:
    """DANN's schedule: 0 at the start, `weight` at the end, 2 / (1 + exp(-gamma p)) - 1 between."""
    p = min(max(progress, 0.0), 1.0)
    return weight * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


class DomainClassifier(nn.Sequential):
    """Features -> one logit: is this image from the target site?"""

    def __init__(self, num_features: int, hidden: int):
        super().__init__(nn.Linear(num_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))


class DomainAdversarialNet(nn.Module):
    """The classifier and the domain classifier, one module, so DDP and the checkpoint see both.

    forward(x) is the classifier; forward(x, target, coeff) also returns the
    domain logits of x and target (in that order) through the reversal layer.
    Source and target go through the backbone as one batch.
    """

    def __init__(self, classifier: nn.Module, domain: DomainClassifier):
        super().__init__()
        self.classifier, self.domain = classifier, domain

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None, coeff: float = 0.0):
        if target is None:
            return self.classifier(x)
        features = self.classifier.features(torch.cat([x, target]))
        with torch.autocast(x.device.type, enabled=False):  # head and domain classifier in fp32, as Classifier
            features = features.float()
            logits = self.classifier.head(features[: len(x)])
            domain = self.domain(grad_reverse(features, coeff)).squeeze(1)
        return logits, domain


class Adversary:
    """DANN's part of the training loop: target batches, the domain loss and its per-epoch accuracy."""

    def __init__(self, params: DomainAdversarialParams, seed: int, classifier: nn.Module, target: np.ndarray,
                 augment, total_steps: int, pin_memory: bool = False):
        self.params, self.seed, self.total_steps = params, seed, max(1, total_steps)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, 0, "domain"))
            domain = DomainClassifier(classifier.backbone.num_features, params.hidden)
        self.module = DomainAdversarialNet(classifier, domain)
        self.target = TrainBatches(target, np.zeros(len(target), dtype=np.int64), augment, pin_memory)
        self.gen = torch.Generator()
        self.loss_fn = nn.BCEWithLogitsLoss()
        self._domain, self._n_source = None, 0
        self._sums = [0.0, 0.0, 0.0]  # correct, count, loss x count

    def param_group(self, lr: float) -> dict:
        return {"params": list(self.module.domain.parameters()), "lr": lr * self.params.lr_mult, "name": "domain"}

    def start_epoch(self, epoch: int, world: World) -> None:
        self.gen.manual_seed(derive_seed(self.seed, epoch, "target", world.rank))
        self.target.reseed(derive_seed(self.seed, epoch, "taugment", world.rank))
        self._sums = [0.0, 0.0, 0.0]

    def coefficient(self, step: int) -> float:
        return ramp(self.params.weight, self.params.gamma, step / self.total_steps)

    def forward(self, net: nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
        """Class logits of x; the domain logits of x and a target batch of the same size are kept for `loss`."""
        index = torch.randint(0, len(self.target.labels), (len(x),), generator=self.gen).tolist()
        with torch.autocast("cpu", enabled=False):  # augmentation in fp32, as for the training batches
            xt, _ = self.target.batch(index)
        xt = xt.to(x.device, non_blocking=True)
        if x.is_contiguous(memory_format=torch.channels_last):
            xt = xt.contiguous(memory_format=torch.channels_last)
        logits, self._domain = net(x, xt, self.coefficient(step))
        self._n_source = len(x)
        return logits

    def loss(self) -> torch.Tensor:
        """Binary cross-entropy of the domain classifier (source 0, target 1); its reversal trains the backbone."""
        d = self._domain.float()
        truth = torch.zeros_like(d)
        truth[self._n_source:] = 1.0
        loss = self.loss_fn(d, truth)
        with torch.no_grad():
            correct = float(((d > 0).float() == truth).sum())
        self._sums[0] += correct
        self._sums[1] += float(len(d))
        self._sums[2] += float(loss.detach()) * len(d)
        return loss

    def epoch_metrics(self, world: World, step: int) -> dict[str, float]:
        """Domain-classifier accuracy over the epoch (0.5: the features no longer tell the sites apart)."""
        correct, n, loss = distributed.all_reduce_sum(list(self._sums), world)
        return {"domain_accuracy": correct / max(n, 1.0), "domain_loss": loss / max(n, 1.0),
                "domain_weight": self.coefficient(step)}


# ---------------------------------------------------------------- target AdaBN


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def check_adabn_target(backbone: nn.Module, arch: str) -> None:
    if not has_batchnorm(backbone):
        raise ParamsError(f"params key 'finetune.adapt' has value 'adabn_target' but {arch} has no batch-norm layers "
                          "whose statistics could be re-estimated; expected 'none' for this architecture, or an "
                          "architecture with batch norm (resnet18/34/50, densenet121, efficientnet_b0-b3, "
                          "mobilenet_v3_large)")


@torch.no_grad()
def adabn(backbone: Backbone, normalize: Normalize, images, batch_size: int, hw: hardware.Hardware) -> dict:
    """Re-estimate every batch-norm layer's running statistics on target images (AdaBN).

    Only the statistics change; no weight is trained and no label is read.
    """
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return {"method": "adabn", "images": 0, "batchnorm_layers": 0, "note": f"{backbone.arch} has no batch-norm layers"}
    backbone.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    n = 0
    for x in tqdm(iter_batches(images, batch_size), total=-(-len(images) // batch_size), desc="adabn", leave=False):
        x = normalize(x.to(hw.device))
        with hw.autocast():
            backbone(x)
        n += len(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    backbone.eval()
    return {"method": "adabn", "images": n, "image_sources": {"train": n}, "batchnorm_layers": len(bns)}


def adabn_target(model: nn.Module, images: np.ndarray, batch_size: int, hw: hardware.Hardware) -> dict:
    """Re-estimate the fine-tuned model's batch-norm statistics on the target images (test-time adaptation)."""
    model.to(hw.device)
    record = adabn(model.backbone, model.normalize, images, batch_size, hw)
    model.cpu().eval()
    record["method"] = "adabn_target"
    record["image_sources"] = {"target": record.get("images", 0)}
    return record
