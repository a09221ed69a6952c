"""fine-tune: models/backbone.pt + data/prepared/ -> models/model.pt, with DVCLive training curves."""
from pathlib import Path

from dvclive import Live

from medtl.finetune import FinetuneParams, run_finetune
from medtl.io import save_torch
from medtl.params import load_section
from medtl.provenance import stage_record
from medtl.stage import main

BACKBONE, PREPARED, OUT, LIVE = Path("models/backbone.pt"), Path("data/prepared"), Path("models/model.pt"), "dvclive"


def run() -> str:
    params = load_section("finetune", FinetuneParams)
    with stage_record("fine-tune", params, inputs=[BACKBONE, PREPARED], outputs=[OUT]) as rec:
        with Live(LIVE, save_dvc_exp=False, dvcyaml=False) as live:
            def log(epoch: int, row: dict) -> None:
                for name, value in row.items():
                    if name != "epoch":
                        live.log_metric(name, value)
                live.next_step()

            ckpt, summary = run_finetune(params, BACKBONE, PREPARED, log)
        save_torch(ckpt, OUT)
        rec.seeds["torch"] = params.seed
        rec.hardware = ckpt["hardware"]
        rec.extra["training"] = {k: summary[k] for k in ("best_epoch", "epochs_run", "best")}
    best = summary["best"]
    return f"{params.strategy} {ckpt['arch']} on {ckpt['hardware']['device']}/{ckpt['hardware']['precision']}: " \
           f"best epoch {summary['best_epoch'] + 1}/{summary['epochs_run']}, val AUC {best['val_auc']:.3f}, " \
           f"val accuracy {best['val_accuracy']:.3f}"


if __name__ == "__main__":
    main("fine-tune", run)
