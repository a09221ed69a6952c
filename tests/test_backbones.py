import pytest
import torch
from torchvision.models import get_model

from medtl.errors import MedtlError, ParamsError
from medtl.io import load_torch, save_torch, sha256_file
from medtl.model.backbones import (
    SUPPORTED,
    _gray_conv,
    Backbone,
    backbone_from_state,
    backbone_state,
    check_input_size,
    input_size_rule,
)
from medtl.model.start import build_backbone

EXPECTED_FEATURES = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "densenet121": 1024,
    "efficientnet_b0": 1280,
    "efficientnet_b1": 1280,
    "efficientnet_b2": 1408,
    "efficientnet_b3": 1536,
    "convnext_tiny": 768,
    "mobilenet_v3_large": 1280,
    "vit_b_16": 768,
    "vgg16_bn": 4096,
}


def _features(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone.eval()(x)


def test_registry_is_the_documented_list():
    assert set(SUPPORTED) == set(EXPECTED_FEATURES)


@pytest.mark.parametrize("arch", list(EXPECTED_FEATURES))
def test_every_arch_gives_features_for_gray_and_rgb(arch):
    # On the meta device: shapes are computed without random init or arithmetic, which keeps
    # eleven architectures fast; real numbers are checked on the small ones below.
    size = input_size_rule(arch) or 32
    for channels in (1, 3):
        with torch.device("meta"):
            backbone = build_backbone(arch, in_channels=channels)
            out = _features(backbone, torch.empty(2, channels, size, size))
        assert (backbone.arch, backbone.in_channels) == (arch, channels)
        assert backbone.num_features == EXPECTED_FEATURES[arch]
        assert out.shape == (2, EXPECTED_FEATURES[arch])
        assert backbone.first_conv.in_channels == channels
        _check_stages(backbone)


def _check_stages(backbone: Backbone) -> None:
    stages = backbone.stages()
    ids = [id(p) for _, params in stages for p in params]
    assert len(ids) == len(set(ids)) == len(list(backbone.parameters())), "each parameter in exactly one stage"
    assert all(params for _, params in stages), "no empty stage"
    assert stages[0][0] == "stem" and any(p is backbone.first_conv.weight for p in stages[0][1])


@pytest.mark.parametrize("arch", ["resnet18"])
def test_small_archs_compute_finite_features(arch):
    for channels in (1, 3):
        out = _features(build_backbone(arch, in_channels=channels), torch.rand(2, channels, 32, 32))
        assert out.shape == (2, EXPECTED_FEATURES[arch]) and torch.isfinite(out).all()


def _pinned_resnet18(tmp_path):
    torch.manual_seed(3)
    state = get_model("resnet18", weights=None).state_dict()
    path = tmp_path / "resnet18.pt"
    save_torch(state, path)
    return state, path, sha256_file(path)


def test_adapted_first_conv_is_the_sum_of_the_rgb_filters(tmp_path):
    state, path, digest = _pinned_resnet18(tmp_path)
    gray = build_backbone("resnet18", 1, weights=str(path), sha256=digest)
    assert gray.first_conv.weight.shape == (64, 1, 7, 7)
    torch.testing.assert_close(gray.first_conv.weight.detach(), state["conv1.weight"].sum(dim=1, keepdim=True))
    # Every other tensor is the pretrained one.
    rgb = build_backbone("resnet18", 3, weights=str(path), sha256=digest)
    torch.testing.assert_close(gray.model.layer4[1].conv2.weight, rgb.model.layer4[1].conv2.weight)


def test_gray_modes_match_the_rgb_network_on_a_gray_image(tmp_path):
    _, path, digest = _pinned_resnet18(tmp_path)
    g = torch.rand(2, 1, 32, 32)
    rgb = _features(build_backbone("resnet18", 3, weights=str(path), sha256=digest), g.repeat(1, 3, 1, 1))
    adapt = _features(build_backbone("resnet18", 1, weights=str(path), sha256=digest, grayscale="adapt"), g)
    repeat_bb = build_backbone("resnet18", 1, weights=str(path), sha256=digest, grayscale="repeat")
    assert repeat_bb.first_conv.in_channels == 3
    torch.testing.assert_close(adapt, rgb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_features(repeat_bb, g), rgb)


def test_gray_conv_keeps_bias_and_geometry():
    # vit_b_16's patch projection has a bias and a 16 px stride.
    rgb = torch.nn.Conv2d(3, 8, 16, stride=16, bias=True)
    gray = _gray_conv(rgb)
    assert (gray.in_channels, gray.kernel_size, gray.stride) == (1, (16, 16), (16, 16))
    torch.testing.assert_close(gray.bias, rgb.bias)
    g = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gray(g), rgb(g.repeat(1, 3, 1, 1)))


def test_unknown_arch_lists_the_supported_names():
    with pytest.raises(ParamsError) as e:
        build_backbone("resnet1000")
    msg = str(e.value)
    assert "pretrain.arch" in msg and "resnet1000" in msg
    for name in SUPPORTED:
        assert name in msg


@pytest.mark.parametrize("kwargs, key", [({"in_channels": 2}, "in_channels"), ({"grayscale": "triple"}, "pretrain.grayscale")])
def test_bad_channels_or_gray_mode(kwargs, key):
    with pytest.raises(ParamsError, match=key):
        build_backbone("resnet18", **kwargs)


def test_wrong_input_channels_is_reported():
    with pytest.raises(MedtlError, match=r"\(N, 1, H, W\)"):
        build_backbone("resnet18", 1)(torch.rand(1, 3, 32, 32))


def test_input_size_rule():
    assert input_size_rule("vit_b_16") == 224
    assert input_size_rule("resnet18") is None
    check_input_size("vit_b_16", 224)
    check_input_size("resnet18", 64)
    with pytest.raises(ParamsError, match="pretrain.arch vit_b_16 needs preprocess.image_size 224"):
        check_input_size("vit_b_16", 128)


def test_state_round_trip_through_a_safe_checkpoint(tmp_path):
    torch.manual_seed(0)
    original = build_backbone("resnet18", 1)
    path = tmp_path / "backbone.pt"
    save_torch(backbone_state(original), path)
    state = load_torch(path)
    assert {k: state[k] for k in ("arch", "in_channels", "num_features", "grayscale")} == {
        "arch": "resnet18", "in_channels": 1, "num_features": 512, "grayscale": "adapt"}
    rng = torch.get_rng_state()
    restored = backbone_from_state(state)
    assert torch.equal(rng, torch.get_rng_state()), "rebuilding must not consume the random generator"
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(_features(restored, x), _features(original, x))


def test_state_round_trip_keeps_repeat_mode():
    original = build_backbone("resnet18", 1, grayscale="repeat")
    restored = backbone_from_state(backbone_state(original))
    assert restored.grayscale == "repeat" and restored.first_conv.in_channels == 3
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(_features(restored, x), _features(original, x))


def test_mismatched_state_is_reported():
    state = backbone_state(build_backbone("resnet18", 1))
    state["arch"] = "resnet34"
    with pytest.raises(MedtlError, match="does not match resnet34"):
        backbone_from_state(state)
    with pytest.raises(MedtlError, match="missing or has a malformed field"):
        backbone_from_state({"arch": "resnet18"})


def test_vgg16_bn_trains_by_stage_on_a_tiny_input():
    """vgg16_bn's layer groups: each strategy's frozen/trained split, and real features of a 32 px image."""
    from medtl.model.classifier import Classifier
    from medtl.train.finetune import FinetuneParams, freeze, trained_stages

    torch.manual_seed(0)
    backbone = build_backbone("vgg16_bn", in_channels=1)
    names = [n for n, _ in backbone.stages()]
    assert names == ["stem", "block2", "block3", "block4", "block5", "top"]
    _check_stages(backbone)
    model = Classifier(backbone, 2, [0.5], [0.2])
    for strategy, trained in (("linear", []), ("partial", ["block5", "top"]), ("full", names)):
        params = FinetuneParams(strategy=strategy, unfreeze_stages=2)
        frozen = freeze(model, trained_stages(params, 0, len(names)))
        assert [n for n, ps in backbone.stages() if id(ps[0]) not in frozen] == trained
    assert trained_stages(FinetuneParams(strategy="gradual", unfreeze_every=1), 3, len(names)) == 3
    out = _features(backbone, torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 4096) and torch.isfinite(out).all()
