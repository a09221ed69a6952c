"""ingest: decode the source named in params.yaml into data/ingested/."""
from pathlib import Path

from medtl.ingest import IngestParams, run_ingest
from medtl.io import atomic_dir
from medtl.params import load_section
from medtl.provenance import stage_record
from medtl.sources.medmnist import fetch
from medtl.stage import main

OUT = Path("data/ingested")


def run() -> str:
    params = load_section("ingest", IngestParams)
    if params.source == "medmnist":  # download first, so the record hashes the file that is read
        fetch(Path(params.medmnist.path), params.medmnist.url, params.medmnist.md5)
    with stage_record("ingest", params, inputs=params.source_inputs(), outputs=[OUT]) as rec:
        with atomic_dir(OUT) as tmp:
            report = run_ingest(params, tmp)
        rec.seeds["split"] = params.seed
        rec.extra["source"] = report["source"]
        rec.extra["source_root"] = params.source_root()
    counts = ", ".join(f"{s} {c['images']} images / {c['groups']} patients" for s, c in report["counts"].items())
    return f"{report['images']} images from {report['files_seen']} files ({counts}); " \
           f"{report['quarantined']} quarantined, {report['duplicates_removed']} duplicates removed " \
           f"(details in {OUT / 'report.json'})"


if __name__ == "__main__":
    main("ingest", run)
