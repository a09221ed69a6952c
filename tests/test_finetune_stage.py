"""The fine-tune stage under the real dvc: SIGKILL and resume, byte-identical reruns, DDP with gloo."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from medtl.io import load_torch
from tests.project import Project, copy_project

FT = {"epochs": 4, "batch_size": 8, "patience": 10, "augment": {"enabled": True}, "dropout": 0.1}


@pytest.fixture(scope="module")
def ran(tiny_run: Project, tmp_path_factory) -> Project:
    """A copy of the tiny pipeline run: prepared data and backbone are in place."""
    p = copy_project(tiny_run, tmp_path_factory.mktemp("fine-tune-stage") / "project")
    p.env["OMP_NUM_THREADS"] = "1"  # tiny tensors: one thread per process is fastest, and fair on a shared machine
    p.original_params = p.params
    return p


@pytest.fixture
def prepared(ran: Project) -> Project:
    ran.set_params(ran.original_params)
    ran.update_params({"finetune": FT})
    for leftover in ("models/finetune.ckpt", "models/model.pt"):
        (ran.path / leftover).unlink(missing_ok=True)
    return ran


def stage(project: Project, timeout: float = 600) -> subprocess.CompletedProcess:
    return project.run(sys.executable, "stages/fine-tune.py", timeout=timeout)


def test_killed_run_resumes_and_ends_with_the_same_bytes(prepared: Project):
    ckpt, model = prepared.path / "models/finetune.ckpt", prepared.path / "models/model.pt"
    proc = subprocess.Popen([sys.executable, "stages/fine-tune.py"], cwd=prepared.path, env=prepared.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not model.exists(), "the run ended before it could be killed"
    killed_at = torch.load(ckpt, weights_only=True)["epoch"]
    assert killed_at < FT["epochs"] - 1

    resumed = prepared.dvc("repro", "fine-tune")  # dvc leaves the undeclared checkpoint in place
    assert f"resumed at epoch {killed_at + 2}" in resumed.stdout
    assert not ckpt.exists()
    resumed_bytes = model.read_bytes()
    steps = (prepared.path / "dvclive/plots/metrics/val_loss.tsv").read_text().splitlines()[1:]
    assert [line.split("\t")[0] for line in steps] == ["1", "2", "3", "4"]  # curves neither lost nor duplicated

    model.unlink()
    stage(prepared)  # uninterrupted
    assert model.read_bytes() == resumed_bytes


def test_resume_checkpoint_from_other_params_is_not_used(prepared: Project):
    prepared.update_params({"finetune": {"epochs": 1}})
    stage(prepared)
    reference = (prepared.path / "models/model.pt").read_bytes()
    # a complete checkpoint of a different run (other seed) must not be picked up
    prepared.update_params({"finetune": {"seed": 5}})
    stage(prepared)
    other = load_torch(prepared.path / "models/model.pt")
    from medtl.train.checkpoint import ResumeFile

    ResumeFile(prepared.path / "models/finetune.ckpt", "not this run").save(
        {"epoch": 0, "stopped": True, "module": {}, "optimizer": {}, "scheduler": {}, "scaler": {},
         "best": {"epoch": 0, "state": {}, "metrics": {}}, "history": []})
    prepared.update_params({"finetune": {"seed": 0}})
    res = stage(prepared)
    assert "from other params or data; starting over" in res.stderr
    assert (prepared.path / "models/model.pt").read_bytes() == reference
    assert other["params"]["seed"] == 5


def test_ddp_two_gloo_processes_match_one_process(prepared: Project):
    """Same global batch on 2 processes: the linear probe matches to float tolerance, full fine-tuning closely.

    Full fine-tuning differs only through batch norm, whose batch statistics are per process.
    Class weighting is off: a weighted mean loss is normalised per process, which moves the
    2-process result by about 1e-3 in validation loss.
    """
    results = {}
    for strategy in ("linear", "full"):
        for nproc in (1, 2):
            prepared.update_params({"finetune": {"strategy": strategy, "nproc": nproc, "epochs": 2,
                                                 "augment": {"enabled": False}, "dropout": 0.0,
                                                 "class_weighting": False}})
            out = stage(prepared)
            if nproc == 2:
                assert "x2:" in out.stdout, out.stdout
            ckpt = load_torch(prepared.path / "models/model.pt")
            assert ckpt["hardware"]["processes"] == nproc
            results[strategy, nproc] = ckpt
    one, two = results["linear", 1], results["linear", 2]
    assert one["best_epoch"] == two["best_epoch"]
    for k in ("val_loss", "val_auc", "val_accuracy"):
        assert two["validation"][k] == pytest.approx(one["validation"][k], abs=1e-4), k
    assert torch.allclose(one["head"]["1.weight"], two["head"]["1.weight"], atol=1e-4)
    one, two = results["full", 1], results["full", 2]
    assert two["validation"]["val_loss"] == pytest.approx(one["validation"]["val_loss"], abs=0.1)


def _stage_module():
    import importlib.util

    from tests.project import ROOT

    spec = importlib.util.spec_from_file_location("fine_tune_stage", ROOT / "stages" / "fine-tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dvclive_metrics_hold_the_kept_epoch_not_the_last(tmp_path, monkeypatch):
    import json

    from dvclive import Live

    stage_module = _stage_module()
    monkeypatch.chdir(tmp_path)
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": loss, "val_auc": auc, "val_accuracy": acc,
                "lr": 0.001} for e, (loss, auc, acc) in enumerate([(0.7, 0.60, 0.55), (0.4, 0.91, 0.80),
                                                                  (0.6, 0.75, 0.70)])]
    summary = {"best_epoch": 2, "epochs_run": 3, "history": history}  # the second epoch's weights were kept
    with Live("dvclive", save_dvc_exp=False, dvcyaml=False) as live:
        for row in history:
            stage_module.log_epoch(live, row["epoch"], row)
        stage_module.keep_best(live, summary)
    shown = json.loads((tmp_path / "dvclive/metrics.json").read_text())
    assert shown["val_auc"] == 0.91 and shown["val_loss"] == 0.4 and shown["val_accuracy"] == 0.80
    assert shown["best_epoch"] == 2 and shown["step"] == 2 and shown["epochs_run"] == 3
    rows = (tmp_path / "dvclive/plots/metrics/val_auc.tsv").read_text().splitlines()[1:]
    assert [r.split("\t")[0] for r in rows] == ["1", "2", "3"]  # curve steps count epochs as the record does


def test_the_stage_line_model_file_and_experiment_table_name_the_same_epoch(tiny_run: Project):
    import json

    ckpt = load_torch(tiny_run.path / "models/model.pt")
    shown = json.loads((tiny_run.path / "dvclive/metrics.json").read_text())
    assert shown["best_epoch"] == ckpt["best_epoch"] == shown["step"]
    for k, v in ckpt["validation"].items():
        assert shown[k] == pytest.approx(v), k
