"""README's commands, run in order on a fresh clone as a new user would, each as written."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.project import TINY_PARAMS, VENV_BIN, Project, deep_update

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[list[str]]:
    """The command lines of every ```bash block, in order (comments and blank lines dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    out = []
    for block in blocks:
        lines = []
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(shlex.join(words) if "&&" not in words else " ".join(shlex.quote(w) if w != "&&" else w for w in words))
        out.append(lines)
    return out


def make_recipe(target: str) -> list[str]:
    """The commands of a Makefile target (what `make TARGET` runs after its prerequisites)."""
    text = (ROOT / "Makefile").read_text()
    body = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    return [line.strip().lstrip("@") for line in body.splitlines()]


def fresh_clone(dest: Path) -> Project:
    """Every file git would carry (tracked, plus new ones not ignored), in a new repository with one commit."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, names):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    p = Project(dest)
    p.git("init", "-q")
    p.git("add", "-A")
    p.git("commit", "-qm", "clone")
    return p


@pytest.mark.e2e
def test_readme_commands_run_in_order_on_a_fresh_clone(tmp_path):
    p = fresh_clone(tmp_path / "clone")
    # Tiny params keep it fast (every stage really runs: a run restored from DVC's run cache writes no stage record).
    p.update_params(deep_update(TINY_PARAMS, {"evaluate": {"bootstrap": {"n_resamples": 100}}}))
    p.git("commit", "-qam", "tiny params for the test")
    p.dvc("config", "core.analytics", "false")

    recipe = make_recipe("repro")
    assert recipe[0] == "dvc repro" and any("next: medtl exps" in c and "dvc plots show" in c and "medtl audit" in c for c in recipe)
    ran = []
    for block in bash_blocks((ROOT / "README.md").read_text()):
        for line in block:
            if line.startswith(("make test", "pip install", "source ")):
                continue  # the environment is this test's own (CI runs `make test` itself)
            commands = recipe if line == "make repro" else [line]
            for cmd in commands:
                res = p.run("bash", "-c", cmd, check=False, timeout=900)
                assert res.returncode == 0, f"README command failed: {cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
                ran.append(cmd)
                if cmd.startswith("echo"):
                    assert res.stdout.startswith("next: medtl exps")
    # the whole tour: train, commit, compare experiments, plots, export, audit and verify
    for expected in ("dvc repro", "git add -A && git commit -m 'First run of the pipeline'", "dvc exp run --temp -S finetune.lr=0.0003",
                     "medtl exps", "dvc plots show", "medtl audit --out reports/audit", "medtl verify reports/audit/provenance.json"):
        assert expected in ran, (expected, ran)
    # the three experiments each changed one param of the commit: none inherited another's change
    exps = json.loads(p.run(str(VENV_BIN / "medtl"), "exps", "--json").stdout)["experiments"]
    changed = {}
    base = next(e for e in exps if e["experiment"] == "workspace")["params"]
    for e in exps:
        diff = {k for k, v in e["params"].items() if base.get(k) != v}
        if diff:
            changed[e["experiment"]] = diff
    assert sorted(map(sorted, changed.values())) == [["finetune.lr"], ["finetune.strategy"], ["pretrain.adapt"]], changed
