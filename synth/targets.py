"""Load a site population from a ``targets/*.yaml`` definition.

A targets file names the population, its ``kind`` (a registry name: ``virtual`` for the
built-in simulated population, ``cowley2023`` for the real V4 sessions with digital twins
as follow-up recorder) and the ``params`` its builder takes::

    name: virtual_v4
    kind: virtual
    description: ...
    params: {n_v4: 40, n_it: 6, seed: 1234}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from synth.errors import ConfigError
from synth.populations.base import TARGETS, Target
from synth.registry import did_you_mean

_TARGET_KEYS = ("name", "kind", "description", "params")


def _register_builtin() -> None:
    # Importing the modules registers their builders in TARGETS.
    import synth.populations.lab  # noqa: F401
    import synth.populations.twins  # noqa: F401
    import synth.populations.virtual  # noqa: F401


def read_target_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check the top level of a targets file (not its params)."""
    from synth.config import read_yaml

    data = read_yaml(path)
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping with keys {', '.join(_TARGET_KEYS)}", file=str(path))
    for k in data:
        if k not in _TARGET_KEYS:
            raise ConfigError(f"unknown key '{k}'{did_you_mean(str(k), list(_TARGET_KEYS))}; expected one of: {', '.join(_TARGET_KEYS)}", file=str(path))
    if "kind" not in data:
        raise ConfigError("missing required key 'kind'", file=str(path))
    params = data.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"expected a mapping, got {params!r}", key="params", file=str(path))
    return {"name": str(data.get("name") or Path(path).stem), "kind": data["kind"], "description": data.get("description", ""), "params": dict(params)}


def build_target(path: str | os.PathLike, *, root: str | None = None, session: str | None = None, overrides: Mapping[str, Any] | None = None) -> Target:
    """Build the Target described by a targets file.

    Args:
        path: the targets YAML file.
        root: data root overriding ``params.root`` (``target.root`` in a config).
        session: session id overriding ``params.session`` (``target.session``).
        overrides: further params overrides (``target.params``).

    Raises:
        ConfigError: unknown kind or params, naming the file and key.
    """
    _register_builtin()
    spec = read_target_file(path)
    params = dict(spec["params"])
    params.update(overrides or {})
    if root is not None:
        params["root"] = root
    if session is not None:
        params["session"] = str(session)
    try:
        builder = TARGETS.get(spec["kind"], key="kind")
        TARGETS.check_kwargs(spec["kind"], params, key="params")
        return builder(**params)
    except ConfigError as err:
        raise err.at(file=str(path)) from None
