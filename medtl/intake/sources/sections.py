"""The source kinds' params sections, declared once: ingest's single source, each site of ingest.sources,
each set of evaluate.external and finetune.target inherit them, and a source module reads only its own."""
from __future__ import annotations

from dataclasses import dataclass, field

from medtl.intake.sources.csv import CsvParams
from medtl.intake.sources.demo import DemoParams
from medtl.intake.sources.dicom import DicomParams
from medtl.intake.sources.folder import FolderParams
from medtl.intake.sources.medmnist import MedmnistParams


@dataclass(frozen=True, kw_only=True)
class SourceSections:
    """One section per kind in medtl.intake.sources.SOURCES; the chosen kind's is read, the others keep their defaults."""

    demo: DemoParams = field(default_factory=DemoParams)
    folder: FolderParams = field(default_factory=FolderParams)
    csv: CsvParams = field(default_factory=CsvParams)
    dicom: DicomParams = field(default_factory=DicomParams)
    medmnist: MedmnistParams = field(default_factory=MedmnistParams)


@dataclass(frozen=True, kw_only=True)
class SourceRequest(SourceSections):
    """What a source module's `open_source` reads of its params besides its section: the kind, and the classes
    that name index labels (MedMNIST), here the model's (external sets, target images)."""

    source: str
    classes: list[str]

    @classmethod
    def of(cls, spec: SourceSections, classes: list[str]) -> SourceRequest:
        return cls(source=spec.source, classes=list(classes), **sections_of(spec))


def sections_of(params: SourceSections) -> dict:
    """The source sections of `params`, as keywords for another params object."""
    return {name: getattr(params, name) for name in SourceSections.__dataclass_fields__}
