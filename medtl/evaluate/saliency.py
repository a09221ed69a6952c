"""Grad-CAM saliency overlays: where in the image the model's decision came from.

Grad-CAM weights the feature maps of the backbone's last convolutional block
by the gradient of the class score, so it needs a block with a spatial grid.
Backbones without one (a vision transformer) raise NoTargetLayer, and the
evaluate stage reports that instead of writing maps.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from medtl.errors import MedtlError
from medtl.metrics import predict_labels

# The last convolutional block of each architecture, as a submodule path inside the torchvision model.
TARGET_LAYERS = {
    "resnet18": "layer4", "resnet34": "layer4", "resnet50": "layer4",
    "densenet121": "features",
    "efficientnet_b0": "features", "efficientnet_b1": "features", "efficientnet_b2": "features",
    "efficientnet_b3": "features",
    "convnext_tiny": "features",
    "mobilenet_v3_large": "features",
}


class NoTargetLayer(MedtlError):
    """The backbone has no convolutional block to attribute a decision to."""


def target_layer(model: nn.Module) -> nn.Module:
    backbone = model.backbone
    arch = backbone.arch
    if arch not in TARGET_LAYERS:
        raise NoTargetLayer(f"Grad-CAM needs a convolutional feature map; backbone {arch} has none "
                            f"(supported: {', '.join(TARGET_LAYERS)})")
    return backbone.model.get_submodule(TARGET_LAYERS[arch])


def grad_cam(model: nn.Module, images: torch.Tensor, class_index: list[int] | np.ndarray,
             layer: nn.Module | None = None) -> np.ndarray:
    """(N, H, W) maps in [0, 1] at the input resolution, for the given class of each image (fp32, no autocast)."""
    layer = target_layer(model) if layer is None else layer
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        output.retain_grad()
        store["act"] = output

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = images.detach().float().clone().requires_grad_(True)
            logits = model(x)
            idx = torch.as_tensor(np.asarray(class_index), dtype=torch.long, device=logits.device)
            model.zero_grad(set_to_none=True)
            logits.gather(1, idx[:, None]).sum().backward()
        act, grad = store["act"], store["act"].grad
    finally:
        handle.remove()
        model.train(was_training)
    if act.ndim != 4 or grad is None:
        raise NoTargetLayer(f"the target layer gave output of shape {tuple(act.shape)}, not a (N, C, H, W) feature map")
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(dim=1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam.detach().cpu().numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0)


def overlay(image: np.ndarray, cam: np.ndarray, caption: str, size: int) -> np.ndarray:
    """A BGR uint8 picture: the image in gray (or colour), the map in a colour scale, and a caption band."""
    img = np.asarray(image, dtype=np.float32)  # (C, S, S) in [0, 1]
    base = img[0] if img.shape[0] == 1 else img[:3].transpose(1, 2, 0)[:, :, ::-1]
    base = cv2.resize(np.clip(base, 0, 1), (size, size), interpolation=cv2.INTER_NEAREST)
    base = (base * 255).astype(np.uint8)
    if base.ndim == 2:
        base = cv2.cvtColor(base, cv2.COLOR_GRAY2BGR)
    heat = cv2.resize((np.clip(cam, 0, 1) * 255).astype(np.uint8), (size, size), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(heat, cv2.COLORMAP_JET)
    picture = cv2.addWeighted(base, 0.6, heat, 0.4, 0)
    scale, lines = caption_lines(caption, size)
    line_h = int(round(26 * scale)) + 4
    band = np.zeros((line_h * len(lines) + 6, size, 3), dtype=np.uint8)
    for n, line in enumerate(lines):
        cv2.putText(band, line, (CAPTION_MARGIN, line_h * (n + 1)), CAPTION_FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([picture, band])


CAPTION_FONT, CAPTION_MARGIN = cv2.FONT_HERSHEY_SIMPLEX, 4


def caption_lines(caption: str, width: int, scale: float = 0.5, min_scale: float = 0.35) -> tuple[float, list[str]]:
    """(font scale, lines): the caption's parts (split at double spaces) packed into lines that fit the picture.

    The font shrinks down to min_scale before the caption wraps; a single part wider than the picture is
    cut at characters rather than drawn past the edge.
    """
    room = width - 2 * CAPTION_MARGIN
    fits = lambda text, sc: cv2.getTextSize(text, CAPTION_FONT, sc, 1)[0][0] <= room  # noqa: E731
    while scale > min_scale and not fits(caption, scale):
        scale = round(scale - 0.05, 2)
    parts = [x.strip() for x in caption.split("  ") if x.strip()]
    lines: list[str] = []
    for part in parts:
        candidate = f"{lines[-1]}  {part}" if lines else part
        if lines and fits(candidate, scale):
            lines[-1] = candidate
            continue
        while not fits(part, scale):  # one part wider than the picture: break it at the last fitting character
            cut = max(1, next(i for i in range(len(part), 0, -1) if fits(part[:i], scale)))
            lines.append(part[:cut])
            part = part[cut:]
        if part:
            lines.append(part)
    return scale, lines or [""]


def pick_cases(labels: np.ndarray, probs: np.ndarray, threshold: float | None, per_case: int) -> dict[str, list[int]]:
    """Row indices per case, most confident first: TP/FP/TN/FN for a binary task, correct/wrong otherwise."""
    pred = predict_labels(probs, threshold)
    if probs.shape[1] == 2:
        p = probs[:, 1]
        masks = {"TP": (labels == 1) & (pred == 1), "FP": (labels == 0) & (pred == 1),
                 "TN": (labels == 0) & (pred == 0), "FN": (labels == 1) & (pred == 0)}
        # Positive calls sorted by falling p, negative calls by rising p: the surest (or worst) mistakes first.
        order = {"TP": -p, "FP": -p, "TN": p, "FN": p}
    else:
        conf = probs.max(axis=1)
        masks = {"correct": labels == pred, "wrong": labels != pred}
        order = {"correct": -conf, "wrong": -conf}
    out = {}
    for case, mask in masks.items():
        idx = np.flatnonzero(mask)
        out[case] = idx[np.argsort(order[case][idx], kind="stable")][:per_case].tolist()
    return out


def write_overlays(model: nn.Module, data, probs: np.ndarray, classes: list[str], threshold: float | None,
                   out_dir: Path, per_case: int, size: int, device: torch.device,
                   cases: dict[str, list[int]] | None = None) -> list[str]:
    """PNG overlays for a sample of each case (or the row indices in `cases`) into out_dir; returns the file names written."""
    layer = target_layer(model)
    cases = pick_cases(data.labels, probs, threshold, per_case) if cases is None else cases
    pred = predict_labels(probs, threshold)
    # Each map explains the class the model called: where the evidence for its decision lies.
    written = []
    rows = [i for idx in cases.values() for i in idx]
    if not rows:
        return written
    model.to(device)
    images = torch.from_numpy(np.asarray(data.images[sorted(rows)], dtype=np.float32)).to(device)
    position = {i: k for k, i in enumerate(sorted(rows))}
    target = [int(pred[i]) for i in sorted(rows)]
    cams = grad_cam(model, images, target, layer)
    for case, idx in cases.items():
        for rank, i in enumerate(idx):
            k = position[i]
            if probs.shape[1] == 2:
                caption = f"{case}  p({classes[1]})={probs[i, 1]:.3f}  t={threshold:.3f}  map: {classes[int(pred[i])]}"
            else:
                caption = f"{case}  {classes[int(pred[i])]} p={probs[i].max():.3f} (true {classes[int(data.labels[i])]})"
            name = f"{case}_{rank}_{data.rows[i]['image_id']}.png"
            picture = overlay(np.asarray(data.images[i]), cams[k], caption, size)
            if not cv2.imwrite(str(out_dir / name), picture):
                raise MedtlError(f"cannot write saliency map {out_dir / name}")
            written.append(name)
    return written
