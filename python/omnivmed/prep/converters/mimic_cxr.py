"""MIMIC-CXR (Johnson et al., 2019) for report generation: MIMIC-CXR-JPG's
`mimic-cxr-2.0.0-split.csv(.gz)` (dicom_id, study_id, subject_id, split: train /
validate / test) and `mimic-cxr-2.0.0-metadata.csv(.gz)` (dicom_id, ViewPosition), the
images `files/p<first two digits>/p<subject>/s<study>/<dicom_id>.jpg`, and the reports of
MIMIC-CXR `files/p../p<subject>/s<study>.txt` (mimic-cxr-reports.zip unpacked into the
same folder, or kept as `mimic-cxr-reports/files/...`).

One record per frontal image (ViewPosition PA or AP): the image, a fixed request for the
findings, and the report's FINDINGS section as the answer (open), with the IMPRESSION
beside it in `impression`. Images of other views and studies whose report has no findings
are left out by rule and counted. Splits are the official ones (by patient).

Sections are read the way MIMIC-CXR's own section parser reads them: a header is an
upper-case name at the start of a line followed by a colon; "FINDINGS AND IMPRESSION" and
"CONCLUSION" count as the impression, "FINDING" as the findings, and a header that only
names the views taken ("PA AND LATERAL VIEWS OF THE CHEST") as the findings where the
report has no FINDINGS header; an empty section does not count;
where a name repeats, the last section wins. Whitespace is collapsed, nothing else is
changed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import CONVERTERS, ConversionError, Converter, Problems, RefusedFileError

FRONTAL = ("PA", "AP")
SPLITS = ("train", "validate", "test")
PROMPT = "Describe the findings of this chest X-ray."
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&-]*[A-Z)])[ \t]*:", re.MULTILINE)
_IMPRESSION = ("impression", "conclusion", "findings and impression", "findings/impression")
_FINDINGS = ("finding", "findings", "findngs")


def section_name(header: str) -> tuple[str, bool]:
    """(normalised name, named explicitly): a header that only names the views taken
    counts as the findings where the report has no FINDINGS header of its own."""
    name = " ".join(header.lower().split())
    if name in _IMPRESSION or re.search(r"\bimpressions?\b", name):
        return "impression", True
    if name in _FINDINGS or re.search(r"\bfindings\b", name):
        return "findings", True
    if re.search(r"\bviews?\b", name) or name.startswith("portable "):
        return "findings", False
    return name, True


def report_sections(text: str) -> dict[str, str]:
    """{section name: text} of a free-text report; the last non-empty one of each name."""
    explicit: dict[str, str] = {}
    implied: dict[str, str] = {}
    headers = list(_HEADER.finditer(text))
    for n, match in enumerate(headers):
        end = headers[n + 1].start() if n + 1 < len(headers) else len(text)
        body = " ".join(text[match.end() : end].split())
        if body:
            name, named = section_name(match.group(1))
            (explicit if named else implied)[name] = body
    return {**implied, **explicit}


def _table(root: Path, stem: str) -> Path:
    """A MIMIC-CXR-JPG table, gzipped as released or unpacked."""
    path = next((p for p in (root / f"{stem}.csv.gz", root / f"{stem}.csv") if p.is_file()), None)
    if path is None:
        raise ConversionError(
            f"{root / (stem + '.csv.gz')} is missing: expected MIMIC-CXR-JPG's {stem} table"
        )
    return path


@CONVERTERS.register("mimic-cxr")
class MimicCxr(Converter):
    dataset = "MIMIC-CXR"

    def records(self, root: Path, problems: Problems) -> Iterator[dict[str, Any]]:
        split_file = _table(root, "mimic-cxr-2.0.0-split")
        meta_file = _table(root, "mimic-cxr-2.0.0-metadata")
        views = {r["dicom_id"]: r["ViewPosition"].strip()
                 for _, _, r in self.read_csv_rows(meta_file, ("dicom_id", "ViewPosition"))}  # fmt: skip
        report_roots = [root / "files", root / "mimic-cxr-reports" / "files"]
        self.require(root / "files", "the image folder files/p../p<subject>/s<study>/")
        sections_of: dict[tuple[str, str], dict[str, str] | None] = {}
        columns = ("dicom_id", "study_id", "subject_id", "split")
        for _, key, r in self.read_csv_rows(split_file, columns):
            dicom, study, subject, split = (r[c].strip() for c in columns)
            if split not in SPLITS or not study.isdigit() or not subject.isdigit() or not dicom:
                problems.add(
                    split_file, f"{key}: expected ids and a split in {SPLITS}, got {dict(r)}"
                )
                continue
            if dicom not in views:
                problems.add(
                    meta_file, f"dicom {dicom} ({split_file.name} {key}) has no metadata row"
                )
                continue
            if views[dicom] not in FRONTAL:
                problems.leave_out(f"view not frontal ({views[dicom] or 'unknown'})")
                continue
            folder = f"p{subject[:2]}/p{subject}"
            if (subject, study) not in sections_of:
                report = next((d / folder / f"s{study}.txt" for d in report_roots
                               if (d / folder / f"s{study}.txt").is_file()), None)  # fmt: skip
                if report is None:
                    problems.add(
                        split_file, f"{key}: the report files/{folder}/s{study}.txt is missing"
                    )
                    sections_of[(subject, study)] = None
                    continue
                try:
                    sections_of[(subject, study)] = report_sections(self.read_text(report))
                except RefusedFileError as exc:
                    problems.refuse(report, str(exc))
                    sections_of[(subject, study)] = None
                except ConversionError as exc:  # not UTF-8
                    problems.add(report, str(exc))
                    sections_of[(subject, study)] = None
                except OSError as exc:
                    problems.add(report, f"unreadable ({exc})")
                    sections_of[(subject, study)] = None
            sections = sections_of[(subject, study)]
            if sections is None:
                continue
            if "findings" not in sections:
                problems.leave_out("report has no findings section")
                continue
            image = f"files/{folder}/s{study}/{dicom}.jpg"
            if not self.image_ok(root, image, problems, split_file, key):
                continue
            yield self.record(
                f"mimic-cxr-{dicom}", image, PROMPT, sections["findings"], dataset=self.dataset,
                split=split, modality="X-ray", answer_type="open", question_type="findings",
                language="en", source_id=dicom, study_id=study, subject_id=subject,
                view=views[dicom], impression=sections.get("impression"),
            )  # fmt: skip
