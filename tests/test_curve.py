"""The label-efficiency curve: nested training subsets, and `medtl curve run/report` through DVC experiments."""
import json
import sys
import pytest

from medtl.errors import MedtlError
from medtl.experiments.curve import parse_sizes
from medtl.prepare.subsets import patient_order, subset_rows
from tests.project import copy_project


def _training_split(n_patients=40, seed=0):
    """Patients with 1-4 images; one in four is a lesion patient."""
    import numpy as np

    rng = np.random.default_rng(seed)
    groups, labels = [], []
    for i in range(n_patients):
        for _ in range(int(rng.integers(1, 5))):
            groups.append(f"p{i:02d}")
            labels.append("lesion" if i % 4 == 0 else "normal")
    return groups, labels


def test_subsets_are_nested_patient_grouped_and_class_stratified():
    groups, labels = _training_split()
    for seed in range(3):
        previous: set[int] = set()
        for n in (10, 20, 40, len(groups)):
            rows = set(subset_rows(groups, labels, n, seed).tolist())
            assert len(rows) == n and previous <= rows  # the 20 contain the 10
            previous = rows
            patients = {groups[i] for i in rows}
            whole = [g for g in patients if sum(groups[i] == g for i in rows) < groups.count(g)]
            assert len(whole) <= 1, "at most the last patient added gives only some of its images"
            # Stratified by patient: a quarter of the patients are lesion patients, give or take one.
            lesion = sum(1 for g in patients if int(g[1:]) % 4 == 0)
            assert abs(lesion - len(patients) / 4) <= 1, (n, lesion, len(patients))
    assert patient_order(groups, labels, 0) != patient_order(groups, labels, 1)
    with pytest.raises(MedtlError, match=f"train_subset.images is 999 .* {len(groups)} images"):
        subset_rows(groups, labels, 999, 0)


def test_sizes_are_parsed_and_checked():
    assert parse_sizes("50, 25,all,50") == [25, 50, 0]
    with pytest.raises(MedtlError, match="--sizes .*'-3'"):
        parse_sizes("25,-3")


MEDTL = (sys.executable, "-m", "medtl.cli")


@pytest.mark.e2e
def test_curve_run_and_report_on_tiny_settings(tiny_run, tmp_path):
    p = copy_project(tiny_run, tmp_path / "project")
    train = sum(1 for _ in (p.path / "data/prepared/train.csv").open()) - 1
    too_big = p.run(*MEDTL, "curve", "run", "--sizes", f"10,{train + 1}", check=False)
    assert too_big.returncode == 2 and f"--sizes: {train + 1} exceed" in too_big.stderr, too_big.stderr
    assert "curve-" not in p.dvc("exp", "list", "--name-only").stdout  # nothing queued

    p.update_params({"finetune": {"epochs": 1}, "evaluate": {"bootstrap": {"n_resamples": 50},
                                                            "saliency": {"enabled": False}}})
    p.commit("curve settings")
    p.run(*MEDTL, "curve", "run", "--sizes", "12", "--repeats", "1", "--compare", "finetune.lr=0.003")
    res = p.run(*MEDTL, "curve", "report")
    print(res.stdout)
    summary = json.loads((p.path / "reports/curve/summary.json").read_text())
    assert set(summary["arms"]) == {"base", "compare"}
    assert summary["arms"]["compare"]["params"] == {"finetune.lr": 0.003}
    for arm in ("base", "compare"):
        (point,) = summary["arms"][arm]["points"]
        assert point["images"] == 12 and 1 <= point["patients"] <= 12
        assert point["roc_auc_ci_low"] <= point["roc_auc"] <= point["roc_auc_ci_high"]
        rows = json.loads((p.path / f"reports/curve/{arm}.json").read_text())
        assert rows[0]["images"] == 12
    shown = p.dvc("plots", "show", "reports/curve/base.json", "reports/curve/compare.json", "-x", "images",
                  "-y", "roc_auc", "-o", "curve-plots")
    assert (p.path / "curve-plots/index.html").is_file(), shown.stdout
    assert "<svg" in (p.path / "reports/curve/chart.html").read_text()


def test_the_audit_transfer_block_carries_the_curve(tmp_path):
    from medtl.provenance.transfer import html_context, markdown, transfer_evidence

    point = lambda n, auc: {"size": n, "images": n, "patients": n // 2, "repeats": 2, "roc_auc": auc,  # noqa: E731
                            "roc_auc_sd": 0.01, "roc_auc_ci_low": auc - 0.1, "roc_auc_ci_high": auc + 0.05, "runs": []}
    summary = {"name": "curve", "metric": "roc_auc", "arms": {
        "base": {"params": {}, "points": [point(25, 0.7), point(50, 0.8)]},
        "compare": {"params": {"pretrain.weights": "none"}, "points": [point(25, 0.6), point(50, 0.75)]}}}
    (tmp_path / "reports/curve").mkdir(parents=True)
    (tmp_path / "reports/curve/summary.json").write_text(json.dumps(summary))
    ev = {"transfer": transfer_evidence(tmp_path, None)}
    assert "runs" not in ev["transfer"]["curve"]["arms"]["base"]["points"][0]  # the summary, not every run
    md = "\n".join(markdown(ev))
    assert "Label-efficiency curve" in md and '| compare {"pretrain.weights": "none"} | 50 | 50 | 25 | 2 | 0.750 |' in md
    ctx = html_context(ev)
    assert len(ctx["charts"]) == 2 and len(ctx["curve_rows"]) == 4
    assert transfer_evidence(tmp_path / "elsewhere", {"name": "none"}) is None
