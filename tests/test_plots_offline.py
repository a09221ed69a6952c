"""`dvc plots show` draws every chart with the network off: Vega is inlined in the page template that .dvc/config names."""
from __future__ import annotations

import configparser
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from tests.project import copy_project

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
VENDOR = ROOT / "plots" / "vendor"


def _vendor_module():
    spec = importlib.util.spec_from_file_location("plots_vendor", ROOT / "plots" / "vendor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_template_is_built_from_the_vendored_files_under_their_licences():
    manifest = json.loads((VENDOR / "vendor.json").read_text())
    assert {e["package"] for e in manifest.values()} == {"vega", "vega-lite", "vega-embed"}
    for name, entry in manifest.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == entry["sha256"], name
        assert entry["licence"] == "BSD-3-Clause"
        assert "Redistribution and use in source and binary forms" in (VENDOR / f"LICENSE-{entry['package']}.txt").read_text()
    # The committed page is exactly what plots/vendor.py makes of these files: nothing edited by hand or stale.
    template = (ROOT / "plots" / "index.html").read_text(encoding="utf-8")
    assert template == _vendor_module().render()
    assert "{plot_divs}" in template and "{scripts}" not in template  # no CDN tags from DVC
    assert not re.search(r"<script[^>]+src=", template)


def test_dvc_config_names_the_template_and_dvc_plots_is_ignored():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    # DVC resolves a relative html_template against the .dvc folder.
    assert (ROOT / ".dvc" / config["plots"]["html_template"]).resolve() == (ROOT / "plots" / "index.html")
    assert "/dvc_plots" in (ROOT / ".gitignore").read_text().splitlines()


class _ChartMarks(HTMLParser):
    """Counts, per chart container, the shapes drawn inside Vega's data-mark groups (`g.role-mark`)."""

    SHAPES = {"path", "rect", "circle", "line", "text", "image"}
    VOID = {"meta", "link", "br", "img", "input", "hr", "col", "area", "base", "embed", "source", "track", "wbr", "param"}

    def __init__(self, ids: set[str]):
        super().__init__()
        self.ids, self.stack, self.counts = ids, [], {i: 0 for i in ids}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        chart = next((c for _, c, _ in reversed(self.stack) if c), None)
        if tag in self.SHAPES and chart and any(mark for _, _, mark in self.stack):
            self.counts[chart] += 1
        if tag not in self.VOID:
            own = a.get("id") if tag == "div" and a.get("id") in self.ids else None
            self.stack.append((tag, own, tag == "g" and "role-mark" in (a.get("class") or "").split()))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID and self.stack and self.stack[-1][0] == tag:
            self.stack.pop()

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break


@pytest.mark.e2e
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Chromium is not installed (.ci/run installs it: apt-get install -y chromium)")
def test_every_chart_draws_offline_in_headless_chromium(tiny_run, tmp_path):
    p = copy_project(tiny_run, tmp_path / "project")
    shutil.copytree(ROOT / "plots", p.path / "plots", dirs_exist_ok=True)
    shutil.copyfile(ROOT / ".dvc" / "config", p.path / ".dvc" / "config")
    p.dvc("plots", "show")
    page = (p.path / "dvc_plots" / "index.html").read_text(encoding="utf-8")
    assert "cdn.jsdelivr" not in page and not re.search(r"<script[^>]+src=", page)
    assert not [line for line in p.git("status", "--porcelain").stdout.splitlines() if "dvc_plots" in line]

    charts = dict(re.findall(r'<div id = "([^"]+)">\s*<script type = "text/javascript">\s*var spec = (\{\}|.)', page))
    with_data = {c for c, start in charts.items() if start != "{}"}
    # Every chart of dvc.yaml's `plots:` has data in the tiny run (a stage-level plot with no rows may not).
    titles = [next(iter(entry)) for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]]
    expected = {re.sub(r"[^A-Za-z0-9-]", "_", t) for t in titles}
    assert expected <= with_data, expected - with_data
    # No chart twice, none titled by a file path, none empty: the tiny run does not adapt by SSL, so no SSL loss chart.
    assert p.params["pretrain"]["adapt"] != "ssl"
    assert set(charts) == expected, set(charts) - expected

    # Offline: a proxy that does not exist, and none of Chromium's own background traffic.
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=30000", "--dump-dom", (p.path / "dvc_plots" / "index.html").as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    marks = _ChartMarks(set(charts))
    marks.feed(res.stdout)
    blank = {c: n for c, n in marks.counts.items() if c in with_data and n == 0}
    assert not blank, f"charts that drew nothing offline: {blank}"
    # Shape counts that only real data gives: a confusion matrix has a cell and a number per (true, predicted) pair.
    for title in titles:
        if "Confusion" in title:
            assert marks.counts[re.sub(r"[^A-Za-z0-9-]", "_", title)] >= 8
    dom = res.stdout
    metrics = json.loads((p.path / "reports/metrics.json").read_text())
    # The AUC in the title is the one evaluate computed; PR names its chance level; axes are titled in words.
    assert f"ROC curve (test), AUC {metrics['roc_auc']:.3f}" in dom and "chance (AUC 0.5)" in dom
    assert f"Precision-recall curve (test), AUC {metrics['pr_auc']:.3f}, prevalence" in dom
    assert "true class" in dom and "predicted class" in dom and "estimate and 95% confidence interval" in dom
    assert ">y<" not in dom and ">step<" not in dom
