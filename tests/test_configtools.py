from dataclasses import dataclass, field
from typing import Literal

import pytest

from synth.configtools import from_dict, to_dict
from synth.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Inner:
    steps: int = field(default=10, metadata={"min": 1})
    mode: Literal["pixel", "fourier"] = "pixel"
    layers: tuple[str, ...] = ("conv3",)
    lr: float | None = None


@dataclass(frozen=True, kw_only=True)
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    extra: dict[str, float] = field(default_factory=dict)


def test_round_trip_preserves_values():
    data = {"name": "demo", "inner": {"steps": 5, "mode": "fourier", "layers": ["a", "b"], "lr": 0.5}, "extra": {"k": 1}}
    cfg = from_dict(Outer, data)
    assert cfg.inner.layers == ("a", "b")
    assert to_dict(cfg) == {"name": "demo", "inner": {"steps": 5, "mode": "fourier", "layers": ["a", "b"], "lr": 0.5}, "extra": {"k": 1.0}}
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_defaults_fill_missing_sections():
    assert from_dict(Outer, None) == Outer()


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"inner": {"stepz": 3}}, "inner: unknown key 'stepz' (did you mean 'steps'?)"),
        ({"inner": {"steps": 0}}, "inner.steps: expected a value >= 1, got 0"),
        ({"inner": {"steps": "many"}}, "inner.steps: expected an integer"),
        ({"inner": {"steps": True}}, "inner.steps: expected an integer"),
        ({"inner": {"mode": "fourrier"}}, "inner.mode: expected one of 'pixel', 'fourier', got 'fourrier' (did you mean 'fourier'?)"),
        ({"inner": {"layers": "conv3"}}, "inner.layers: expected a list of a string"),
        ({"inner": {"lr": "fast"}}, "inner.lr: expected a number or null"),
        ({"inner": []}, "inner: expected a mapping"),
        ({"extra": {"k": "x"}}, "extra.k: expected a number"),
    ],
)
def test_errors_name_the_key(data, fragment):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_frozen():
    cfg = from_dict(Outer, {})
    with pytest.raises(Exception):
        cfg.name = "y"  # type: ignore[misc]


def test_ids_written_as_numbers_or_dates_become_strings():
    """YAML reads `session: 201025` as an int and `2026-12-07` as a date; ids are strings."""
    import datetime

    import yaml

    data = yaml.safe_load("name: 2026-12-07\ninner: {layers: [201025, 2026-11-30]}")
    assert isinstance(data["name"], datetime.date)
    cfg = from_dict(Outer, data)
    assert cfg.name == "2026-12-07" and cfg.inner.layers == ("201025", "2026-11-30")
