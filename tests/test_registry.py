import pytest

from synth.errors import ConfigError
from synth.registry import Registry


def make():
    reg = Registry("objective")

    @reg.register("stretch")
    def stretch(site: int = 0, weight: float = 1.0):
        return ("stretch", site, weight)

    return reg


def test_build_from_name_and_mapping():
    reg = make()
    assert reg.build("stretch") == ("stretch", 0, 1.0)
    assert reg.build({"name": "stretch", "site": 3}) == ("stretch", 3, 1.0)


def test_unknown_name_hint():
    with pytest.raises(ConfigError, match=r"x.obj: unknown objective 'strech' \(did you mean 'stretch'\?\)"):
        make().build("strech", key="x.obj")


def test_unknown_kwarg_hint():
    with pytest.raises(ConfigError, match=r"unknown argument 'weigth' for objective 'stretch' \(did you mean 'weight'\?\)"):
        make().build({"name": "stretch", "weigth": 2})


def test_double_registration_is_a_bug():
    reg = make()
    with pytest.raises(ValueError):
        reg.register("stretch")(lambda: None)
