"""A deterministic synthetic dataset written as real DICOM files.

Each fake patient has several CT-like images; a patient with the disease
shows a faint round lesion in each image, with contrast that varies from
obvious to invisible, among elongated vessel-like distractors that both
classes share. The headers carry fake names, ids and birth dates (so tests
can prove none of it leaks), 12-bit stored values with RescaleSlope and
RescaleIntercept, a window, and some images are MONOCHROME1.

A `Scanner` makes the images of one site differ from another's the way
scanners do: the intensity transfer curve, noise, resolution and blur, the
share of MONOCHROME1 files, and collimation borders. `PRESETS` are a few such
sites with different prevalence too; the default (no scanner) is the original
demo, unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

CLASSES = ("normal", "lesion")
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's documented example root


@dataclass(frozen=True)
class FakePatient:
    index: int
    name: str
    patient_id: str
    birth_date: str
    sex: str
    diseased: bool


def fake_patients(n: int, prevalence: float, seed: int) -> list[FakePatient]:
    rng = np.random.default_rng(seed)
    n_pos = int(round(n * prevalence))
    diseased = np.zeros(n, dtype=bool)
    diseased[rng.permutation(n)[:n_pos]] = True
    out = []
    for i in range(n):
        year = 1940 + int(rng.integers(0, 60))
        out.append(
            FakePatient(
                index=i,
                name=f"Fakename^Patient{i:04d}^Demo",
                patient_id=f"FAKEMRN{seed:03d}{i:05d}",
                birth_date=f"{year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
                sex="F" if rng.random() < 0.5 else "M",
                diseased=bool(diseased[i]),
            )
        )
    return out


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    coarse = rng.standard_normal((h // scale + 2, w // scale + 2))
    ys = np.linspace(0, coarse.shape[0] - 1.001, h)
    xs = np.linspace(0, coarse.shape[1] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    c = coarse
    return (
        c[y0][:, x0] * (1 - fy) * (1 - fx)
        + c[y0 + 1][:, x0] * fy * (1 - fx)
        + c[y0][:, x0 + 1] * (1 - fy) * fx
        + c[y0 + 1][:, x0 + 1] * fy * fx
    )


@dataclass(frozen=True)
class Scanner:
    """How one site's scanner renders the same anatomy (the demo's default: `Scanner()`)."""

    gamma: float = 1.0  # intensity transfer curve: displayed = intensity ** gamma
    noise: float = 0.045  # standard deviation of the pixel noise
    resolution: float = 1.0  # acquired at this fraction of the matrix size, then resampled up (loses detail)
    blur: float = 0.0  # Gaussian blur sigma, as a fraction of the image side
    monochrome1: float = 0.25  # share of MONOCHROME1 files
    collimation: float = 0.0  # largest dark border (collimator) on each side, as a fraction of the side


# Sites that differ as scanners do, with different prevalence: (name, prevalence, scanner).
PRESETS = (
    ("a", 0.4, Scanner()),
    ("b", 0.25, Scanner(gamma=1.8, noise=0.09, resolution=0.5, blur=0.01, monochrome1=0.7, collimation=0.12)),
    ("c", 0.55, Scanner(gamma=0.6, noise=0.03, resolution=0.75, blur=0.0, monochrome1=0.0, collimation=0.05)),
    ("d", 0.3, Scanner(gamma=1.3, noise=0.06, resolution=0.35, blur=0.02, monochrome1=1.0, collimation=0.2)),
)


def render(rng: np.random.Generator, img: np.ndarray, scanner: Scanner) -> np.ndarray:
    """One site's rendering of an image in [0, 1]: transfer curve, resolution, blur and collimation."""
    h, w = img.shape
    out = np.power(np.clip(img, 0, 1), scanner.gamma, dtype=np.float32)
    if scanner.resolution < 1:
        small = (max(8, int(round(w * scanner.resolution))), max(8, int(round(h * scanner.resolution))))
        out = cv2.resize(cv2.resize(out, small, interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_LINEAR)
    if scanner.blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), scanner.blur * min(h, w))
    if scanner.collimation > 0:  # a dark band of random width on each side
        top, bottom = (int(h * rng.uniform(0, scanner.collimation)) for _ in range(2))
        left, right = (int(w * rng.uniform(0, scanner.collimation)) for _ in range(2))
        out[:top], out[h - bottom:], out[:, :left], out[:, w - right:] = 0, 0, 0, 0
    return np.clip(out, 0, 1)


def synth_image(rng: np.random.Generator, h: int, w: int, lesion: bool, patient_tone: float,
                noise: float = 0.045) -> np.ndarray:
    """An image in [0, 1]: a body ellipse with texture, vessels, and maybe a lesion."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h / 2 + rng.normal(0, h * 0.03), w / 2 + rng.normal(0, w * 0.03)
    ry, rx = h * rng.uniform(0.36, 0.46), w * rng.uniform(0.36, 0.46)
    body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    img = np.where(body, 0.35 + patient_tone, 0.05).astype(np.float32)
    img += 0.06 * _smooth_noise(rng, h, w, 8).astype(np.float32) * body
    s = min(h, w)
    vessels = np.zeros((h, w), dtype=np.float32)
    for _ in range(int(rng.integers(2, 5))):  # vessels: thin bright lines in both classes
        p0 = (cx + rx * 0.8 * rng.uniform(-1, 1), cy + ry * 0.8 * rng.uniform(-1, 1))
        p1 = (cx + rx * 0.8 * rng.uniform(-1, 1), cy + ry * 0.8 * rng.uniform(-1, 1))
        thickness = max(1, int(round(s * rng.uniform(0.01, 0.03))))
        cv2.line(vessels, tuple(int(round(v)) for v in p0), tuple(int(round(v)) for v in p1), 0.2, thickness)
    img += cv2.GaussianBlur(vessels, (0, 0), 1.0) * body
    if lesion:  # a round blob whose contrast ranges from faint to clear
        ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.6)
        ly, lx = cy + np.sin(ang) * rad * ry, cx + np.cos(ang) * rad * rx
        r = s * rng.uniform(0.05, 0.09)
        img += rng.uniform(0.05, 0.4) * np.exp(-(((yy - ly) ** 2 + (xx - lx) ** 2) / (2 * r**2)))
    img += rng.normal(0, noise, (h, w)).astype(np.float32)
    return np.clip(img, 0, 1)


def _dataset(p: FakePatient, k: int, seed: int) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(_UID_ROOT, [str(seed), p.patient_id, str(k), "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(_UID_ROOT, [str(seed), p.patient_id, "study"])
    ds.SeriesInstanceUID = generate_uid(_UID_ROOT, [str(seed), p.patient_id, "series"])
    ds.PatientName = p.name
    ds.PatientID = p.patient_id
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = p.sex
    ds.Modality = "CT"
    ds.Manufacturer = "medtl demo"
    ds.BodyPartExamined = "CHEST"
    ds.StudyDate = "20240101"
    ds.InstanceNumber = k + 1
    return ds


def write_patient_images(p: FakePatient, n_images: int, size_range: tuple[int, int], seed: int, out_dir: Path,
                         scanner: Scanner | None = None) -> list[Path]:
    """Write one patient's images as DICOM files under out_dir; file names carry no identifiers.

    `scanner` renders them as one site's scanner would; None is the original demo.
    """
    rng = np.random.default_rng([seed, p.index])
    site = scanner or Scanner()
    tone = rng.normal(0, 0.05)
    paths = []
    for k in range(n_images):
        h, w = (int(rng.integers(size_range[0], size_range[1] + 1)) for _ in range(2))
        img = synth_image(rng, h, w, p.diseased, tone, site.noise)
        if scanner is not None:
            img = render(rng, img, scanner)
        slope = float(rng.choice([0.5, 1.0, 2.0]))
        intercept = -1024.0
        centre, width = 300.0 + rng.normal(0, 20), 1400.0 + rng.normal(0, 60)
        hu = (img * width) + (centre - width / 2)  # displayed [0,1] <- window
        mono1 = rng.random() < site.monochrome1
        if mono1:  # mirror inside the window so that display after inversion is unchanged
            hu = 2 * centre - hu
        stored = np.clip(np.round((hu - intercept) / slope), 0, 4095).astype(np.uint16)
        ds = _dataset(p, k, seed)
        ds.Rows, ds.Columns = h, w
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.WindowCenter, ds.WindowWidth = f"{centre:.1f}", f"{width:.1f}"
        ds.PixelData = stored.tobytes()
        path = out_dir / f"case{p.index:04d}" / f"image{k}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
