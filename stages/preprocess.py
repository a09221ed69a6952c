"""preprocess: data/ingested/ -> fixed-size arrays per split in data/prepared/."""
from pathlib import Path

from medtl.io import atomic_dir
from medtl.params import load_section
from medtl.preprocess import PreprocessParams, run_preprocess
from medtl.provenance import stage_record
from medtl.stage import main

IN, OUT = Path("data/ingested"), Path("data/prepared")


def run() -> str:
    params = load_section("preprocess", PreprocessParams)
    with stage_record("preprocess", params, inputs=[IN], outputs=[OUT]):
        with atomic_dir(OUT) as tmp:
            stats = run_preprocess(params, IN, tmp)
    return f"{sum(stats['counts'].values())} images at {params.size}x{params.size}x{params.channels}, " \
           f"train mean {stats['mean']} std {stats['std']}"


if __name__ == "__main__":
    main("preprocess", run)
