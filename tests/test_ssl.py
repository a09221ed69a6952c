"""SimCLR continued pretraining on tiny data: it learns, it is deterministic, it never reads labels or val/test."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from medtl.errors import ParamsError
from medtl.params import build
from medtl.prepare.prepared import write_stats
from medtl.train.adaptation import PretrainParams, run_pretrain
from medtl.train.ssl import SSLAugment, SSLParams, make_views, nt_xent
from tests.project import preprocessing_record


def _toy_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Distinct instances (a disc and a grating each), so telling views apart is learnable."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        freq, angle = rng.uniform(4, 12), rng.uniform(0, np.pi)
        grating = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi)
        out[i, 0] = 0.35 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r) + 0.5 * grating
    return np.clip(out, 0, 1)


def write_prepared(folder, n=16, size=32, with_other_splits=True):
    folder.mkdir(parents=True, exist_ok=True)
    train = _toy_images(n, size)
    np.save(folder / "train.npy", train.astype(np.float16))
    write_stats(folder, preprocessing_record(size, classes=["a", "b"], mean=[float(train.mean())],
                                             std=[float(train.std())]), {"train": n})
    if with_other_splits:
        for split in ("val", "test"):
            np.save(folder / f"{split}.npy", _toy_images(4, size, seed=1).astype(np.float16))
        for split in ("train", "val", "test"):
            (folder / f"{split}.csv").write_text("image_id,label_index,group\nx,0,g\n")
    return folder


def ssl_params(**ssl):
    ssl_kw = {"epochs": 2, "batch_size": 8, "lr": 0.001, **ssl}
    return PretrainParams(adapt="ssl", device="cpu", precision="fp32", ssl=SSLParams(**ssl_kw))


def test_ssl_learns_on_a_learnable_toy_and_changes_the_backbone(tmp_path):
    prepared = write_prepared(tmp_path / "prepared", n=8, size=24)
    params = ssl_params(epochs=5, batch_size=8, lr=0.002)
    from medtl.model.start import build_backbone

    torch.manual_seed(params.seed)
    before = build_backbone("resnet18", 1).state_dict()
    seen = []
    backbone, record = run_pretrain(params, prepared, on_epoch=lambda e, loss: seen.append((e, loss)))
    after = backbone.state_dict()
    assert record["method"] == "ssl" and record["epochs"] == 5 and len(record["loss"]) == 5
    assert seen == list(enumerate(record["loss"]))
    # One batch of 8 per epoch: the loss starts near log(15) and falls as instances become separable.
    assert record["loss"][0] > 2.0
    assert min(record["loss"][-2:]) < record["loss"][0] - 0.3, record["loss"]
    assert record["images"] == 8 and record["image_sources"] == {"train": 8, "extra": None}
    assert not torch.equal(before["model.layer4.1.conv2.weight"], after["model.layer4.1.conv2.weight"])
    assert not torch.equal(before["model.bn1.running_mean"], after["model.bn1.running_mean"])
    assert set(before) == set(after)  # the projection head is not part of the backbone
    assert not backbone.training


def _write_extra_folder(folder):
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray((rng.random((40, 30)) * 255).astype(np.uint8)).save(folder / f"scan{i}.png")
    Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(folder / "rgb.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")


def test_ssl_is_deterministic_uses_extra_images_and_never_reads_labels_or_other_splits(tmp_path):
    prepared = write_prepared(tmp_path / "prepared", n=8, size=16)
    # Nothing but the training images and their statistics remains: labels and val/test are gone or garbage.
    for name in ("val.npy", "test.npy", "val.csv", "test.csv"):
        (prepared / name).unlink()
    (prepared / "train.csv").write_bytes(b"\x00garbage, not a csv\xff")
    extra = tmp_path / "unlabelled"
    _write_extra_folder(extra)
    params = ssl_params(epochs=1, batch_size=6, extra_images=str(extra))
    a, rec_a = run_pretrain(params, prepared)
    b, rec_b = run_pretrain(params, prepared)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    assert rec_a == rec_b
    assert rec_a["images"] == 12
    assert rec_a["image_sources"]["train"] == 8
    assert rec_a["image_sources"]["extra"] == {"folder": str(extra), "files": 5, "images": 4, "skipped": {"not_an_image": 1},
                                                  "hidden_files": 1}
    assert rec_a["steps"] == 2 and len(rec_a["loss"]) == 1


def test_views_are_medical_safe_and_seeded():
    x = torch.from_numpy(_toy_images(6, 32))
    aug = SSLAugment()
    v1 = make_views(x, aug, torch.Generator().manual_seed(0))
    v2 = make_views(x, aug, torch.Generator().manual_seed(0))
    assert torch.equal(v1, v2) and v1.shape == x.shape
    assert v1.min() >= 0 and v1.max() <= 1 and not torch.equal(v1, x)
    # With every random step off, a view is the image itself (up to resampling round-off).
    off = SSLAugment(crop_scale=1.0, aspect_limit=0, hflip=0, vflip=0, rotate_limit=0, brightness_contrast=0, noise_std=0, blur_p=0)
    torch.testing.assert_close(make_views(x, off, torch.Generator().manual_seed(0)), x, atol=1e-5, rtol=0)
    # RGB views keep colours in step: no per-channel (hue) jitter.
    gray = x.expand(-1, 3, -1, -1).contiguous()
    no_noise = SSLAugment(noise_std=0)
    rgb_view = make_views(gray, no_noise, torch.Generator().manual_seed(1))
    torch.testing.assert_close(rgb_view[:, 0], rgb_view[:, 2])


def test_nt_xent_prefers_matching_views():
    z = torch.randn(6, 16)
    good = nt_xent(z, z + 0.01 * torch.randn(6, 16), 0.2)
    bad = nt_xent(z, torch.randn(6, 16), 0.2)
    assert good < bad
    assert good < 0.5 < 1.5 < bad


@pytest.mark.parametrize("raw, key", [
    ({"adapt": "simclr"}, "'none', 'adabn', 'ssl'"),
    ({"adapt": "ssl", "ssl": {"batch_size": 1}}, "pretrain.ssl.batch_size"),
    ({"ssl": {"epoch": 3}}, "allowed keys are augment, batch_size, epochs"),
    ({"ssl": {"temperature": 0}}, "pretrain.ssl.temperature"),
    ({"ssl": {"augment": {"crop_scale": 0.0}}}, "pretrain.ssl.augment.crop_scale"),
    ({"ssl": {"augment": {"hue": 0.1}}}, "'hue'"),
])
def test_params_errors_name_the_key_and_the_choices(raw, key):
    with pytest.raises(ParamsError, match=re.escape(key)):
        build(PretrainParams, raw, "pretrain")


def test_extra_images_must_be_a_folder_with_images(tmp_path):
    prepared = write_prepared(tmp_path / "prepared", n=4, size=24)
    with pytest.raises(ParamsError, match="pretrain.ssl.extra_images: .* is not a folder"):
        run_pretrain(ssl_params(extra_images=str(tmp_path / "missing")), prepared)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ParamsError, match="no readable image"):
        run_pretrain(ssl_params(extra_images=str(empty)), prepared)


def test_extra_images_are_decoded_with_the_training_images_record(tmp_path):
    """A CT window and the 16-bit quantisation apply to the extra images as to the prepared ones."""
    from medtl.intake import demo
    from medtl.intake.readers import read
    from medtl.intake.readers.base import ReadOptions
    from medtl.prepare.imaging import model_input, read_record
    from medtl.train.ssl import read_image_folder

    folder = tmp_path / "extra"
    patient = demo.fake_patients(1, 0.5, 3)[0]
    files = demo.write_patient_images(patient, 2, (40, 60), 3, folder)
    windowed = preprocessing_record(24, read=read_record(ReadOptions(window=(300.0, 600.0))))
    arr, info = read_image_folder(folder, windowed, tmp_path / "extra.npy")
    assert info["images"] == 2 and arr.shape == (2, 1, 24, 24)
    expected = np.stack([model_input(read(f, windowed.read_options())[0].pixels, windowed) for f in sorted(files)])
    assert np.array_equal(np.asarray(arr), expected)
    # the file's own window gives other pixels: the record's window was applied
    plain = preprocessing_record(24)
    other, _ = read_image_folder(folder, plain, tmp_path / "plain.npy")
    assert not np.array_equal(np.asarray(other), np.asarray(arr))
