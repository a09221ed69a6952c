"""FGSM and PGD in the [0, 1] input space, and adversarial examples mixed into fine-tuning."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from medtl import hardware
from medtl.errors import ParamsError
from medtl.model.classifier import Classifier
from medtl.model.start import build_backbone
from medtl.params import build
from medtl.prepare.prepared import PreparedSplit
from medtl.train.attacks import AdversarialParams, attack, fgsm, pgd
from medtl.train.data import AugmentParams
from medtl.train.finetune import FinetuneParams, fit

CPU = hardware.Hardware(torch.device("cpu"), "fp32")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(build_backbone("resnet18", 1, "none"), 2, [0.3], [0.2]).eval()


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g) * 0.8 + 0.1, torch.arange(n) % 2


def loss(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def test_fgsm_and_pgd_increase_the_loss_of_a_fixed_model_within_the_epsilon_ball():
    model, (x, y) = classifier(), batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clean = loss(model, x, y)
    eps = 0.03
    x_fgsm = fgsm(model, x, y, eps)
    x_pgd = pgd(model, x, y, eps, steps=5, alpha=eps / 4, generator=torch.Generator().manual_seed(1))
    assert loss(model, x_fgsm, y) > clean + 1e-3
    assert loss(model, x_pgd, y) > clean + 1e-3
    for adv in (x_fgsm, x_pgd):
        assert float((adv - x).abs().max()) <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    # the attack takes the input gradient only: no parameter gradients, no batch-norm statistics updated
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # a stronger attack hurts more; the same seed gives the same PGD examples
    assert loss(model, fgsm(model, x, y, 0.1), y) > loss(model, x_fgsm, y)
    again = attack("pgd", model, x, y, eps, steps=5, alpha=eps / 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, x_pgd)


def test_bad_adversarial_params_name_the_key():
    with pytest.raises(ParamsError, match=r"finetune.adversarial.epsilon.*\(0, 1\]"):
        build(FinetuneParams, {"adversarial": {"method": "fgsm", "epsilon": 0}}, "finetune")
    with pytest.raises(ParamsError, match=r"finetune.adversarial.epsilon"):
        build(FinetuneParams, {"adversarial": {"method": "fgsm", "epsilon": 1.5}}, "finetune")
    with pytest.raises(ParamsError, match=r"finetune.adversarial.steps.*at least one"):
        build(FinetuneParams, {"adversarial": {"method": "pgd", "steps": 0}}, "finetune")
    with pytest.raises(ParamsError, match=r"finetune.adversarial.method.*'fgsm', 'pgd'"):
        build(FinetuneParams, {"adversarial": {"method": "cw"}}, "finetune")
    assert not build(FinetuneParams, {}, "finetune").adversarial.enabled


def split(n: int, seed: int) -> PreparedSplit:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.uniform(0, 0.5, (n, 1, 16, 16))
    images[labels == 1, :, 4:12, 4:12] += 0.4
    return PreparedSplit(images.astype(np.float16), labels.astype(np.int64), [{} for _ in range(n)])


TRAIN, VAL = split(16, 1), split(8, 2)


def trained(**kw) -> Classifier:
    p = FinetuneParams(epochs=1, batch_size=8, augment=AugmentParams(enabled=False), device="cpu", precision="fp32", **kw)
    model = classifier()
    fit(p, model, TRAIN, VAL, CPU)
    return model


@pytest.mark.parametrize("strategy", ["full", "linear"])
def test_adversarial_training_is_deterministic_and_changes_the_model(strategy):
    pgd_params = AdversarialParams(method="pgd", epsilon=0.05, steps=2, alpha=0.02, fraction=0.5)
    a, b = trained(strategy=strategy, adversarial=pgd_params), trained(strategy=strategy, adversarial=pgd_params)
    plain = trained(strategy=strategy)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.head[-1].weight, plain.head[-1].weight)
    fgsm_model = trained(strategy=strategy, adversarial=replace(pgd_params, method="fgsm"))
    assert not torch.equal(a.head[-1].weight, fgsm_model.head[-1].weight)
