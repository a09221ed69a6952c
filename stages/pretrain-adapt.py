"""pretrain-adapt: a pretrained backbone adapted to the target images -> models/backbone.pt."""
from pathlib import Path

from medtl.adaptation import PretrainParams, run_pretrain
from medtl.backbones import backbone_state
from medtl.io import save_torch
from medtl.params import load_section
from medtl.provenance import stage_record
from medtl.stage import main

IN, OUT = Path("data/prepared"), Path("models/backbone.pt")


def run() -> str:
    params = load_section("pretrain", PretrainParams)
    inputs = [IN] + ([params.weights] if params.weights not in ("none", "imagenet") else [])
    with stage_record("pretrain-adapt", params, inputs=inputs, outputs=[OUT]) as rec:
        backbone, record = run_pretrain(params, IN)
        save_torch({**backbone_state(backbone), "adaptation": record}, OUT)
        rec.seeds["torch"] = params.seed
        rec.hardware = record["hardware"]
        rec.extra["adaptation"] = record
        rec.extra["weights"] = backbone.weights_info
    return f"{params.arch} ({backbone.num_features} features), weights {params.weights}, adaptation {params.adapt}"


if __name__ == "__main__":
    main("pretrain-adapt", run)
