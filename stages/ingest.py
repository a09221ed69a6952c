"""ingest: decode the source named in params.yaml into data/ingested/."""
import sys
from pathlib import Path

# The medtl beside this script, whatever the environment installs: a queued or --temp experiment runs in a copy
# of the project, and dvc.lock records that copy's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medtl.ingest.ingest import IngestParams, run_ingest, steady_heap
from medtl.intake.sources.medmnist import fetch
from medtl.io import atomic_dir
from medtl.params import load_section
from medtl.provenance import stage_record
from medtl.provenance.record import project_path
from medtl.stage import main

OUT = Path("data/ingested")


def run() -> str:
    params = load_section("ingest", IngestParams)
    steady_heap()  # this process only ingests
    for one in params.each_source():
        if one.source == "medmnist":  # download first, so the record hashes the file that is read
            fetch(Path(one.medmnist.path), one.medmnist.url, one.medmnist.md5)
    # Source folders are not hashed file by file here: their file names may identify patients. The
    # manifest lists every decoded file by source_ref and sha256, and dvc.lock holds each folder's md5.
    files = [p for p in params.source_inputs() if Path(p).is_file()]
    folders = [p for p in params.source_inputs() if not Path(p).is_file()]
    with stage_record("ingest", params, inputs=files, outputs=[OUT]) as rec:
        with atomic_dir(OUT) as tmp:
            report = run_ingest(params, tmp)
        rec.seeds["split"] = params.seed
        rec.extra["source"] = report["source"]
        rec.extra["source_root"] = project_path(params.source_root()) if params.source_root() else None
        rec.extra["source_folders"] = {"paths": [project_path(f) for f in folders],
                                       "files_listed_by": "source_ref and sha256 in data/ingested/manifest.csv"}
        rec.extra["grouping"] = report["grouping"]
        rec.extra["pseudonym_key"] = report["pseudonym_key"]
    counts = ", ".join(f"{s} {c['images']} images / {c['groups']} groups" for s, c in report["counts"].items())
    conflicts = f", {len(report['label_conflicts'])} LABEL CONFLICT(S)" if report["label_conflicts"] else ""
    image_level = "; groups are images: patient independence not established" if report["grouping"]["kind"] == "image" else ""
    return f"{report['images']} images from {report['files_seen']} files ({counts}); " \
           f"{report['quarantined']} quarantined, {report['duplicates_removed']} duplicates removed{conflicts}" \
           f"{image_level} (details in {OUT / 'report.json'})"


if __name__ == "__main__":
    main("ingest", run)
