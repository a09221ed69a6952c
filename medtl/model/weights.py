"""Pretrained weights: torchvision's ImageNet weights, a local file pinned by sha256, or none.

Hospital machines are often offline, so `medtl weights pull ARCH` runs on a
connected machine, stores torchvision's ImageNet weights as a plain state dict
and prints the sha256 to pin in params.yaml; the file is then tracked by DVC.
"""
from __future__ import annotations

import argparse
import os
import re
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from medtl.errors import MedtlError, ParamsError
from medtl.io import load_torch, save_torch, sha256_file, write_text

# torch and torchvision are imported where they are used: `medtl --help` imports this module.
if TYPE_CHECKING:
    import torch
    from torch import nn

_HEX64 = re.compile(r"[0-9a-f]{64}")
# Same pattern torch.hub uses to find the hash prefix in a download's file name.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")

StateDict = dict[str, "torch.Tensor"]


def _weights_enum(arch: str):
    from torchvision.models import get_model_weights

    from medtl.model.backbones import check_arch

    check_arch(arch)
    return get_model_weights(arch).DEFAULT


def hub_cache_path(arch: str) -> Path:
    """Where torchvision caches `arch`'s ImageNet weights (under TORCH_HOME, read at call time)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_weights_enum(arch).url)


def _verify_cached(path: Path) -> None:
    """torchvision names each weights file after the first hex digits of its sha256; check them."""
    match = _HASH_IN_NAME.search(path.name)
    if not match:
        return
    prefix, actual = match.group(1), sha256_file(path)
    if not actual.startswith(prefix):
        raise MedtlError(
            f"cached ImageNet weights {path} fail the hash check: the name expects a sha256 starting "
            f"with {prefix}, the file's sha256 is {actual}; delete the file and download again"
        )


def fetch_imagenet(arch: str) -> StateDict:
    """torchvision's ImageNet weights for `arch`: from the torch hub cache, else downloaded, hash-checked."""
    enum = _weights_enum(arch)
    cached = hub_cache_path(arch)
    if cached.is_file():
        # torch checks the hash only while downloading; a cached file is trusted as is.
        _verify_cached(cached)
    try:
        return enum.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (urllib.error.URLError, OSError) as e:  # OSError covers refused, reset and timed-out sockets
        pinned = f"models/pretrained/{arch}-imagenet.pt"
        raise MedtlError(
            f"cannot download ImageNet weights for {arch} from {enum.url} ({e}), and no copy is cached at "
            f"{cached}. On an offline machine, replace pretrain.weights: imagenet by a pinned file: "
            f"on a connected machine run `medtl weights pull {arch}`, carry {pinned} (and its .sha256) here, "
            f"track it with `dvc add {pinned}`, and set pretrain.weights: {pinned} and pretrain.sha256: "
            f"<the hash it printed> in params.yaml (see docs/transfer.md)"
        ) from e
    except RuntimeError as e:
        if "hash" in str(e):
            # A truncated download or a replaced file: torchvision names the hash in the file name.
            raise MedtlError(
                f"cached ImageNet weights {cached} fail torchvision's hash check ({str(e).strip()}); "
                f"delete the file and download again"
            ) from e
        raise MedtlError(f"cannot load ImageNet weights for {arch} from {cached}: {e}") from e


def _model_from_state(arch: str, state: Any, source: str) -> nn.Module:
    """`arch` with exactly the tensors of `state`; built on the meta device so no random init runs."""
    import torch
    from torchvision.models import get_model

    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise MedtlError(f"{source} is not a state dict (a mapping of names to tensors) for {arch}, nor a medtl "
                         "model file (another project's models/model.pt)")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        model = get_model(arch, weights=None)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise MedtlError(f"{source} does not hold {arch} weights: {str(e).splitlines()[0]}") from e
    return model


def check_sha256(value: Any, key: str = "pretrain.sha256") -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value.strip().lower()):
        raise ParamsError(f"{key} must be 64 hexadecimal characters (the file's sha256), got {value!r}")
    return value.strip().lower()


def load_pinned(path: str | Path, sha256: str | None) -> StateDict:
    """The state dict in `path`, only if the file's sha256 is `sha256`; pickled code is refused."""
    path = Path(path)
    if sha256 is None:
        raise ParamsError(
            f"pretrain.sha256 is required with a weights file ({path}): pin the file by its hash, "
            f"e.g. `sha256sum {path}`"
        )
    expected = check_sha256(sha256)
    if not path.is_file():
        raise ParamsError(f"pretrain.weights: file {path} does not exist (expected 'none', 'imagenet' or a file path)")
    actual = sha256_file(path)
    if actual != expected:
        raise ParamsError(
            f"weights file {path} has sha256 {actual}, but pretrain.sha256 pins {expected}; "
            f"the file changed or the wrong file is in place"
        )
    try:
        return load_torch(path)
    except MedtlError as e:
        raise ParamsError(f"pretrain.weights: {e}; allowed: a state dict or a medtl model file (models/model.pt), "
                          "saved without pickled objects") from e


def load_model(arch: str, weights: str = "none", sha256: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The full torchvision model (RGB input, ImageNet head) and a record of where its weights came from."""
    from torchvision.models import get_model

    from medtl.model.backbones import check_arch

    check_arch(arch)
    if not isinstance(weights, str) or not weights.strip():
        raise ParamsError(f"pretrain.weights must be 'none', 'imagenet' or a file path, got {weights!r}")
    if weights == "none":
        # Random init from torch's generator: deterministic under torch.manual_seed.
        return get_model(arch, weights=None), {"name": "none", "origin": None, "sha256": None}
    if weights == "imagenet":
        enum = _weights_enum(arch)
        model = _model_from_state(arch, fetch_imagenet(arch), f"ImageNet weights {enum}")
        cached = hub_cache_path(arch)
        return model, {
            "name": f"imagenet:{enum}",
            "origin": enum.url,
            "sha256": sha256_file(cached) if cached.is_file() else None,
        }
    return model_from_file(arch, load_pinned(weights, sha256), weights, sha256)


def model_from_file(arch: str, state: Any, weights: str, sha256: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """`arch` from a pinned file's state dict (a medtl model file is read by medtl.model.lineage instead)."""
    model = _model_from_state(arch, state, f"weights file {weights}")
    return model, {"name": "file", "origin": str(weights), "sha256": check_sha256(sha256)}


@dataclass(frozen=True)
class PulledWeights:
    arch: str
    path: Path
    sha256: str


def pull(arch: str, out_dir: str | Path, fetch: Callable[[str], StateDict] = fetch_imagenet) -> PulledWeights:
    """Write `arch`'s ImageNet weights to `out_dir/<arch>-imagenet.pt` (+ `.sha256`) and return the pin."""
    from medtl.model.backbones import check_arch

    check_arch(arch)
    state = fetch(arch)
    # Refuse to pin a file that would not load as this architecture later.
    _model_from_state(arch, state, f"downloaded weights for {arch}")
    path = Path(out_dir) / f"{arch}-imagenet.pt"
    save_torch({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)
    digest = sha256_file(path)
    # sha256sum's format, so `sha256sum -c` checks the file too.
    write_text(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n")
    return PulledWeights(arch, path, digest)


def params_block(pulled: PulledWeights) -> str:
    return (
        "pretrain:\n"
        f"  arch: {pulled.arch}\n"
        f"  weights: {pulled.path.as_posix()}\n"
        f"  sha256: {pulled.sha256}\n"
    )


def _pull_command(args: argparse.Namespace) -> int:
    from medtl.model.backbones import SUPPORTED

    if args.arch not in SUPPORTED:
        raise MedtlError(f"weights pull: unknown backbone {args.arch!r}; supported: {', '.join(SUPPORTED)}")
    pulled = pull(args.arch, args.out)
    print(f"wrote {pulled.path} (sha256 {pulled.sha256})")
    print("\nIn params.yaml:\n")
    print(params_block(pulled))
    print(f"Track the file with DVC:\n\n  dvc add {pulled.path.as_posix()}")
    return 0


def register(subparsers: Any) -> None:
    # From medtl.io, not medtl.cli: the stages that load weights must not depend on the CLI.
    from medtl.io import folder_argument

    parser = subparsers.add_parser("weights", help="pretrained weights for offline machines")
    sub = parser.add_subparsers(dest="weights_command", required=True)
    p = sub.add_parser("pull", help="download torchvision's ImageNet weights for ARCH and pin them by sha256")
    p.add_argument("arch", metavar="ARCH", help="a backbone of pretrain.arch, e.g. resnet18, resnet50, densenet121, convnext_tiny")
    p.add_argument("--out", type=folder_argument, default="models/pretrained", help="folder to write <arch>-imagenet.pt into (default: %(default)s)")
    p.set_defaults(func=_pull_command)
