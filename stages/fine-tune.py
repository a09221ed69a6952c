"""fine-tune: models/backbone.pt + data/prepared/ -> models/model.pt, with DVCLive training curves.

Resumable: the state after each epoch goes to models/finetune.ckpt (not a DVC
output, so DVC leaves it in place); a rerun after a crash continues from it.
Distributed: run under `torchrun --nproc_per_node N`, or set finetune.nproc.
"""
import sys
from pathlib import Path

# The medtl beside this script, whatever the environment installs: a queued or --temp experiment runs in a copy
# of the project, and dvc.lock records that copy's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os

from dvclive import Live

from medtl.errors import MedtlError
from medtl.model.model_file import save_model
from medtl.params import load_section
from medtl.provenance import stage_record
from medtl.stage import main
from medtl.train import distributed
from medtl.train.finetune import FinetuneParams, run_finetune
from medtl.train.target import require_present

BACKBONE, PREPARED, OUT, LIVE = Path("models/backbone.pt"), Path("data/prepared"), Path("models/model.pt"), "dvclive"
RESUME = Path("models/finetune.ckpt")


def log_epoch(live: Live, epoch: int, row: dict) -> None:
    """One epoch's row; the step is the epoch number counted from 1, as every record counts epochs."""
    live.step = epoch + 1
    for name, value in row.items():
        if name != "epoch":
            live.log_metric(name, value)
    live.next_step()


def keep_best(live: Live, summary: dict) -> None:
    """dvclive/metrics.json (what `dvc exp show` lists) holds the kept epoch's row, not the last epoch's."""
    best = next(r for r in summary["history"] if r["epoch"] + 1 == summary["best_epoch"])
    live.summary = {**{k: v for k, v in best.items() if k != "epoch"}, "best_epoch": summary["best_epoch"],
                    "epochs_run": summary["epochs_run"], "step": summary["best_epoch"]}


def train(params: FinetuneParams, world: distributed.World, live: Live | None) -> tuple[dict, dict]:
    log = (lambda epoch, row: log_epoch(live, epoch, row)) if live else None
    ckpt, summary = run_finetune(params, BACKBONE, PREPARED, log, resume_path=RESUME, world=world)
    if live:
        keep_best(live, summary)
    return ckpt, summary


def run() -> str:
    params = load_section("finetune", FinetuneParams)
    if params.nproc > 1 and not distributed.under_torchrun():
        code = distributed.relaunch_with_torchrun(params.nproc, __file__)
        if code != 0:
            raise MedtlError(f"the {params.nproc} torchrun workers failed (exit code {code}); their messages are above")
        return f"trained by {params.nproc} processes under torchrun"
    world = distributed.world_from_env()
    if not world.is_main:
        sys.stdout = open(os.devnull, "w")  # one summary line, from rank 0
        try:
            train(params, world, None)
        finally:
            distributed.shutdown()
        return ""
    try:
        require_present(params.target, "finetune")
        target = [Path(p) for p in params.target.source_inputs()]  # hashed with the other inputs
        with stage_record("fine-tune", params, inputs=[BACKBONE, PREPARED, *target], outputs=[OUT]) as rec:
            # Curves restart with the run; rows of resumed epochs are replayed from the checkpoint.
            with Live(LIVE, save_dvc_exp=False, dvcyaml=False) as live:
                ckpt, summary = train(params, world, live)
            save_model(ckpt, OUT)
            RESUME.unlink(missing_ok=True)
            rec.seeds["torch"] = params.seed
            rec.hardware = ckpt["hardware"]
            rec.extra["training"] = {k: summary[k] for k in ("best_epoch", "epochs_run", "best", "resumed_from")}
            for k in ("target", "target_adaptation", "domain_adversarial"):  # the target images by count and pixel sha256 (medtl.train.target)
                if k in ckpt:
                    rec.extra[k] = {n: v for n, v in ckpt[k].items() if n != "pixel_digests"}
    finally:
        distributed.shutdown()
    best, hw = summary["best"], ckpt["hardware"]
    resumed = f", resumed at epoch {summary['resumed_from'] + 1}" if summary["resumed_from"] is not None else ""
    procs = f" x{hw['processes']}" if hw["processes"] > 1 else ""
    line = f"{params.strategy} {ckpt['arch']} on {hw['device']}/{hw['precision']}{procs}: " \
           f"best epoch {summary['best_epoch']}/{summary['epochs_run']}{resumed}, val AUC {best['val_auc']:.3f}, " \
           f"val accuracy {best['val_accuracy']:.3f}"
    return line + target_summary(ckpt)


def target_summary(ckpt: dict) -> str:
    """What was done with the target images, for the summary line."""
    if "target" not in ckpt:
        return ""
    done = [f"{ckpt['target']['images']} target images"]
    if "domain_adversarial" in ckpt:
        done.append(f"domain accuracy {ckpt['domain_adversarial']['domain_accuracy']:.3f} (DANN)")
    if "target_adaptation" in ckpt:
        done.append("batch-norm statistics re-estimated on them (adabn_target)")
    return "; " + ", ".join(done)


if __name__ == "__main__":
    main("fine-tune", run)
