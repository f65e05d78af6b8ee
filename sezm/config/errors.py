"""Errors and warnings raised while reading an input file."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """An input file that does not fit the schema.

    ``path`` is the slash-separated key path (``model/descriptor/channels``), ``source`` the file
    it came from (if known).
    """

    def __init__(self, path: str, message: str, source: str | None = None) -> None:
        self.path = path
        self.message = message
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where = f"`{self.path}`" if self.path else "input root"
        if self.source:
            where = f"{self.source}: {where}"
        return f"{where}: {self.message}"

    def with_source(self, source: str | None) -> ConfigError:
        return ConfigError(self.path, self.message, source) if source else self


class ConfigWarning(UserWarning):
    """An accepted option that has no effect in sezm."""


def join_path(*parts: str) -> str:
    """``a/b/c``: the slash-joined key path of a config entry, empty parts left out."""
    return "/".join(p for p in parts if p)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` did you mean `x`?`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(str(name), sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""
