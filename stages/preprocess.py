"""preprocess: data/ingested/ -> fixed-size arrays per split and their preprocessing record in data/prepared/."""
import sys
from pathlib import Path

# The medtl beside this script, whatever the environment installs: a queued or --temp experiment runs in a copy
# of the project, and dvc.lock records that copy's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medtl.io import atomic_dir
from medtl.params import load_section, read_params_file
from medtl.prepare.imaging import read_options
from medtl.prepare.preprocess import PreprocessParams, run_preprocess
from medtl.provenance import stage_record
from medtl.stage import main

IN, OUT = Path("data/ingested"), Path("data/prepared")


def run() -> str:
    params = load_section("preprocess", PreprocessParams)
    # How ingest decoded the files; recorded so that `medtl predict` decodes new files the same way.
    read = read_options((read_params_file().get("ingest") or {}).get("read"), "ingest.read")
    with stage_record("preprocess", params, inputs=[IN], outputs=[OUT]):
        with atomic_dir(OUT) as tmp:
            stats = run_preprocess(params, read, IN, tmp)
    pre = stats["preprocessing"]
    return f"{sum(stats['counts'].values())} images at {params.image_size}x{params.image_size}x{params.channels}, " \
           f"train mean {pre['mean']} std {pre['std']}"


if __name__ == "__main__":
    main("preprocess", run)
