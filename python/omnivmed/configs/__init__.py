"""Stage configurations shipped with the package."""

from pathlib import Path

CONFIG_DIR = Path(__file__).parent


def packaged_config(name: str) -> Path:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no packaged config {name!r}; known: {', '.join(known)}")
    return path
