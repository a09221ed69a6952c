"""Training keeps the cores busy without changing what it computes: prefetched batches, fused optimiser."""
import numpy as np
import pytest
import torch

from medtl.io import prefetch
from medtl.train.data import AugmentParams, TrainBatches, build_augment
from medtl.train.finetune import make_optimizer


def test_prefetched_batches_are_the_same_batches_with_the_same_augmentations():
    rng = np.random.default_rng(0)
    images, labels = rng.random((40, 1, 32, 32)).astype(np.float16), rng.integers(0, 2, 40)
    index = [list(rng.permutation(40)[:8]) for _ in range(5)]
    source = TrainBatches(images, labels, build_augment(AugmentParams(noise_std=0.05)))
    source.reseed(7)
    direct = [source.batch(i) for i in index]
    source.reseed(7)
    fetched = [source.finish(*b) for b in prefetch(map(source.gather, index))]
    assert len(fetched) == len(direct)
    for (x0, y0), (x1, y1) in zip(direct, fetched):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_an_error_while_gathering_reaches_the_training_loop():
    def batches():
        yield torch.zeros(1), torch.zeros(1)
        raise OSError("prepared array unreadable")

    it = prefetch(batches())
    next(it)
    with pytest.raises(OSError, match="unreadable"):
        next(it)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimiser_is_fused_on_the_cpu_and_steps(name):
    model = torch.nn.Linear(4, 2)
    opt = make_optimizer(name, [{"params": list(model.parameters()), "lr": 0.1}], 0.1, 0.01)
    assert opt.defaults["fused"] is True
    before = model.weight.detach().clone()
    model(torch.rand(3, 4)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.weight)
