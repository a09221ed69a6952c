"""`medtl audit` and `medtl verify` on one real tiny `dvc repro` of the pipeline (demo source), then on copies of it."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtl.cli import main
from medtl.intake import demo
from medtl.provenance.bom import validate_bom
from tests.project import Project, copy_project

CHROMIUM = Path("/usr/bin/chromium")
RECORDS = ["data/ingested.provenance.json", "data/prepared.provenance.json", "models/backbone.pt.provenance.json",
           "models/model.pt.provenance.json", "reports/metrics.json.provenance.json"]


def in_dir(path: Path, *argv: str) -> int:
    cwd = Path.cwd()
    os.chdir(path)
    try:
        return main(list(argv))
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory) -> Project:
    """The pipeline run once, committed, and audited; tests only read it (or copy it)."""
    p = copy_project(tiny_run, tmp_path_factory.mktemp("audit-e2e") / "project")
    assert p.git("status", "--porcelain").stdout.strip() == ""
    assert in_dir(p.path, "audit") == 0
    return p


@pytest.fixture
def ws(run, tmp_path, monkeypatch) -> Path:
    """A copy of the audited run as the current folder; its DVC cache is hard-linked (cache files are never written)."""
    root = tmp_path / "ws"
    shutil.copytree(run.path, root, symlinks=True, ignore=lambda d, names: ["cache", "tmp"] if Path(d).name == ".dvc" else [])
    if (run.path / ".dvc/cache").is_dir():
        shutil.copytree(run.path / ".dvc/cache", root / ".dvc/cache", copy_function=os.link)
    monkeypatch.chdir(root)
    return root


def verify(capsys, *args: str, evidence: str = "reports/audit/provenance.json") -> tuple[int, list[str], str]:
    capsys.readouterr()
    rc = main(["verify", evidence, *args])
    out = capsys.readouterr().out
    return rc, [x for x in out.splitlines() if x.startswith("MISMATCH")], out


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_real_run_audits_clean_and_verifies(run, capsys, monkeypatch):
    root = run.path
    for rec in RECORDS:
        r = json.loads((root / rec).read_text())
        assert r["code"]["commit"] and r["environment"]["uv_lock_sha256"] and r["outputs"], rec
    stmt = json.loads((root / "reports/audit/provenance.json").read_text())
    assert stmt["_type"] == "https://in-toto.io/Statement/v1" and stmt["predicateType"] == "https://slsa.dev/provenance/v1"
    assert stmt["subject"][0]["digest"]["sha256"] == hashlib.sha256((root / "models/model.pt").read_bytes()).hexdigest()
    bd = stmt["predicate"]["buildDefinition"]
    assert bd["internalParameters"]["workspace"] == {"clean": True, "problems": [], "dvc_status": {}}
    assert bd["internalParameters"]["stages"] == ["ingest", "preprocess", "pretrain-adapt", "fine-tune", "evaluate"]
    names = {d["name"] for d in bd["resolvedDependencies"]}
    assert {"source-data", "code", "data/ingested", "data/prepared", "models/backbone.pt", "reports/metrics.json", "params.yaml", "uv.lock"} <= names
    source = next(d for d in bd["resolvedDependencies"] if d["name"] == "source-data")
    assert source["annotations"]["source_root"] is None and source["annotations"]["images"] > 0
    assert validate_bom(json.loads((root / "reports/audit/ml-bom.json").read_text())) == []
    md = (root / "reports/audit/report.md").read_text()
    assert "roc_auc" in md and "Research and engineering demonstration" in md and "WORKSPACE NOT CLEAN" not in md

    monkeypatch.chdir(root)
    rc, lines, out = verify(capsys)
    assert (rc, lines) == (0, []), out
    # the demo's files are generated and deleted at ingest: counted as absent, not failed
    assert "source files (generated at ingest and not kept" in out and "OK:" in out


def test_no_patient_identifiers_in_records_or_evidence(run):
    d = run.params["ingest"]["demo"]
    patients = demo.fake_patients(d["patients"], d["prevalence"], d["seed"])
    needles = [p.name for p in patients] + [p.patient_id for p in patients] + [p.name.split("^")[1] for p in patients]
    files = sorted((run.path / "reports/audit").iterdir()) + sorted(run.path.rglob("*.provenance.json"))
    files += [run.path / "data/ingested/manifest.csv", run.path / "data/ingested/report.json"]
    assert len(files) >= 4 + len(RECORDS) + 2
    for f in files:
        text = f.read_text(encoding="utf-8")
        leaked = [n for n in needles if n in text]
        assert not leaked, f"{leaked[:3]} in {f.relative_to(run.path)}"


@pytest.mark.parametrize("victim", ["data/prepared/train.npy", "models/model.pt", "params.yaml"])
def test_one_changed_byte_names_exactly_that_artifact(ws, capsys, victim):
    flip_byte(ws / victim)
    rc, lines, out = verify(capsys)
    assert rc == 1
    assert len(lines) == 1 and lines[0].startswith(f"MISMATCH {victim}: expected sha256 "), out


def test_changed_source_image_of_a_folder_source_is_named(ws, capsys):
    # a real folder of PNGs, one subfolder per class, ingested by the real stage
    rng = np.random.default_rng(0)
    for label in ("normal", "lesion"):
        for i in range(10):
            img = (rng.random((40, 40)) * (120 if label == "normal" else 250)).astype(np.uint8)
            (ws / "data/raw" / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(ws / "data/raw" / label / f"{label}{i:02d}.png")
    p = Project(ws)
    p.update_params({"ingest": {"source": "folder", "data": "data/raw", "folder": {"root": "data/raw", "layout": "classes"}}})
    p.dvc("repro", "ingest")
    p.commit("folder source")
    # later stages are stale (only ingest was rerun, to keep the test short): the evidence says so
    assert main(["audit"]) == 1
    assert main(["audit", "--allow-dirty"]) == 0
    rc, lines, out = verify(capsys)
    assert (rc, lines) == (0, []), out

    # the evidence never lists the source folder's file names
    evidence = "".join((ws / "reports/audit" / n).read_text() for n in ("provenance.json", "report.md", "report.html"))
    assert "lesion03" not in evidence and "normal07.png" not in evidence

    flip_byte(ws / "data/raw/lesion/lesion03.png")
    rc, lines, out = verify(capsys)
    assert rc == 1
    # named on the auditor's machine (by pseudonym in the evidence, by path where the data is)
    assert len(lines) == 1 and lines[0].startswith("MISMATCH source ") and "lesion/lesion03.png" in lines[0], out
    # without the folder in the project, verify finds the sources through --source-root
    shutil.move(ws / "data/raw", ws.parent / "elsewhere")
    rc, lines, out = verify(capsys, "--source-root", str(ws.parent / "elsewhere"))
    assert rc == 1
    assert len(lines) == 1 and lines[0].startswith("MISMATCH source ") and "lesion/lesion03.png" in lines[0], out


def test_signed_evidence_verifies_and_an_altered_signature_fails(ws, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTL_SIGNING_PASSPHRASE", "a passphrase for the test key")
    assert main(["keygen", "--out", str(tmp_path / "keys")]) == 0
    key, pub = tmp_path / "keys/medtl-signing.key", tmp_path / "keys/medtl-signing.pub"
    assert main(["audit", "--sign-key", str(key)]) == 0
    rc, lines, out = verify(capsys, "--pub-key", str(pub))
    assert (rc, lines) == (0, []) and "signature valid" in out, out

    env_path = ws / "reports/audit/provenance.dsse.json"
    envelope = json.loads(env_path.read_text())
    sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    sig[0] ^= 0x01
    envelope["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    env_path.write_text(json.dumps(envelope))
    rc, lines, out = verify(capsys, "--pub-key", str(pub))
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("MISMATCH signature: "), out


def test_dirty_tree_fails_the_audit_unless_allowed(ws, capsys):
    with open(ws / "stages/evaluate.py", "a", encoding="utf-8") as f:
        f.write("# an uncommitted edit\n")
    capsys.readouterr()
    assert main(["audit"]) == 1
    out = capsys.readouterr().out
    assert "git working tree is dirty: stages/evaluate.py" in out and "dvc status is not clean" in out
    for name in ("report.md", "report.html"):
        assert "WORKSPACE NOT CLEAN" in (ws / "reports/audit" / name).read_text()
    assert main(["audit", "--allow-dirty"]) == 0


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Chromium is not installed (apt-get install -y chromium)")
def test_report_opens_in_headless_chromium(run, tmp_path):
    report = run.path / "reports/audit/report.html"
    html = report.read_text()
    assert 'class="metrics"' in html and "roc_auc" in html and "95% CI" in html
    assert "ROC curve" in html and "<svg" in html and "<script" not in html
    if any((run.path / "reports/saliency").glob("*.png")):
        assert "data:image/png;base64," in html
    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    r = subprocess.run(base + [f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ERR_" not in r.stderr and "Uncaught" not in r.stderr, r.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1280, 2000)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "the screenshot is nearly blank"
    assert shot.stat().st_size > 20_000

    # the DOM the browser built holds the metrics table and the plots
    r = subprocess.run(base + ["--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert '<table class="metrics">' in dom and 'id="plots"' in dom and 'aria-label="ROC curve, AUC ' in dom


# Measures, in the browser, every element that could run off a printed page, and writes what it found into the DOM.
_MEASURE = """<script>
addEventListener('load', () => {
  const page = document.documentElement.clientWidth;
  const wide = [...document.querySelectorAll('table, svg, pre, figure, img, dl, .cards')]
    .filter(e => e.getBoundingClientRect().right > page + 1)
    .map(e => e.tagName + '.' + (e.getAttribute('class') || '') + ' ' + Math.round(e.getBoundingClientRect().right));
  const out = document.createElement('pre'); out.id = 'measured'; out.textContent = JSON.stringify(wide);
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Chromium is not installed (apt-get install -y chromium)")
def test_report_reads_in_order_for_a_clinician_and_prints_within_the_page(run, tmp_path):
    html = (run.path / "reports/audit/report.html").read_text()
    # plain-language summary first; the checklist (with CLAIM 2024) before the appendix of hashes and environment
    order = ['id="summary"', "of 100 cases <strong>with lesion</strong>", 'id="participant-flow"', 'id="demographics"',
             'id="preprocessing"', 'id="evaluation"', 'id="glossary"', 'id="checklist"', "CLAIM 2024 item 33",
             'id="appendix"', 'id="lineage"']
    positions = [html.find(x) for x in order]
    assert -1 not in positions and positions == sorted(positions), dict(zip(order, positions))
    summary = html[:html.index('id="use"')]
    assert "without lesion</strong> (normal), about <strong>" in summary and "95% CI" in summary
    # every metric in the table has a human name and a glossary line; raw keys only as a reference
    for name in ("Sensitivity", "Positive predictive value", "Cohen&#39;s kappa", "Brier score", "Expected calibration error"):
        assert html.count(f"<dt>{name}</dt>") == 1 and f"<td>{name}</td>" in html, name
    assert "Intensity window:" in html and "Normalisation:" in html and '"image_size"' not in html
    assert "files found in the source" in html and "quarantined (not used)" in html and "duplicates removed" in html
    assert 'aria-label="Test and external sets: estimate and 95% CI"' in html  # per-set estimates with CI bars

    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    # the print stylesheet applied on screen at the width of an A4 page's text (about 700 CSS px)
    page = tmp_path / "print.html"
    page.write_text(html.replace("@media print{", "@media all{").replace("</body>", _MEASURE + "</body>"))
    r = subprocess.run(base + ["--window-size=700,1000", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    measured = r.stdout[r.stdout.index('<pre id="measured">') + 19:]
    assert json.loads(measured[:measured.index("</pre>")].replace("&quot;", '"')) == []
    pdf = tmp_path / "report.pdf"
    r = subprocess.run(base + [f"--print-to-pdf={pdf}", "--no-pdf-header-footer", (run.path / "reports/audit/report.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and pdf.read_bytes().startswith(b"%PDF"), r.stderr[-2000:]
    assert pdf.stat().st_size > 50_000  # the pages with their charts and saliency images


def evidence_of(root: Path) -> dict:
    """What an audit asserts, without the time it was generated."""
    stmt = json.loads((root / "reports/audit/provenance.json").read_text())
    pred = stmt["predicate"]
    return {"subject": stmt["subject"], "deps": pred["buildDefinition"]["resolvedDependencies"],
            "params": pred["buildDefinition"]["externalParameters"],
            # the records; the audit's own files (report, ML-BOM) carry the time they were generated
            "byproducts": [b for b in pred["runDetails"]["byproducts"] if b["name"].endswith(".provenance.json")],
            "times": {k: v for k, v in pred["runDetails"]["metadata"].items() if k != "invocationId"}}


def test_stage_records_return_with_the_audited_commit_after_an_experiment(run, tmp_path, capsys, monkeypatch):
    """audit -> `dvc exp run` in the workspace -> back to the audited commit: verify passes, audit says the same."""
    p = copy_project(run, tmp_path / "exp")
    monkeypatch.chdir(p.path)
    for rec in RECORDS:
        hw = json.loads((p.path / rec).read_text())["hardware"]
        assert hw["device"] and hw["precision"], rec  # evaluate's too: the precision behind the audited metrics
    assert json.loads((p.path / RECORDS[-1]).read_text())["hardware"]["precision"] in ("fp32", "bf16", "fp16")
    before = evidence_of(p.path)
    records = [b["name"] for b in before["byproducts"] if b["name"].endswith(".provenance.json")]
    assert before["times"].get("startedOn") and sorted(records) == sorted(RECORDS)

    p.dvc("exp", "run", "-S", "finetune.epochs=1")  # reruns fine-tune and evaluate, rewriting their records
    assert (p.path / "models/model.pt.provenance.json").read_bytes() != (run.path / "models/model.pt.provenance.json").read_bytes()
    p.git("checkout", "--", ".")
    p.dvc("checkout", "-f")
    assert p.dvc("status", "--json").stdout.strip() in ("{}", "")
    rc, lines, out = verify(capsys)
    assert (rc, lines) == (0, []), out
    assert main(["audit"]) == 0
    after = evidence_of(p.path)
    differ = [a for a, b in zip(after["deps"], before["deps"]) if a != b]
    assert not differ and after == before, differ[:2]
