"""Several processes: the batch sampler shared by all ranks, and real gloo runs under torchrun.

The union of the ranks' batches is the single-process batch, so N processes (on one host or
several nodes) with the same global batch train the same model as one.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medtl.errors import MedtlError
from medtl.io import load_torch
from medtl.train.distributed import EpochBatches, World, derive_seed, shard
from tests.project import Project, copy_project


def test_ranks_split_each_global_batch():
    one = list(EpochBatches(50, 8, seed=3, world=World()))
    ranks = [list(EpochBatches(50, 8, seed=3, world=World(r, 2))) for r in range(2)]
    assert len(one) == 6 and all(len(b) == 8 for b in one)  # the ragged last batch is dropped
    for b, (r0, r1) in zip(one, zip(*ranks)):
        assert sorted(b) == sorted(r0 + r1) and len(r0) == len(r1) == 4


def test_order_depends_on_the_epoch_only():
    s = EpochBatches(40, 8, seed=1, world=World())
    s.set_epoch(2)
    a = list(s)
    s.set_epoch(3)
    assert list(s) != a
    t = EpochBatches(40, 8, seed=1, world=World())
    t.set_epoch(2)
    assert list(t) == a


def test_balanced_draw_evens_out_the_classes():
    labels = np.array([0] * 90 + [1] * 10)
    weights = 1.0 / np.bincount(labels)[labels]
    drawn = np.concatenate(list(EpochBatches(100, 10, seed=0, world=World(), weights=weights)))
    assert 0.35 < labels[drawn].mean() < 0.65


def test_global_batch_must_divide_among_processes():
    with pytest.raises(MedtlError, match="divisible"):
        EpochBatches(10, 5, seed=0, world=World(0, 2))


def test_shards_cover_the_split_once():
    rows = [list(range(11))[shard(11, World(r, 3))] for r in range(3)]
    assert sum(rows, []) == list(range(11))
    assert derive_seed(0, 1, "augment") != derive_seed(0, 1, "augment", rank=1) != derive_seed(0, 2, "augment")


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# Fine-tunes a tiny model on in-memory splits; under torchrun every rank trains, rank 0 writes the result.
SMALL_SPLIT_WORKER = """
import json, sys
import numpy as np, torch
from medtl.train import distributed
from medtl import hardware
from medtl.model.start import build_backbone
from medtl.train.finetune import FinetuneParams, fit
from medtl.model.classifier import Classifier
from medtl.prepare.prepared import PreparedSplit

torch.set_num_threads(1)
def split(n, seed):
    images = np.random.default_rng(seed).random((n, 1, 16, 16), dtype=np.float32)
    return PreparedSplit(images, (np.arange(n) % 2).astype(np.int64), [{} for _ in range(n)])
world = distributed.world_from_env()
hw = hardware.Hardware(torch.device("cpu"), "fp32")
distributed.init(world, "cpu")
torch.manual_seed(0)
model = Classifier(build_backbone("resnet18", 1, "none"), 2, [0.5], [0.25])
params = FinetuneParams(strategy="linear", epochs=2, batch_size=4, patience=2, seed=0, device="cpu",
                        precision="fp32", monitor="val_loss", class_weighting=False)
summary = fit(params, model, split(8, 1), split(int(sys.argv[2]), 2), hw, world=world)
if world.is_main:
    with open(sys.argv[1], "w") as f:
        json.dump({"val_loss": summary["best"]["val_loss"], "head": model.head[-1].weight.tolist(),
                   "processes": world.size}, f)
distributed.shutdown()
"""


def _env() -> dict:
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "GLOO_SOCKET_IFNAME": "lo"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("val_images", [1])
def test_more_ranks_than_validation_images(tmp_path, val_images):
    """2 gloo ranks on a validation split of 1 image (one rank's shard is empty): the same result as 1 process."""
    worker = tmp_path / "worker.py"
    worker.write_text(SMALL_SPLIT_WORKER)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    res = subprocess.run([sys.executable, str(worker), str(one), str(val_images)], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(worker), str(two), str(val_images)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["processes"], b["processes"]) == (1, 2)
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-4)
    assert torch.allclose(torch.tensor(a["head"]), torch.tensor(b["head"]), atol=1e-4)


@pytest.fixture(scope="module")
def ran(tiny_run: Project, tmp_path_factory) -> Project:
    p = copy_project(tiny_run, tmp_path_factory.mktemp("two-nodes") / "project")
    p.env.update({"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
    return p


def test_two_nodes_under_torchrun_match_one_process(ran: Project):
    """`torchrun --nnodes 2` (c10d rendezvous on 127.0.0.1, gloo), one process per node, as several machines run it.

    The stage is unchanged: torchrun's RANK/WORLD_SIZE make it split each global batch across
    the nodes; the result must equal one process with the same global batch.
    """
    ran.update_params({"finetune": {"strategy": "linear", "epochs": 2, "batch_size": 8, "patience": 10, "nproc": 1,
                                    "augment": {"enabled": False}, "dropout": 0.0, "class_weighting": False}})
    model = ran.path / "models/model.pt"
    model.unlink(missing_ok=True)
    one = ran.run(sys.executable, "stages/fine-tune.py", timeout=600)
    assert "x2" not in one.stdout
    single = load_torch(model)
    model.unlink()

    port = _free_port()
    nodes = []
    for host in ("true", "false"):  # the first node hosts the rendezvous store, as the head node of a cluster would
        cmd = [*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=medtl-two-nodes", f"--rdzv_conf=is_host={host}", "--local_addr=127.0.0.1", "--max_restarts=0",
               "stages/fine-tune.py"]
        nodes.append(subprocess.Popen(cmd, cwd=ran.path, env=ran.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [n.communicate(timeout=600) for n in nodes]
    for n, (out, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]
    assert "x2:" in outs[0][0] + outs[1][0]  # rank 0 (on whichever node) reports two processes
    two = load_torch(model)
    assert two["hardware"]["processes"] == 2 and single["hardware"]["processes"] == 1
    assert two["best_epoch"] == single["best_epoch"]
    for k in ("val_loss", "val_auc", "val_accuracy"):
        assert two["validation"][k] == pytest.approx(single["validation"][k], abs=1e-4), k
    assert torch.allclose(single["head"]["1.weight"], two["head"]["1.weight"], atol=1e-4)
