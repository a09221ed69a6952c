import os
import urllib.error

import pytest
import torch
from torchvision.models import get_model

from medtl import cli
from medtl.errors import MedtlError, ParamsError
from medtl.io import save_torch, sha256_file
from medtl.model import weights
from medtl.model.start import build_backbone


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch):
    """A private, empty torch hub cache, so no test reads or fills the user's."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def no_network(monkeypatch):
    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _resnet18_state(seed=5):
    torch.manual_seed(seed)
    return get_model("resnet18", weights=None).state_dict()


def test_none_is_random_and_deterministic_under_seed():
    torch.manual_seed(11)
    a = build_backbone("resnet18", 1)
    torch.manual_seed(11)
    b = build_backbone("resnet18", 1)
    c = build_backbone("resnet18", 1)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    assert not torch.equal(a.first_conv.weight, c.first_conv.weight)
    assert a.weights_info == {"name": "none", "origin": None, "sha256": None}


def test_pinned_file_loads_when_the_hash_matches(tmp_path):
    state = _resnet18_state()
    path = tmp_path / "w.pt"
    save_torch(state, path)
    digest = sha256_file(path)
    backbone = build_backbone("resnet18", 3, weights=str(path), sha256=digest.upper())
    torch.testing.assert_close(backbone.model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert backbone.weights_info == {"name": "file", "origin": str(path), "sha256": digest}


def test_pinned_file_hash_mismatch_names_both_hashes_and_the_file(tmp_path):
    path = tmp_path / "w.pt"
    save_torch(_resnet18_state(), path)
    pinned = "0" * 64
    with pytest.raises(MedtlError) as e:
        build_backbone("resnet18", weights=str(path), sha256=pinned)
    msg = str(e.value)
    assert pinned in msg and sha256_file(path) in msg and str(path) in msg


def test_pinned_file_needs_a_valid_sha256(tmp_path):
    path = tmp_path / "w.pt"
    save_torch(_resnet18_state(), path)
    with pytest.raises(ParamsError, match="pretrain.sha256 is required"):
        build_backbone("resnet18", weights=str(path))
    with pytest.raises(ParamsError, match="64 hexadecimal"):
        build_backbone("resnet18", weights=str(path), sha256="abc")
    with pytest.raises(ParamsError, match="does not exist"):
        build_backbone("resnet18", weights=str(tmp_path / "missing.pt"), sha256="0" * 64)
    with pytest.raises(ParamsError, match="pretrain.weights"):
        build_backbone("resnet18", weights="")


class _RunsCode:
    """Unpickling this object would create a folder: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_file_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    state = _resnet18_state()
    state["conv1.weight"] = _RunsCode(marker)
    torch.save(state, path)
    with pytest.raises(MedtlError, match="cannot be loaded safely"):
        build_backbone("resnet18", weights=str(path), sha256=sha256_file(path))
    assert not marker.exists()


def test_file_for_another_arch_is_reported(tmp_path):
    path = tmp_path / "w.pt"
    save_torch(_resnet18_state(), path)
    with pytest.raises(MedtlError, match="does not hold resnet34 weights"):
        build_backbone("resnet34", weights=str(path), sha256=sha256_file(path))
    save_torch({"weights": [1, 2, 3]}, path)
    with pytest.raises(MedtlError, match="not a state dict"):
        build_backbone("resnet18", weights=str(path), sha256=sha256_file(path))


def test_imagenet_cache_path_follows_torch_home(torch_home):
    path = weights.hub_cache_path("resnet18")
    assert path.parent == torch_home / "hub" / "checkpoints"
    assert path.name == "resnet18-f37072fd.pth"


def test_imagenet_offline_points_to_weights_pull(no_network):
    with pytest.raises(MedtlError) as e:
        build_backbone("resnet18", weights="imagenet")
    msg = str(e.value)
    assert "medtl weights pull resnet18" in msg and "download.pytorch.org" in msg
    # The whole round trip: where the cache would be, how to track the file, which params to pin.
    assert str(weights.hub_cache_path("resnet18")) in msg
    assert "dvc add models/pretrained/resnet18-imagenet.pt" in msg
    assert "pretrain.weights: models/pretrained/resnet18-imagenet.pt" in msg and "pretrain.sha256" in msg


def test_imagenet_offline_stage_params_fail_before_any_output(tmp_path, monkeypatch, no_network):
    """`weights: imagenet` on an offline machine stops the stage with exit code 2 and writes nothing."""
    import subprocess
    import sys

    import numpy as np
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    np.save(prepared / "train.npy", np.zeros((2, 1, 32, 32), np.float16))
    from medtl.prepare.prepared import write_stats
    from tests.project import preprocessing_record

    write_stats(prepared, preprocessing_record(32, classes=["a", "b"], mean=[0.5]), {"train": 2})
    (tmp_path / "params.yaml").write_text("pretrain:\n  weights: imagenet\n")
    # A real offline machine: the download goes to an address that cannot resolve.
    env = {**os.environ, "PYTHONPATH": str(root), "TORCH_HOME": str(tmp_path / "th"),
           "https_proxy": "http://offline.invalid:9", "HTTPS_PROXY": "http://offline.invalid:9"}
    res = subprocess.run([sys.executable, str(root / "stages" / "pretrain-adapt.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "medtl weights pull resnet18" in res.stderr and "pretrain.sha256" in res.stderr
    assert not (tmp_path / "models" / "backbone.pt").exists()


def test_imagenet_cached_file_that_fails_the_hash_check_is_reported(no_network):
    cached = weights.hub_cache_path("resnet18")
    cached.parent.mkdir(parents=True)
    torch.save(_resnet18_state(), cached)
    with pytest.raises(MedtlError) as e:
        build_backbone("resnet18", weights="imagenet")
    msg = str(e.value)
    prefix = weights._HASH_IN_NAME.search(cached.name).group(1)
    assert str(cached) in msg and prefix in msg and sha256_file(cached) in msg and "delete the file" in msg


def test_imagenet_loads_through_the_torch_hub_cache(no_network, monkeypatch):
    # A real file cannot be faked to match torchvision's hash prefix, so only that check is bypassed.
    monkeypatch.setattr(weights, "_verify_cached", lambda path: None)
    state = _resnet18_state()
    cached = weights.hub_cache_path("resnet18")
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    backbone = build_backbone("resnet18", 1, weights="imagenet")
    torch.testing.assert_close(backbone.first_conv.weight.detach(), state["conv1.weight"].sum(dim=1, keepdim=True))
    assert backbone.weights_info["name"] == "imagenet:ResNet18_Weights.IMAGENET1K_V1"
    assert backbone.weights_info["sha256"] == sha256_file(cached)


def test_pull_writes_a_pinned_file_that_loads(tmp_path):
    state = _resnet18_state()
    pulled = weights.pull("resnet18", tmp_path / "pretrained", fetch=lambda arch: state)
    assert pulled.path == tmp_path / "pretrained" / "resnet18-imagenet.pt"
    assert pulled.sha256 == sha256_file(pulled.path)
    sidecar = pulled.path.with_name("resnet18-imagenet.pt.sha256")
    assert sidecar.read_text() == f"{pulled.sha256}  resnet18-imagenet.pt\n"
    block = weights.params_block(pulled)
    assert f"weights: {pulled.path.as_posix()}" in block and f"sha256: {pulled.sha256}" in block
    backbone = build_backbone("resnet18", 3, weights=str(pulled.path), sha256=pulled.sha256)
    torch.testing.assert_close(backbone.first_conv.weight, state["conv1.weight"])


def test_pull_refuses_weights_of_the_wrong_arch(tmp_path):
    with pytest.raises(MedtlError, match="does not hold resnet50 weights"):
        weights.pull("resnet50", tmp_path, fetch=lambda arch: _resnet18_state())
    assert not (tmp_path / "resnet50-imagenet.pt").exists()


def test_pull_command_through_the_torch_hub_cache(tmp_path, monkeypatch, capsys, no_network):
    monkeypatch.setattr(weights, "_verify_cached", lambda path: None)
    cached = weights.hub_cache_path("resnet18")
    cached.parent.mkdir(parents=True)
    torch.save(_resnet18_state(), cached)
    out = tmp_path / "w"
    assert cli.main(["weights", "pull", "resnet18", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    digest = sha256_file(out / "resnet18-imagenet.pt")
    assert f"sha256: {digest}" in printed and f"dvc add {(out / 'resnet18-imagenet.pt').as_posix()}" in printed


def test_pull_command_offline_fails_cleanly(tmp_path, capsys, no_network):
    assert cli.main(["weights", "pull", "resnet18", "--out", str(tmp_path)]) == 2
    assert "cannot download ImageNet weights for resnet18" in capsys.readouterr().err
