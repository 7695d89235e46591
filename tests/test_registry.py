"""The one registry every kind of part uses: a new part is one new file in its package,
found on the first lookup; unknown names are refused with the known ones listed."""

from __future__ import annotations

import sys

import pytest

from omnivmed.evaluation.profiles import PROFILES, ScoringError
from omnivmed.models import CONNECTORS, ENCODERS, VOLUME_STRATEGIES
from omnivmed.prep.converters import CONVERTERS, ConversionError
from omnivmed.registry import Registry


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """A package `shapes_pkg` whose two modules each register one part, imported by nobody."""
    pkg = tmp_path / "shapes_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from omnivmed.registry import Registry\n"
        "SHAPES = Registry('shape', package=__name__, attribute='name')\n"
    )
    for name in ("circle", "square"):
        (pkg / f"{name}.py").write_text(
            f"from . import SHAPES\n\n@SHAPES.register({name!r})\nclass Part:\n    pass\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "shapes_pkg"
    for mod in [m for m in sys.modules if m == "shapes_pkg" or m.startswith("shapes_pkg.")]:
        del sys.modules[mod]


def test_a_part_file_is_found_on_first_lookup(plugin_package):
    import shapes_pkg

    assert "shapes_pkg.circle" not in sys.modules  # nothing imported the parts yet
    assert shapes_pkg.SHAPES.names() == ["circle", "square"]
    assert shapes_pkg.SHAPES.get("square").name == "square"  # recorded on the class


def test_unknown_names_list_the_known_ones(plugin_package):
    import shapes_pkg

    with pytest.raises(ValueError, match=r"unknown shape 'circl'; known shapes: circle, square"):
        shapes_pkg.SHAPES.get("circl")


def test_a_name_registers_once_and_unregisters():
    parts: Registry = Registry("widget")

    @parts.register("a")
    class A:
        pass

    parts.register("a")(A)  # the same class again is no conflict
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        parts.register("a")(type("B", (), {}))
    assert A.registered_name == "a" and "a" in parts
    parts.unregister("a")
    assert parts.names() == []


def test_every_kind_of_part_uses_it():
    assert ENCODERS.names() == ["rotary_siglip", "siglip"]
    assert VOLUME_STRATEGIES.names() == [
        "encoder3d",
        "rotary",
        "slice_attn",
        "slice_avg",
        "slice_concat",
    ]
    assert "mlp" in CONNECTORS
    assert PROFILES.names() == ["llava-med", "m3d", "strict", "surgical"]
    assert PROFILES.get("strict").name == "strict"
    assert {"slake", "vqa-rad", "pubmedvision-instruct"} <= set(CONVERTERS.names())
    with pytest.raises(ScoringError, match="unknown profile 'x'; known profiles: llava-med"):
        PROFILES.get("x")
    with pytest.raises(ConversionError, match="unknown source 'x'; known sources: cholec80-vqa"):
        CONVERTERS.get("x")
    with pytest.raises(ValueError, match="known volume strategies: encoder3d, rotary"):
        VOLUME_STRATEGIES.get("x")
