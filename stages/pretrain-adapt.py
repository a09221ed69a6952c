"""pretrain-adapt: a pretrained backbone adapted to the target images -> models/backbone.pt."""
import sys
from pathlib import Path

# The medtl beside this script, whatever the environment installs: a queued or --temp experiment runs in a copy
# of the project, and dvc.lock records that copy's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dvclive import Live

from medtl.io import write_text
from medtl.model.backbone_file import save_backbone_file
from medtl.model.backbones import backbone_state
from medtl.params import load_section
from medtl.provenance import stage_record
from medtl.provenance.hashing import PLACEHOLDER, describe
from medtl.stage import main
from medtl.train.adaptation import PretrainParams, run_pretrain

PREPARED, OUT, LIVE = Path("data/prepared"), Path("models/backbone.pt"), "dvclive_pretrain"
# Adaptation reads only these; labels, val and test stay unopened.
READS = [PREPARED / "train.npy", PREPARED / "stats.json"]


def run() -> str:
    params = load_section("pretrain", PretrainParams)
    inputs = list(READS)
    if params.weights not in ("none", "imagenet"):
        inputs.append(Path(params.weights))
    with stage_record("pretrain-adapt", params, inputs=inputs, outputs=[OUT]) as rec:
        # DVC owns the experiment; DVCLive only writes the loss files dvc.yaml declares.
        with Live(LIVE, save_dvc_exp=False, dvcyaml=False) as live:
            def on_epoch(epoch: int, loss: float) -> None:
                live.log_metric("ssl_loss", loss)
                live.next_step()

            backbone, record = run_pretrain(params, PREPARED, on_epoch)
            live.summary["adapt_images"] = record.get("images", 0)
        if params.adapt != "ssl":
            # The declared plot folder exists for every method (git keeps it through a placeholder that
            # .dvcignore hides), but holds no loss file: `dvc plots show` draws no empty chart.
            write_text(Path(LIVE) / "plots" / "metrics" / PLACEHOLDER, "")
        # A previous medtl model as the source: its head goes along, for fine-tune to reuse when the classes match.
        save_backbone_file(OUT, backbone_state(backbone), record, getattr(backbone, "source_head", None))
        rec.seeds["torch"] = params.seed
        if params.adapt == "ssl":
            rec.seeds["ssl"] = params.ssl.seed
            if params.ssl.extra_images:
                # Hashed as a whole: file names in a hospital folder may identify patients.
                folder = describe(params.ssl.extra_images)
                folder.pop("files")
                rec.extra["ssl_extra_images"] = folder
        rec.hardware = record["hardware"]
        rec.extra["adaptation"] = record
        rec.extra["weights"] = backbone.weights_info
    done = f", ssl loss {record['loss'][0]:.3f} -> {record['loss'][-1]:.3f}" if params.adapt == "ssl" else ""
    return (f"{params.arch} ({backbone.num_features} features), weights {params.weights}, "
            f"adaptation {params.adapt} on {record.get('images', 0)} images{done}")


if __name__ == "__main__":
    main("pretrain-adapt", run)
