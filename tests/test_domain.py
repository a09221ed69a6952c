"""Target images, gradient reversal, DANN and target AdaBN, on tiny arrays and tiny files."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medtl import hardware
from medtl.errors import ParamsError
from medtl.model.classifier import Classifier
from medtl.model.start import build_backbone
from medtl.params import build
from medtl.prepare.prepared import PreparedSplit
from medtl.train.checkpoint import ResumeFile
from medtl.train.data import AugmentParams
from medtl.train.domain import DomainAdversarialParams, adabn_target, check_adabn_target, grad_reverse, ramp
from medtl.train.finetune import FinetuneParams, fit
from medtl.train.target import TargetParams, pixel_digest, read_target, shared_images
from tests.project import preprocessing_record

CPU = hardware.Hardware(torch.device("cpu"), "fp32")
NO_AUG = AugmentParams(enabled=False)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def split(n: int, seed: int, site_shift: float = 0.0) -> PreparedSplit:
    """Bright-centre images are class 1; the other site renders everything brighter and flatter."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.uniform(0, 0.5, (n, 1, 16, 16))
    images[labels == 1, :, 4:12, 4:12] += 0.4
    images = np.clip(images * (1 - site_shift) + 0.9 * site_shift, 0, 1)
    return PreparedSplit(images.astype(np.float16), labels.astype(np.int64), [{} for _ in range(n)])


TRAIN, VAL, TARGET = split(48, 1), split(16, 2), split(48, 3, site_shift=0.5)


def classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(build_backbone("resnet18", 1, "none"), 2, [0.3], [0.2], 0.0)


def params(**kw) -> FinetuneParams:
    base = dict(epochs=2, batch_size=8, augment=NO_AUG, device="cpu", precision="fp32", patience=50, monitor="val_loss",
                target=TargetParams(source="demo"), domain_adversarial=DomainAdversarialParams(weight=1.0, lr_mult=3.0))
    return FinetuneParams(**{**base, **kw})


def model_bytes(model: Classifier) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def test_gradient_reversal_reverses_and_scales():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)  # identity forward
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-0.5, -1.0, -1.5]))


def test_weight_ramps_from_zero_to_lambda():
    values = [ramp(0.8, 10.0, p / 10) for p in range(11)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.8, abs=1e-4)
    assert all(a < b for a, b in zip(values, values[1:]))


def test_dann_drives_domain_accuracy_to_chance_while_the_task_holds():
    """Same data, same seed: with the gradient reversed the domain classifier ends near 50%; without it near 100%."""
    runs = {}
    for weight in (1e-9, 1.0):  # 1e-9: the domain classifier trains, the backbone is (almost) not pushed by it
        p = params(epochs=8, domain_adversarial=DomainAdversarialParams(weight=weight, lr_mult=3.0))
        runs[weight] = fit(p, classifier(), TRAIN, VAL, CPU, target=TARGET.images)["history"]
    tail = {w: float(np.mean([r["domain_accuracy"] for r in h[-3:]])) for w, h in runs.items()}
    print("domain accuracy, last 3 epochs:", tail)
    assert tail[1e-9] > 0.9
    assert abs(tail[1.0] - 0.5) < 0.15
    assert runs[1.0][-1]["val_accuracy"] >= 0.9 and runs[1e-9][-1]["val_accuracy"] >= 0.9
    assert runs[1.0][-1]["domain_weight"] == pytest.approx(1.0, abs=0.01) and runs[1.0][0]["domain_weight"] < 0.9


def test_dann_is_deterministic_and_resumes_to_the_same_bytes(tmp_path):
    p = params(epochs=3, augment=AugmentParams())
    train = split(24, 1)
    a, b = classifier(), classifier()
    fit(p, a, train, VAL, CPU, target=TARGET.images)
    fit(p, b, train, VAL, CPU, target=TARGET.images)
    assert model_bytes(a) == model_bytes(b)

    class Interrupt(Exception):
        pass

    def stop_at_epoch_1(epoch, row):
        if epoch == 1:
            raise Interrupt
    resume = ResumeFile(tmp_path / "ft.ckpt", "k")
    with pytest.raises(Interrupt):
        fit(p, classifier(), train, VAL, CPU, stop_at_epoch_1, resume=resume, target=TARGET.images)
    resume.wait()
    resumed = classifier(seed=5)
    summary = fit(p, resumed, train, VAL, CPU, resume=resume, target=TARGET.images)
    assert summary["resumed_from"] == 1 and "domain_accuracy" in summary["history"][-1]
    assert model_bytes(resumed) == model_bytes(a)


def test_adabn_target_moves_only_batch_norm_statistics():
    model = classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = adabn_target(model, TARGET.images, 16, CPU)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert record["method"] == "adabn_target" and record["images"] == len(TARGET.images)
    assert not model.training


def test_bad_target_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(ParamsError, match=r"finetune\.domain_adversarial\.weight.*strategy 'linear'"):
        build(FinetuneParams, {"strategy": "linear", "target": {"source": "demo"},
                               "domain_adversarial": {"weight": 0.5}}, "finetune")
    with pytest.raises(ParamsError, match=r"finetune\.adapt.*finetune\.target"):
        build(FinetuneParams, {"adapt": "adabn_target"}, "finetune")
    with pytest.raises(ParamsError, match=r"finetune\.domain_adversarial\.weight.*finetune\.target"):
        build(FinetuneParams, {"domain_adversarial": {"weight": 0.5}}, "finetune")
    with pytest.raises(ParamsError, match=r"finetune\.adapt.*one of 'none', 'adabn_target'"):
        build(FinetuneParams, {"adapt": "adabn"}, "finetune")
    with pytest.raises(ParamsError, match=r"finetune\.target.*inside finetune\.target_data"):
        build(FinetuneParams, {"target": {"source": "images", "images": "elsewhere/b"}, "target_data": "data/target"},
              "finetune")
    with pytest.raises(ParamsError, match=r"finetune\.target\.images"):
        build(FinetuneParams, {"target": {"source": "images"}}, "finetune")
    vit = build_backbone("vit_b_16", 1, "none")
    with pytest.raises(ParamsError, match=r"finetune\.adapt.*vit_b_16 has no batch-norm"):
        check_adabn_target(vit, "vit_b_16")

    pre = preprocessing_record(16)
    (tmp_path / "empty").mkdir()
    for folder in ("empty", "absent"):
        with pytest.raises(ParamsError, match=r"finetune\.target\.images"):
            read_target(TargetParams(source="images", images=str(tmp_path / folder)), "finetune.target", pre, set())
    # The demo writes CT images: a model trained on MR refuses them.
    small = {"patients": 6, "min_size": 32, "max_size": 40, "max_images_per_patient": 2}
    with pytest.raises(ParamsError, match=r"finetune\.target holds CT images.*trained on MR"):
        read_target(build(TargetParams, {"source": "demo", "demo": small}, "t"), "finetune.target", pre, {"MR"})
    ok = read_target(build(TargetParams, {"source": "demo", "demo": small}, "t"), "finetune.target", pre, {"CT"})
    assert ok.images.shape[1:] == (1, 16, 16) and ok.record["modalities"] == {"CT": len(ok.images)}


def test_target_folder_is_read_without_labels_and_identified_by_pixels(tmp_path):
    pre = preprocessing_record(16)
    folder = tmp_path / "target" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(folder / f"patient{i}_scan.png")
    (folder / "notes.txt").write_text("not an image")
    t = read_target(TargetParams(source="images", images=str(tmp_path / "target")), "finetune.target", pre, {"CT"})
    assert t.images.shape == (3, 1, 16, 16) and t.record["files"] == 4 and sum(t.record["skipped"].values()) == 1
    assert "patient" not in json.dumps(t.record)  # counted by digest, never named
    assert shared_images(t.images[:2], t.digests) == 2 and shared_images(TARGET.images, t.digests) == 0
    assert pixel_digest(t.images[0]) == t.digests[0]


DANN_WORKER = """
import json, sys
import numpy as np, torch
from medtl.train import distributed
from medtl import hardware
from medtl.model.start import build_backbone
from medtl.train.data import AugmentParams
from medtl.train.domain import DomainAdversarialParams
from medtl.train.finetune import FinetuneParams, fit
from medtl.model.classifier import Classifier
from medtl.prepare.prepared import PreparedSplit
from medtl.train.target import TargetParams

torch.set_num_threads(1)
def split(n, seed, shift=0.0):
    images = np.random.default_rng(seed).random((n, 1, 16, 16), dtype=np.float32) * (1 - shift) + shift
    return PreparedSplit(images, (np.arange(n) % 2).astype(np.int64), [{} for _ in range(n)])
world = distributed.world_from_env()
hw = hardware.Hardware(torch.device("cpu"), "fp32")
distributed.init(world, "cpu")
torch.manual_seed(0)
model = Classifier(build_backbone("resnet18", 1, "none"), 2, [0.5], [0.25])
params = FinetuneParams(strategy="partial", epochs=2, batch_size=8, seed=0, device="cpu", precision="fp32",
                        augment=AugmentParams(enabled=False), target=TargetParams(source="demo"),
                        domain_adversarial=DomainAdversarialParams(weight=0.5))
summary = fit(params, model, split(16, 1), split(4, 2), hw, world=world, target=split(12, 3, 0.3).images)
if world.is_main:
    with open(sys.argv[1], "w") as f:
        json.dump({"history": summary["history"], "processes": world.size}, f)
distributed.shutdown()
"""


def test_dann_under_two_processes(tmp_path):
    """DDP (gloo, 2 ranks) trains classifier and domain classifier together and reduces the domain accuracy."""
    worker = tmp_path / "worker.py"
    worker.write_text(DANN_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "GLOO_SOCKET_IFNAME": "lo"}
    out = tmp_path / "two.json"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(worker), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["processes"] == 2 and len(got["history"]) == 2
    for row in got["history"]:
        assert 0.0 <= row["domain_accuracy"] <= 1.0 and row["domain_loss"] > 0


@pytest.mark.e2e
def test_target_through_the_pipeline_is_recorded_and_an_overlap_is_flagged_transductive(tiny_run, tmp_path):
    """Target AdaBN + DANN through dvc; the external set that shares an image with the target is flagged, the other not."""
    from medtl.evaluate.external import set_columns
    from medtl.io import load_torch
    from tests.project import copy_project
    from tests.test_external import write_shifted_site

    p = copy_project(tiny_run, tmp_path / "project")
    site_b = p.path / "sites/external/site_b"
    write_shifted_site(site_b, seed=31)
    target = p.path / "sites/target"
    write_shifted_site(target / "unlabelled", seed=32)  # other patients of the same site, class folders ignored
    shared = sorted((site_b / "lesion").rglob("*.png"))[0]
    (target / "copy.png").write_bytes(shared.read_bytes())
    p.update_params({
        "finetune": {"target": {"source": "images", "images": "sites/target"}, "target_data": "sites/target",
                     "adapt": "adabn_target", "domain_adversarial": {"weight": 0.5}},
        "evaluate": {"external_data": "sites/external", "external": [
            {"name": "site_b", "source": "folder", "folder": {"root": "sites/external/site_b", "layout": "classes"}},
            {"name": "same_scanner", "source": "demo",
             "demo": {"patients": 8, "seed": 99, "min_size": 48, "max_size": 64, "max_images_per_patient": 2}}]}})
    res = p.dvc("repro")
    assert "Running stage 'fine-tune'" in res.stdout and "Running stage 'pretrain-adapt'" not in res.stdout
    assert "33 target images" in res.stdout and "domain accuracy" in res.stdout and "adabn_target" in res.stdout
    assert "external site_b" in res.stdout and "transductive" in res.stdout.split("external site_b")[1].split(";")[0]

    m = json.loads((p.path / "reports/metrics.json").read_text())
    assert set_columns(m, "site_b")["transductive"] is True and set_columns(m, "site_b")["transductive_images"] == 1
    assert set_columns(m, "same_scanner")["transductive"] is False
    record = json.loads((p.path / "models/model.pt.provenance.json").read_text())
    assert record["extra"]["target"]["images"] == 33 and len(record["extra"]["target"]["pixels_sha256"]) == 64
    assert "sites/target" in json.dumps(record["inputs"])
    ckpt = load_torch(p.path / "models/model.pt")
    assert len(ckpt["target"]["pixel_digests"]) == 33 and ckpt["target_adaptation"]["method"] == "adabn_target"
    lines = (p.path / "dvclive/plots/metrics/domain_accuracy.tsv").read_text().splitlines()
    assert lines[0].split("\t")[-1] == "domain_accuracy" and len(lines) >= 2  # one row per epoch

    p.run(sys.executable, "-m", "medtl.cli", "audit", "--allow-dirty", "--out", "audit")
    md = (p.path / "audit/report.md").read_text()
    assert "target images (unlabelled)" in md and "33 images from source images" in md
    table = md[md.index("Test split and external sets"):].split("\n\n")[1]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "transductive" in rows["site_b"] and "transductive" not in rows["same_scanner"]
    assert "sites/target" in md  # the target folder is listed among the inputs (file names withheld)

    (target / "more.png").write_bytes(sorted((site_b / "normal").rglob("*.png"))[0].read_bytes())
    assert "fine-tune" in p.dvc("status").stdout  # a changed target reruns fine-tune


def test_absent_target_stops_the_stage_with_the_key_and_writes_nothing(project):
    project.update_params({"finetune": {"target": {"source": "images", "images": "sites/target"},
                                        "target_data": "sites", "adapt": "adabn_target"}})
    res = project.run(sys.executable, "stages/fine-tune.py", check=False)
    assert res.returncode != 0 and "finetune.target" in res.stderr and "sites/target" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not (project.path / "models/model.pt").exists() and not (project.path / "dvclive").exists()
