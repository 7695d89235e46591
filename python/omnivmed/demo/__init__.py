"""The built-in demo: a small instruction dataset made from real scans that ship inside
installed packages, plus generated endoscopy-style videos."""

from .dataset import DEMO_MEDIA_SETTINGS, build_demo_dataset

__all__ = ["DEMO_MEDIA_SETTINGS", "build_demo_dataset"]
