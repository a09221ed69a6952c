"""AdaBN changes only batch-norm statistics; the pretrain-adapt stage runs ssl under the real dvc."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from torchvision.models import get_model

from medtl import hardware
from medtl.errors import ParamsError
from medtl.io import load_torch
from medtl.model import weights
from medtl.model.classifier import Normalize
from medtl.model.start import build_backbone
from medtl.params import build
from medtl.train.adaptation import PretrainParams, run_pretrain
from medtl.train.domain import adabn
from tests.test_ssl import write_prepared


def test_adabn_changes_only_batchnorm_running_statistics():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", 1)
    bn_momenta = {n: m.momentum for n, m in backbone.named_modules() if isinstance(m, nn.BatchNorm2d)}
    backbone.model.bn1.momentum = 0.01  # a non-default momentum must survive
    bn_momenta["model.bn1"] = 0.01
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    images = (np.random.default_rng(0).random((10, 1, 32, 32)) * 0.5 + 0.3).astype(np.float16)
    record = adabn(backbone, Normalize([0.1], [0.3]), images, 4, hardware.select("cpu", "fp32"))
    after = backbone.state_dict()
    assert record == {"method": "adabn", "images": 10, "image_sources": {"train": 10}, "batchnorm_layers": 20}
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) == 60
    for k in before:
        if k in stats:
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), k
    assert {n: m.momentum for n, m in backbone.named_modules() if isinstance(m, nn.BatchNorm2d)} == bn_momenta
    assert not backbone.training
    # A cumulative average over all 10 images: three batches were seen.
    assert int(after["model.bn1.num_batches_tracked"]) == 3


def test_adabn_reads_only_the_training_images(tmp_path):
    prepared = write_prepared(tmp_path / "prepared", n=6, size=32)
    for name in ("val.npy", "test.npy", "train.csv", "val.csv", "test.csv"):
        (prepared / name).unlink()
    backbone, record = run_pretrain(PretrainParams(adapt="adabn", batch_size=4, device="cpu", precision="fp32"), prepared)
    assert record["method"] == "adabn" and record["images"] == 6


def test_unknown_adapt_method_lists_the_choices():
    with pytest.raises(ParamsError, match="pretrain.adapt.*'none', 'adabn', 'ssl'"):
        build(PretrainParams, {"adapt": "dann"}, "pretrain")


def test_vit_needs_224_pixels(tmp_path):
    prepared = write_prepared(tmp_path / "prepared", n=2, size=32, with_other_splits=False)
    with pytest.raises(ParamsError, match="vit_b_16 needs preprocess.image_size 224, got 32"):
        run_pretrain(PretrainParams(arch="vit_b_16", device="cpu"), prepared)


def test_stage_runs_ssl_from_pinned_weights_under_dvc_and_records_what_it_did(project):
    # The air-gapped round trip: a pulled file, tracked with `dvc add`, pinned in params.
    torch.manual_seed(3)
    state = get_model("resnet18", weights=None).state_dict()
    pulled = weights.pull("resnet18", project.path / "models" / "pretrained", fetch=lambda arch: state)
    rel = "models/pretrained/resnet18-imagenet.pt"
    project.dvc("add", rel)
    project.update_params({"pretrain": {"weights": rel, "sha256": pulled.sha256, "adapt": "ssl", "precision": "fp32",
                                        "ssl": {"epochs": 2, "batch_size": 16, "lr": 0.001}}})
    project.commit("ssl from pinned weights")
    assert rel + ".dvc" in project.git("ls-files").stdout
    res = project.dvc("repro", "pretrain-adapt")
    assert "adaptation ssl on" in res.stdout

    root = project.path
    ckpt = load_torch(root / "models" / "backbone.pt")
    record = ckpt["adaptation"]
    n_train = json.loads((root / "data" / "prepared" / "stats.json").read_text())["counts"]["train"]
    assert record["method"] == "ssl" and record["epochs"] == 2 and len(record["loss"]) == 2
    assert record["images"] == n_train and record["image_sources"] == {"train": n_train, "extra": None}
    assert record["hardware"]["precision"] == "fp32"

    assert ckpt["weights"] == {"name": "file", "origin": rel, "sha256": pulled.sha256}

    prov = json.loads((root / "models" / "backbone.pt.provenance.json").read_text())
    assert prov["extra"]["adaptation"] == record
    assert [i["path"] for i in prov["inputs"]] == ["data/prepared/train.npy", "data/prepared/stats.json", rel]
    assert prov["inputs"][2]["sha256"] == pulled.sha256

    metrics = json.loads((root / "dvclive_pretrain" / "metrics.json").read_text())
    assert metrics["ssl_loss"] == record["loss"][-1] and metrics["adapt_images"] == n_train
    rows = (root / "dvclive_pretrain" / "plots" / "metrics" / "ssl_loss.tsv").read_text().splitlines()
    assert rows[0].split("\t")[-1] == "ssl_loss" and len(rows) == 3

    # Labels of the prepared data do not feed this stage: the stage stays up to date without them.
    status = project.dvc("status", "pretrain-adapt")
    assert "changed" not in status.stdout, status.stdout
