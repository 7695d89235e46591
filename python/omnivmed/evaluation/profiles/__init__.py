"""Scoring profiles: each file defines one `Profile` subclass registered by name
(`@PROFILES.register("strict")`); `PROFILES` imports every module here on first lookup, so
a new profile is one new file. A profile scores one (reference, prediction) pair at a time
and may add metrics over a whole group (macro averages); docs/metrics.md defines each one
with its version."""

from __future__ import annotations

from typing import Any, ClassVar

from ...registry import Registry


class ScoringError(ValueError):
    """A reference or prediction that the profile cannot score (names file, line, field)."""


class Profile:
    name: ClassVar[str]  # set by PROFILES.register
    version: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]  # every metric name it can report
    # Reference fields the profile needs on every record.
    required_fields: ClassVar[tuple[str, ...]] = ("answer",)

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.notes: list[str] = []  # said once in the report (e.g. a metric not computed)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def add_meteor(self, scores: dict[str, float], ref: list[str], pred: list[str]) -> None:
        """METEOR when WordNet is on disk; else no value, and a note that says why."""
        from .. import captions

        value = captions.meteor(ref, pred)
        if value is None:
            self.note("METEOR not computed: " + captions.wordnet()[1])
        else:
            scores["meteor"] = value

    def check_reference(self, ref: dict, where: str) -> None:
        for name in self.required_fields:
            if ref.get(name) in (None, ""):
                raise ScoringError(
                    f"{where}: field {name!r} is missing; profile {self.name!r} needs it"
                )

    def prepare(self, references: list[dict]) -> None:
        """Sees every reference once before scoring (e.g. to collect a label set)."""

    def score(self, ref: dict, prediction: str) -> tuple[dict[str, Any], dict[str, float]]:
        """(details for samples.jsonl, {metric: value in [0, 1]}) for one sample."""
        raise NotImplementedError

    def group_metrics(self, samples: list[dict]) -> dict[str, float]:
        """Metrics over a group that are not means of per-sample values."""
        return {}


PROFILES: Registry[type[Profile]] = Registry(
    "profile", package=__name__, attribute="name", error=ScoringError
)


def get_profile(name: str, **options: Any) -> Profile:
    return PROFILES.get(name)(**options)


def load_profiles() -> None:
    """Import every profile module (`PROFILES` also does this on its first lookup)."""
    PROFILES.discover()
