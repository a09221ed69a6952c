"""Fine-tuning strategies, schedules, best-epoch selection and in-process resume, on tiny arrays."""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from medtl import hardware
from medtl.errors import ParamsError
from medtl.model.classifier import Classifier
from medtl.model.start import build_backbone
from medtl.params import build
from medtl.prepare.prepared import PreparedSplit
from medtl.train.checkpoint import ResumeFile
from medtl.train.data import AugmentParams
from medtl.train.distributed import EpochBatches, World
from medtl.train.finetune import FinetuneParams, balanced_row_weights, fit, lr_factor, param_groups

CPU = hardware.Hardware(torch.device("cpu"), "fp32")
NO_AUG = AugmentParams(enabled=False)


def split(n: int, seed: int) -> PreparedSplit:
    """Bright-centre images are class 1: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.uniform(0, 0.5, (n, 1, 16, 16))
    images[labels == 1, :, 4:12, 4:12] += 0.4
    return PreparedSplit(images.astype(np.float16), labels.astype(np.int64), [{} for _ in range(n)])


TRAIN, VAL = split(24, 1), split(10, 2)


def classifier(seed: int = 0, dropout: float = 0.0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(build_backbone("resnet18", 1, "none"), 2, [0.3], [0.2], dropout)


def params(**kw) -> FinetuneParams:
    base = dict(epochs=2, batch_size=8, augment=NO_AUG, device="cpu", precision="fp32")
    return FinetuneParams(**{**base, **kw})


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: a second intra-op thread only adds waiting, badly so on a shared machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def stage_changed(before: Classifier, after: Classifier) -> list[bool]:
    old = {n: [p.detach().clone() for p in ps] for n, ps in before.backbone.stages()}
    return [any(not torch.equal(a, b) for a, b in zip(old[n], ps)) for n, ps in after.backbone.stages()]


def test_linear_cached_features_give_the_same_head_as_forwarding_the_backbone():
    p = params(strategy="linear", epochs=3, dropout=0.0)
    cached, forwarded = classifier(), classifier()
    fit(p, cached, TRAIN, VAL, CPU, cache_features=True)
    fit(p, forwarded, TRAIN, VAL, CPU, cache_features=False)
    for (name, a), (_, b) in zip(cached.head.state_dict().items(), forwarded.head.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), name
    assert not torch.equal(cached.head[-1].weight, classifier().head[-1].weight)  # it did train


@pytest.mark.parametrize("strategy, extra, expected", [
    ("linear", {}, [False] * 5),
    ("partial", {"unfreeze_stages": 2}, [False, False, False, True, True]),
    ("gradual", {"unfreeze_every": 1}, [False, False, False, False, True]),  # epoch 0 the head, epoch 1 adds layer4
    ("full", {}, [True] * 5),
])
def test_strategies_train_exactly_their_stages(strategy, extra, expected, tmp_path):
    before = classifier()
    model = copy.deepcopy(before)
    resume = ResumeFile(tmp_path / "ft.ckpt", "k")
    fit(params(strategy=strategy, **extra), model, TRAIN, VAL, CPU, resume=resume)
    last = copy.deepcopy(before)  # the last epoch's weights (the best epoch may be an earlier one)
    (last.head if strategy == "linear" else last).load_state_dict(resume.load()["module"])
    assert stage_changed(before, last) == expected
    assert not torch.equal(before.head[-1].weight, model.head[-1].weight)
    if strategy == "partial":  # frozen batch norm keeps its statistics
        assert torch.equal(before.backbone.model.bn1.running_mean, model.backbone.model.bn1.running_mean)


def test_layer_decay_gives_earlier_stages_smaller_rates():
    groups = param_groups(classifier(), params(layer_decay=0.5, lr=0.1))
    assert [g["name"] for g in groups] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert [g["lr"] for g in groups] == pytest.approx([0.1 * 0.5 ** d for d in (5, 4, 3, 2, 1, 0)])


def test_schedules_warm_up_then_decay():
    p = params(epochs=4, warmup_epochs=1, schedule="cosine")
    f = [lr_factor(s, p, 10) for s in range(40)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[25] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    s = params(epochs=6, schedule="step", step_epochs=2, step_gamma=0.1)
    assert [lr_factor(e * 10, s, 10) for e in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_early_stopping_keeps_the_best_epoch():
    p = params(strategy="linear", epochs=8, patience=2, monitor="val_loss", optimizer="sgd", lr=5.0, schedule="constant")
    model = classifier()
    summary = fit(p, model, TRAIN, VAL, CPU)
    losses = [r["val_loss"] for r in summary["history"]]
    assert summary["best_epoch"] == int(np.argmin(losses)) + 1  # counted from 1, as printed
    assert summary["best"] == {k: summary["history"][summary["best_epoch"] - 1][k] for k in summary["best"]}
    assert summary["epochs_run"] < 8 and summary["epochs_run"] == summary["best_epoch"] + p.patience
    # the saved weights are the best epoch's: recomputing its validation loss gives the recorded value
    with torch.no_grad():
        logits = model(torch.from_numpy(VAL.images.astype(np.float32)))
    assert float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(VAL.labels))) == pytest.approx(min(losses), abs=1e-5)


def test_balanced_sampler_draws_classes_equally_often():
    labels = np.array([0] * 90 + [1] * 10)

    def minority_share(weights) -> float:
        drawn = []
        for epoch in range(20):
            batches = EpochBatches(len(labels), 10, seed=0, world=World(), weights=weights)
            batches.set_epoch(epoch)
            drawn += [i for b in batches for i in b]
        return float(labels[drawn].mean())

    assert minority_share(balanced_row_weights(labels, 2)) == pytest.approx(0.5, abs=0.05)
    assert minority_share(None) == pytest.approx(0.1, abs=0.01)  # the plain shuffle keeps the prevalence
    # and fit trains with it: other batches than the shuffle, so other weights
    p = params(strategy="linear", sampler="balanced", class_weighting=False, label_smoothing=0.1)
    balanced, shuffled = classifier(), classifier()
    fit(p, balanced, TRAIN, VAL, CPU)
    fit(replace(p, sampler="shuffle"), shuffled, TRAIN, VAL, CPU)
    assert not torch.equal(balanced.head[-1].weight, shuffled.head[-1].weight)


class Interrupt(Exception):
    pass


def test_resume_in_process_ends_with_the_same_weights(tmp_path):
    p = params(strategy="full", epochs=3, augment=AugmentParams(), dropout=0.2, warmup_epochs=1)
    straight = classifier(dropout=0.2)
    fit(p, straight, TRAIN, VAL, CPU)

    def stop_at_epoch_1(epoch, row):
        if epoch == 1:
            raise Interrupt  # after epoch 1 trained, before its checkpoint: epoch 0 is the last saved
    resume = ResumeFile(tmp_path / "ft.ckpt", "k")
    with pytest.raises(Interrupt):
        fit(p, classifier(dropout=0.2), TRAIN, VAL, CPU, stop_at_epoch_1, resume=resume)
    resume.wait()
    assert torch.load(tmp_path / "ft.ckpt", weights_only=True)["epoch"] == 0
    rows = []
    resumed = classifier(seed=123, dropout=0.2)  # different start: everything must come from the checkpoint
    summary = fit(p, resumed, TRAIN, VAL, CPU, lambda e, r: rows.append(e), resume=resume)
    assert summary["resumed_from"] == 1 and rows == [0, 1, 2]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert ResumeFile(tmp_path / "ft.ckpt", "other params").load() is None


def test_params_are_checked():
    with pytest.raises(ParamsError, match="finetune.class_weighting"):
        build(FinetuneParams, {"sampler": "balanced"}, "finetune")
    with pytest.raises(ParamsError, match="finetune.batch_size.*multiple of nproc"):
        build(FinetuneParams, {"batch_size": 33, "nproc": 2}, "finetune")
    with pytest.raises(ParamsError, match="finetune.strategy"):
        build(FinetuneParams, {"strategy": "half"}, "finetune")
    with pytest.raises(ParamsError, match="unfreeze_stages.*at most 5.*stem, layer1"):
        fit(replace(params(), strategy="partial", unfreeze_stages=9), classifier(), TRAIN, VAL, CPU)


def test_logits_stay_fp32_under_bf16_autocast():
    """The head runs in fp32 under autocast: bf16 logits tie and saturate, coarsening AUC and the threshold."""
    torch.manual_seed(0)
    model = Classifier(build_backbone("resnet18", 1), 2, [0.5], [0.25]).eval()
    x = torch.rand(8, 1, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        features = model.features(x)
        assert model.head(features).dtype == torch.bfloat16  # what an autocast head would give
    linear = model.head[-1]
    with torch.no_grad():
        expected = torch.nn.functional.linear(features.float(), linear.weight, linear.bias)
    assert logits.dtype == torch.float32 and torch.equal(logits, expected)


def test_site_balanced_sampler_draws_sites_equally_often_and_classes_within():
    from medtl.train.finetune import sampling_weights

    # site a: 60 normal, 20 lesion; b: 18 / 2; c: 5 normal and no lesion
    sites = ["a"] * 80 + ["b"] * 20 + ["c"] * 5
    labels = np.array([0] * 60 + [1] * 20 + [0] * 18 + [1] * 2 + [0] * 5)
    train = PreparedSplit(np.zeros((len(labels), 1, 4, 4), np.float16), labels, [{"site": s} for s in sites])
    weights = sampling_weights("site_balanced", train, 2)
    drawn = []
    for epoch in range(40):
        batches = EpochBatches(len(labels), 15, seed=0, world=World(), weights=weights)
        batches.set_epoch(epoch)
        drawn += [i for b in batches for i in b]
    site = np.array(sites)[drawn]
    for s in ("a", "b", "c"):
        assert (site == s).mean() == pytest.approx(1 / 3, abs=0.03)
    lesion = labels[drawn] == 1
    assert lesion[site == "a"].mean() == pytest.approx(0.5, abs=0.05)
    assert lesion[site == "b"].mean() == pytest.approx(0.5, abs=0.05)  # 2 lesions drawn as often as 18 normals
    assert not lesion[site == "c"].any()  # a site's missing class is not made up
    # without sites it stops with the key
    with pytest.raises(ParamsError, match="finetune.sampler"):
        sampling_weights("site_balanced", PreparedSplit(train.images, labels, [{} for _ in sites]), 2)
    with pytest.raises(ParamsError, match="finetune.class_weighting"):
        build(FinetuneParams, {"sampler": "site_balanced"}, "finetune")
