"""Registries: map names used in YAML to builders (never import paths).

Example:
    >>> OBJECTIVES = Registry("objective")
    >>> @OBJECTIVES.register("stretch")
    ... def stretch(site: int = 0): ...
    >>> OBJECTIVES.build({"name": "stretch", "site": 3})   # calls stretch(site=3)
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from synth.errors import ConfigError

T = TypeVar("T", bound=Callable[..., Any])


def did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest option, or ``""``."""
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """A name -> builder mapping with clear errors for unknown names and arguments."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str, *, key: str | None = None) -> T:
        """Return the builder for ``name``; ConfigError (naming ``key``) if unknown."""
        if name not in self._items:
            raise ConfigError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self.names())}; "
                f"expected one of: {', '.join(self.names())}",
                key=key,
            )
        return self._items[name]

    def check_kwargs(self, name: str, kwargs: Mapping[str, Any], *, key: str | None = None) -> None:
        """Raise ConfigError if ``kwargs`` are not accepted by the builder of ``name``."""
        fn = self.get(name, key=key)
        sig = inspect.signature(fn)
        params = sig.parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        allowed = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for k in kwargs:
            if k not in allowed:
                raise ConfigError(
                    f"unknown argument '{k}' for {self.kind} '{name}'{did_you_mean(k, allowed)}; "
                    f"expected one of: {', '.join(allowed) or '(none)'}",
                    key=f"{key}.{k}" if key else k,
                )

    def build(self, spec: str | Mapping[str, Any], *, key: str | None = None, **extra: Any) -> Any:
        """Build from ``"name"`` or ``{"name": ..., **kwargs}``; ``extra`` are passed too."""
        if isinstance(spec, str):
            name, kwargs = spec, {}
        elif isinstance(spec, Mapping) and "name" in spec:
            name = spec["name"]
            kwargs = {k: v for k, v in spec.items() if k != "name"}
        else:
            raise ConfigError(f"expected a {self.kind} name or a mapping with 'name', got {spec!r}", key=key)
        self.check_kwargs(name, kwargs, key=key)
        try:
            return self.get(name, key=key)(**kwargs, **extra)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"bad arguments for {self.kind} '{name}': {err}", key=key) from err
