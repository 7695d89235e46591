"""Evaluation: scoring profiles with written metric definitions (docs/metrics.md), and
benchmark runs with a saved model (`omnivmed-eval`)."""

from .profiles import PROFILES, Profile, ScoringError, get_profile
from .scoring import score_files

__all__ = ["PROFILES", "Profile", "ScoringError", "get_profile", "score_files"]
