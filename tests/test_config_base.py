"""``base:`` in a config file: build on another config, overriding some keys."""

from __future__ import annotations

import pytest

from synth.config import config_files, load_config, read_config_data
from synth.errors import ConfigError

BASE = """name: parent
seed: 3
fit:
  backbone: small_cnn
  readout: {name: factorized, mask_l1: 0.5}
  layers: [conv1, conv2]
synthesis:
  steps: 7
  param: {name: fourier, decay_power: 2.0}
"""


def _write(path, text):
    path.write_text(text)
    return path


def test_child_overrides_keys_merges_mappings_and_replaces_lists(tmp_path):
    _write(tmp_path / "base.yaml", BASE)
    (tmp_path / "sub").mkdir()
    child = _write(tmp_path / "sub" / "child.yaml", "base: ../base.yaml\nname: child\nfit:\n  readout: {channel_l1: 0.2}\n  layers: [conv3]\nsynthesis:\n  param: {name: pixel}\n")
    cfg = load_config(child)
    assert cfg.name == "child" and cfg.seed == 3 and cfg.synthesis.steps == 7
    assert cfg.fit.readout == {"name": "factorized", "mask_l1": 0.5, "channel_l1": 0.2}  # merged
    assert cfg.fit.layers == ("conv3",)  # a list replaces the base's
    assert cfg.synthesis.param == {"name": "pixel"}  # another component replaces, not merged
    assert config_files(child) == [str(child), str(tmp_path / "sub" / ".." / "base.yaml")]
    assert "base" not in read_config_data(child)


def test_overrides_apply_after_the_base(tmp_path):
    _write(tmp_path / "base.yaml", BASE)
    child = _write(tmp_path / "child.yaml", "base: base.yaml\n")
    assert load_config(child, ["seed=9"]).seed == 9


@pytest.mark.parametrize(
    "text,needle",
    [
        ("base: missing.yaml\n", "child.yaml: base: base config not found: "),
        ("base: [a]\n", "child.yaml: base: expected the path of another config file"),
        ("base: child.yaml\n", "child.yaml: base: circular base"),
    ],
)
def test_bad_base_is_one_line_naming_file_and_key(tmp_path, text, needle):
    child = _write(tmp_path / "child.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_circular_chain_of_two(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular base"):
        load_config(tmp_path / "a.yaml")
