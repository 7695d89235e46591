"""`omnivmed-eval score`: join references and predictions by id, score every sample with a
profile, and write summary.json, samples.jsonl and report.md."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from .profiles import Profile, ScoringError, get_profile
from .text import normalize

logger = logging.getLogger(__name__)

# The reference fields results are grouped by. Which evaluation fields a record may carry,
# and what each holds, is data/records.py's to say.
GROUP_FIELDS = ("dataset", "modality", "answer_type", "question_type")


# Bounds on what one file may ask of the scorer (docs/metrics.md, "Input limits"): a
# line is read at most this far before it is refused, so one huge line costs neither the
# memory nor the time of reading it; and a text field over the limit would make the
# quadratic metrics (ROUGE-L's longest common subsequence) run for minutes.
MAX_LINE_BYTES = 1 << 20
MAX_TEXT_CHARS = 32_768
_TEXT_FIELDS = ("prediction", "answer")


def _lines(path: Path, what: str):
    """(line number, decoded line) of a JSONL file, each line read at most
    `MAX_LINE_BYTES` (+ its newline) far."""
    if path.is_dir():
        raise ScoringError(f"{what} file {path} is a folder; expected a JSONL file")
    if not path.exists():
        raise ScoringError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise ScoringError(f"{what} file {path} is not a regular file")
    with path.open("rb") as f:
        number = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES and not (
                len(raw) == MAX_LINE_BYTES + 1 and raw.endswith(b"\n")
            ):
                raise ScoringError(
                    f"{path}:{number}: line longer than {MAX_LINE_BYTES} bytes, the limit for "
                    "one record"
                )
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ScoringError(
                    f"{path}:{number}: not UTF-8 text (byte {exc.start + 1} of the line)"
                ) from None


def read_jsonl(path: Path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-empty line; errors name the file and line. An
    empty file, an over-long line or text field is an error."""
    path = Path(path)
    rows = []
    for number, line in _lines(path, what):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:  # also a number too long to convert
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc).split(";")[0]
            raise ScoringError(f"{path}:{number}: not valid JSON ({why})") from None
        except RecursionError:
            raise ScoringError(f"{path}:{number}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise ScoringError(f"{path}:{number}: expected a JSON object")
        if not isinstance(row.get("id"), (str, int)) or isinstance(row.get("id"), bool):
            raise ScoringError(f"{path}:{number}: field 'id' is missing or not a string")
        for name in _TEXT_FIELDS:
            value = row.get(name)
            if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
                raise ScoringError(
                    f"{path}:{number}: field {name!r} holds {len(value)} characters, over the "
                    f"limit of {MAX_TEXT_CHARS}"
                )
        rows.append((number, row))
    if not rows:
        raise ScoringError(f"{what} file {path} holds no records")
    return rows


# "C", "(C)", "C.", "C. liver", "C: liver": an answer written as an option's letter.
_LETTER_ANSWER = re.compile(r"^\s*\(?([A-Z])\)?(?:\s*[.:)](?:\s|$)|\s*$)")


def check_choices(ref: dict, where: str) -> None:
    """`choices` and `answer_choice` must agree with each other and with `answer`; a
    reference that contradicts itself could never be scored right under any profile."""
    choices, raw = ref.get("choices"), ref.get("answer_choice")
    if choices is not None and (
        not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices)
    ):
        raise ScoringError(f"{where}: field 'choices' must be a non-empty list of option texts")
    if raw in (None, ""):
        return
    letters = [chr(ord("A") + i) for i in range(len(choices) if choices else 26)]
    letter = str(raw).strip().strip("().").upper()
    if letter not in letters:
        raise ScoringError(
            f"{where}: field 'answer_choice' must be one of {letters[0]}-{letters[-1]}"
            f"{' (one per choice)' if choices else ''}, got {raw!r}"
        )
    answer = ref.get("answer")
    if not choices or not isinstance(answer, str):
        return
    led = _LETTER_ANSWER.match(answer)
    if led:
        named = {led.group(1)}
    else:
        text = normalize(answer)
        named = {letters[i] for i, c in enumerate(choices) if text and normalize(c) == text}
    if named and letter not in named:
        raise ScoringError(
            f"{where}: field 'answer_choice' is {letter!r}, but the answer {answer!r} is option "
            f"{'/'.join(sorted(named))}"
        )


def index_by_id(rows: list[tuple[int, dict]], path: Path) -> dict[str, tuple[int, dict]]:
    out: dict[str, tuple[int, dict]] = {}
    for number, row in rows:
        key = str(row["id"])
        if key in out:
            raise ScoringError(
                f"{path}:{number}: duplicate id {key!r} (first on line {out[key][0]})"
            )
        out[key] = (number, row)
    return out


def load_predictions(path: Path) -> dict[str, tuple[int, dict]]:
    rows = read_jsonl(path, "predictions")
    for number, row in rows:
        if not isinstance(row.get("prediction"), str):
            raise ScoringError(f"{path}:{number}: field 'prediction' is missing or not a string")
    return index_by_id(rows, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def aggregate(samples: list[dict], profile: Profile) -> dict[str, float]:
    """Means of every per-sample metric over the samples that have it, plus the profile's
    group metrics."""
    by_metric: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        for name, value in s["scores"].items():
            by_metric[name].append(value)
    out = {name: _mean(v) for name, v in sorted(by_metric.items())}
    out.update(profile.group_metrics(samples))
    return out


def _score_all(refs: dict, preds: dict, profile: Profile, metrics: list[str] | None):
    """(samples, overall, by-group) of one prediction set."""
    samples = []
    for key, (_, ref) in refs.items():
        prediction = preds[key][1]["prediction"] if key in preds else ""
        details, scores = profile.score(ref, prediction)
        if metrics is not None:
            scores = {k: v for k, v in scores.items() if k in metrics}
        samples.append({
            "id": key, **{f: ref.get(f) for f in GROUP_FIELDS}, "answer": ref["answer"],
            "prediction": prediction, "missing": key not in preds, **details, "scores": scores,
        })  # fmt: skip

    def summarise(group: list[dict]) -> dict[str, float]:
        values = aggregate(group, profile)
        return {k: v for k, v in values.items() if metrics is None or k in metrics}

    by: dict[str, dict[str, dict[str, float]]] = {}
    for field in GROUP_FIELDS:
        groups: dict[str, list[dict]] = defaultdict(list)
        for s in samples:
            if s.get(field) not in (None, ""):
                groups[str(s[field])].append(s)
        if groups:
            by[field] = {g: summarise(v) for g, v in sorted(groups.items())}
    return samples, summarise(samples), by


def score_files(
    references: Path,
    predictions: Path,
    profile_name: str,
    out_dir: Path,
    *,
    metrics: list[str] | None = None,
    baseline: Path | None = None,
    **options: Any,
) -> dict:
    """Score `predictions` against `references`; `metrics` keeps only those (names the
    profile knows), `baseline` scores a second prediction set (e.g. a --blank-visual run)
    and reports it beside the first."""
    profile = get_profile(profile_name, **options)
    if metrics is not None:
        unknown = [m for m in metrics if m not in profile.metrics]
        if unknown:
            raise ScoringError(
                f"unknown metric(s) {unknown} for profile {profile.name!r}; its metrics: "
                f"{list(profile.metrics)}"
            )
    references, predictions = Path(references), Path(predictions)
    out_dir = _output_folder(out_dir)
    refs = index_by_id(read_jsonl(references, "references"), references)
    preds = load_predictions(predictions)
    for number, ref in refs.values():
        check_choices(ref, f"{references}:{number}")
        profile.check_reference(ref, f"{references}:{number}")
    profile.prepare([ref for _, ref in refs.values()])
    missing = [k for k in refs if k not in preds]
    extra = [k for k in preds if k not in refs]
    if missing:
        logger.warning("%d reference ids have no prediction (scored as wrong): %s",
                       len(missing), missing[:10])  # fmt: skip
    if extra:
        logger.warning("%d predictions have no reference (ignored): %s", len(extra), extra[:10])
    samples, overall, by = _score_all(refs, preds, profile, metrics)
    summary = {
        "profile": profile.name,
        "metric_version": profile.version,
        "overall": overall,
        "by": by,
        "counts": {
            "references": len(refs),
            "predictions": len(preds),
            "scored": len(samples),
            "missing_predictions": len(missing),
            "extra_predictions": len(extra),
        },
        "notes": profile.notes,
        "provenance": {
            "references": str(references),
            "references_sha256": _sha256(references),
            "predictions": str(predictions),
            "predictions_sha256": _sha256(predictions),
            "omnivmed": _version(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "options": {k: str(v) for k, v in options.items()},
        },
    }
    if baseline is not None:
        base_preds = load_predictions(Path(baseline))
        _, base_overall, base_by = _score_all(refs, base_preds, profile, metrics)
        summary["baseline"] = {
            "predictions": str(baseline),
            "predictions_sha256": _sha256(Path(baseline)),
            "missing_predictions": sum(1 for k in refs if k not in base_preds),
            "overall": base_overall,
            "by": base_by,
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    with (out_dir / "samples.jsonl").open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    (out_dir / "report.md").write_text(report(summary))
    return summary


def _output_folder(path: Path) -> Path:
    """The output folder, checked before any work (never an existing file)."""
    from ..data.files import UnsafePathError, output_folder

    try:
        return output_folder(path, "--out")
    except UnsafePathError as exc:
        raise ScoringError(str(exc)) from None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("omnivmed")
    except Exception:  # not installed (running from the source tree)
        return "unknown"


def _table(title: str, groups: dict[str, dict[str, float]], metrics: list[str]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join([title.split()[-1], *metrics]) + " |",
             "|---" * (len(metrics) + 1) + "|"]  # fmt: skip
    for name, values in groups.items():
        cells = [f"{100 * values[m]:.1f}" if m in values else "-" for m in metrics]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines) + "\n"


def report(summary: dict) -> str:
    """Markdown tables (values in percent), one per grouping, datasets first as in
    OmniV-Med's Tables 1-3."""
    metrics = list(summary["overall"])
    parts = [
        f"# Evaluation: profile `{summary['profile']}` (version {summary['metric_version']})",
        "",
        f"Scored {summary['counts']['scored']} samples; {summary['counts']['missing_predictions']} "
        f"without a prediction (scored wrong), {summary['counts']['extra_predictions']} "
        "predictions without a reference (ignored). Values in percent.",
        "",
        _table("Overall all", {"all": summary["overall"]}, metrics),
    ]
    for field in GROUP_FIELDS:
        if field in summary["by"]:
            parts.append(_table(f"By {field}", summary["by"][field], metrics))
    if "baseline" in summary:
        base = summary["baseline"]["overall"]
        parts += [
            f"### Beside the baseline ({summary['baseline']['predictions']})",
            "",
            "| metric | run | baseline | run - baseline |",
            "|---|---|---|---|",
            *[
                f"| {m} | {100 * v:.1f} | {100 * base[m]:.1f} | {100 * (v - base[m]):+.1f} |"
                for m, v in summary["overall"].items()
                if m in base
            ],
            "",
        ]
    if summary["notes"]:
        parts += ["## Notes", "", *[f"- {n}" for n in summary["notes"]], ""]
    return "\n".join(parts)
