"""1. Linear probe: medtl's cached features vs the classic recipe (ImageFolder + DataLoader + frozen ResNet every epoch).

Same images (the demo's prepared arrays, written out as PNG for the classic
recipe), same resolution, backbone weights, head initialisation, optimiser,
learning rate, batch size and epochs. Both evaluate on validation every epoch,
as a tutorial loop does; wall time covers training and those evaluations.
"""
from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from benchmarks.common import Result, Timer, auc, cpu_fp32, load_stats
from medtl.prepare.prepared import load_split

NAME = "linear_probe"


def write_png_tree(prepared: Path, root: Path, classes: list[str]) -> None:
    """Each split as root/<split>/<index>_<class>/<image>.png, 8-bit, as tutorials' datasets are."""
    for split in ("train", "val", "test"):
        data = load_split(prepared, split)
        for i, (img, y) in enumerate(zip(data.images, data.labels)):
            d = root / split / f"{y}_{classes[y]}"  # index prefix: ImageFolder's sorted order = medtl's order
            d.mkdir(parents=True, exist_ok=True)
            px = np.round(np.asarray(img[0], dtype=np.float32) * 255).astype(np.uint8)
            cv2.imwrite(str(d / f"{i:06d}.png"), px)


def classic(backbone, k: int, root: Path, stats: dict, epochs: int, batch_size: int, lr: float, seed: int,
            workers: int) -> tuple[float, float]:
    """The tutorial recipe; returns (seconds, test AUC)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Grayscale(1), transforms.ToTensor(),
                             transforms.Normalize(stats["mean"], stats["std"])])
    sets = {s: datasets.ImageFolder(str(root / s), transform=tf) for s in ("train", "val", "test")}
    torch.manual_seed(seed)
    head = nn.Linear(backbone.num_features, k)
    backbone.eval().requires_grad_(False)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(sets["train"], batch_size=batch_size, shuffle=True, num_workers=workers, generator=g)
    val = DataLoader(sets["val"], batch_size=64, num_workers=workers)

    def scores(loader) -> tuple[np.ndarray, np.ndarray]:
        out, ys = [], []
        with torch.no_grad():
            for x, y in loader:
                out.append(torch.softmax(head(backbone(x)), 1)[:, 1])
                ys.append(y)
        return torch.cat(ys).numpy(), torch.cat(out).numpy()

    with Timer() as t:
        for _ in range(epochs):
            head.train()
            for x, y in train:
                with torch.no_grad():
                    f = backbone(x)
                loss = loss_fn(head(f), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            head.eval()
            auc(*scores(val))  # the per-epoch validation every tutorial loop has
    test = DataLoader(sets["test"], batch_size=64, num_workers=0)
    return t.seconds, auc(*scores(test))


def medtl_probe(backbone, k: int, prepared: Path, stats: dict, epochs: int, batch_size: int, lr: float,
                seed: int) -> tuple[float, float]:
    """medtl.train.finetune.fit with strategy linear; returns (seconds, test AUC)."""
    from medtl.model.classifier import Classifier
    from medtl.model.inference import forward_batches
    from medtl.train.data import AugmentParams
    from medtl.train.finetune import FinetuneParams, fit

    params = FinetuneParams(strategy="linear", epochs=epochs, batch_size=batch_size, lr=lr, schedule="constant",
                            patience=epochs, class_weighting=False, augment=AugmentParams(enabled=False), seed=seed,
                            device="cpu", precision="fp32")
    hw = cpu_fp32()
    torch.manual_seed(seed)
    model = Classifier(backbone, k, stats["mean"], stats["std"])
    train, val, test = (load_split(prepared, s) for s in ("train", "val", "test"))
    with Timer() as t:
        fit(params, model, train, val, hw)
    probs = torch.softmax(forward_batches(model, test.images, 64, hw, "test"), 1)[:, 1].numpy()
    return t.seconds, auc(test.labels, probs)


def run(work: Path, prepared: Path, epochs: list[int], batch_size: int, workers: int, auc_tolerance: float,
        arch: str = "resnet18") -> Result:
    from medtl.model.start import build_backbone

    stats = load_stats(prepared)
    classes, k = stats["classes"], len(stats["classes"])
    res = Result(NAME, "Linear probe: cached features vs classic recipe",
                 {"arch": arch, "weights": "none (offline)", "size": stats["size"], "images": stats["counts"],
                  "epochs": epochs, "batch_size": batch_size, "dataloader_workers": workers, "lr": 1e-3})
    root = work / "png"
    if not root.exists():
        write_png_tree(prepared, root, classes)
    torch.manual_seed(0)
    backbone = build_backbone(arch, stats["channels"], "none")
    for e in epochs:
        c_s, c_auc = classic(copy.deepcopy(backbone), k, root, stats, e, batch_size, 1e-3, 0, workers)
        m_s, m_auc = medtl_probe(copy.deepcopy(backbone), k, prepared, stats, e, batch_size, 1e-3, 0)
        res.add(f"classic {e} epochs", round(c_s, 2), "s")
        res.add(f"medtl {e} epochs", round(m_s, 2), "s")
        res.add(f"test AUC classic / medtl, {e} epochs", f"{c_auc:.3f} / {m_auc:.3f}")
        if e >= 10:
            res.check(f"speedup at {e} epochs", round(c_s / m_s, 1), ">=", 10.0)
        else:
            res.add(f"speedup at {e} epochs", round(c_s / m_s, 1), "x")
        res.check(f"|AUC difference| at {e} epochs", round(abs(c_auc - m_auc), 3), "<=", auc_tolerance)
    speedups = [r["value"] for r in res.rows + res.checks if r.get("measure", r.get("check", "")).startswith("speedup")]
    if len(speedups) > 1:
        res.check("speedup grows with epochs", int(all(b > a for a, b in zip(speedups, speedups[1:]))), "==", 1)
    res.notes.append("classic: 8-bit PNG per image, torchvision ImageFolder + DataLoader, frozen backbone forwarded on "
                     "train and val every epoch; medtl: fit(strategy=linear), backbone forwarded once, features cached. "
                     "medtl keeps the best validation epoch, the classic loop its last: AUCs agree within the tolerance.")
    return res
