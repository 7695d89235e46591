"""Settings classes filled from mappings: every value converted by its field's type hint,
a wrong one refused with the field's name and the value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

from omnivmed.typed_fields import (
    FieldError,
    coerce,
    coerce_fields,
    describe,
    from_mapping,
    unknown_keys,
)


@dataclass
class Inner:
    size: int = 1
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size = {self.size}: must be at least 1")


@dataclass
class Settings:
    name: str
    count: int = 0
    limit: int | None = None
    rate: float = 0.5
    flag: bool = False
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] | None = None
    pair: tuple[float, float] = (0.0, 1.0)
    sizes: tuple[int, ...] = ()
    window: str | tuple[float, float] | None = None
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)


@dataclass
class SelfChecking:
    steps: int = 1
    ratio: float = 0.1

    def __post_init__(self) -> None:
        coerce_fields(self)


def test_every_supported_hint_converts_what_it_accepts():
    s = from_mapping(Settings, {
        "name": Path("runs/a"), "count": "64", "limit": 1e5, "rate": "1e-3", "flag": True,
        "tags": ("x", "y"), "weights": {"a": "2.5", "b": 3}, "extra": {"anything": [1]},
        "pair": [1, "2.5"], "sizes": [1.0, "2"], "window": [40, 400], "mode": "b",
        "inner": {"size": "3", "scale": 2},
    }, "test")  # fmt: skip
    assert s.name == "runs/a" and s.count == 64 and s.limit == 100000 and s.rate == 0.001
    assert type(s.count) is int and type(s.limit) is int
    assert s.flag is True and s.tags == ["x", "y"] and s.weights == {"a": 2.5, "b": 3}
    assert s.extra == {"anything": [1]} and s.pair == (1, 2.5) and s.sizes == (1, 2)
    assert s.window == (40, 400) and s.mode == "b" and s.inner == Inner(size=3, scale=2)


def test_values_already_right_are_kept_as_given():
    inner = Inner(size=2)
    s = from_mapping(Settings, {"name": "a", "rate": 2, "limit": None, "extra": None,
                                "window": "lung", "inner": inner}, "test")  # fmt: skip
    # An int is a valid float: kept, so a later message shows it as it was written.
    assert s.rate == 2 and type(s.rate) is int
    assert s.limit is None and s.extra is None and s.window == "lung" and s.inner is inner
    assert coerce(np.float32(0.5), float, "x") == 0.5 and coerce(np.int64(3), int, "x") == 3


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("count", "many", "count must be int, got 'many'"),
     ("count", 2.5, "count must be int, got 2.5"),
     ("count", True, "count must be int, got True"),
     ("count", float("inf"), "count must be int, got inf"),
     ("limit", "1.5", r"limit must be int \| None, got '1.5'"),
     ("rate", "fast", "rate must be float, got 'fast'"),
     ("rate", False, "rate must be float, got False"),
     ("flag", "yes", "flag must be bool, got 'yes'"),
     ("flag", 1, "flag must be bool, got 1"),
     ("name", 5, "name must be str, got 5"),
     ("tags", "x", r"tags must be list\[str\], got 'x'"),
     ("tags", ["x", 3], r"tags\[1\] must be str, got 3"),
     ("weights", 5, r"weights must be dict\[str, float\], got 5"),
     ("weights", {"a": "x"}, r"weights\['a'\] must be float, got 'x'"),
     ("weights", {1: 1.0}, "a key of weights must be str, got 1"),
     ("extra", [1], r"extra must be dict\[str, Any\] \| None, got \[1\]"),
     ("pair", [1, 2, 3], r"pair must be tuple\[float, float\], got \[1, 2, 3\]"),
     ("pair", [1, "a"], r"pair\[1\] must be float, got 'a'"),
     ("sizes", [1, 1.5], r"sizes\[1\] must be int, got 1.5"),
     ("window", 5, r"window must be str \| tuple\[float, float\] \| None, got 5"),
     ("mode", "c", "mode must be one of 'a', 'b', got 'c'"),
     ("inner", 5, "inner must be a mapping of Inner settings, got 5"),
     ("inner", {"size": "x"}, "inner: size must be int, got 'x'"),
     ("inner", {"size": 0}, "inner: size = 0: must be at least 1"),
     ("inner", {"sise": 2}, r"inner: unknown settings \['sise'\]; known: \['size', 'scale'\]")],
)  # fmt: skip
def test_a_wrong_value_is_named_with_its_field(key, value, message):
    with pytest.raises(ValueError, match=f"^test: {message}$"):
        from_mapping(Settings, {"name": "a", key: value}, "test")


def test_field_errors_say_which_field():
    with pytest.raises(FieldError) as info:
        coerce("x", int | None, "limit")
    assert info.value.field == "limit"
    with pytest.raises(FieldError) as info:
        coerce(["a", "b"], list[int], "sizes")
    assert info.value.field == "sizes[0]"


def test_unknown_and_missing_keys_and_non_mappings_are_refused():
    with pytest.raises(
        FieldError, match=r"^where: unknown settings \['colour', 'size'\]; known: \['name', "
    ):
        from_mapping(Settings, {"name": "a", "size": 1, "colour": "red"}, "where")
    assert unknown_keys(Settings, {"name": "a", "size": 1, "colour": 2}) == ["colour", "size"]
    with pytest.raises(FieldError, match=r"^where: missing settings \['name'\]$"):
        from_mapping(Settings, {"count": 1}, "where")
    with pytest.raises(FieldError, match=r"^where: expected a mapping of settings, got \[1, 2\]$"):
        from_mapping(Settings, [1, 2], "where")


def test_long_values_are_cut_so_the_error_stays_one_line():
    with pytest.raises(FieldError) as info:
        from_mapping(Settings, {"name": "a", "count": "x" * 1000}, "where")
    assert len(str(info.value)) < 200 and str(info.value).endswith("...")


def test_direct_construction_converts_in_post_init():
    s = SelfChecking(steps="10", ratio="5e-2")
    assert s.steps == 10 and s.ratio == 0.05
    assert dataclasses.replace(s, steps=3.0).steps == 3
    with pytest.raises(FieldError, match=r"^steps must be int, got 'ten'$"):
        SelfChecking(steps="ten")


def test_describe_writes_hints_as_a_reader_would():
    assert describe(int | None) == "int | None"
    assert describe(dict[str, float]) == "dict[str, float]"
    assert describe(tuple[int, ...]) == "tuple[int, ...]"
    assert describe(Inner) == "a mapping of Inner settings"


def test_a_hint_settings_cannot_be_read_by_is_a_programming_error():
    from collections.abc import Callable

    with pytest.raises(TypeError, match="not one that settings are read by"):
        coerce(print, Callable[[], None], "hook")
