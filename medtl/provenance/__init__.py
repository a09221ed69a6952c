"""Provenance: stage records written by the pipeline, `medtl audit`, `medtl verify`, signing."""
from medtl.provenance.record import StageRecord, load_record, record_path_for, stage_record

__all__ = ["StageRecord", "load_record", "record_path_for", "stage_record"]
