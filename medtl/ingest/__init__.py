"""The ingest stage: every source item decoded once into data/ingested/ (manifest, pixel store, report)."""
