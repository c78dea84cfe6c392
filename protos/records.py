"""Typed summaries as JSON: one base class for what each role writes and the next one reads.

Why: results crossing a process boundary used to be untyped dicts read with ``.get(k) or 0``, so
a renamed key read as zero. A summary is a frozen dataclass whose ``__post_init__`` checks its
invariants (e.g. every sample counted once); :meth:`Record.from_json` refuses unknown keys, wrong
types, another schema and a broken invariant, so a reader can trust every field it touches.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from protos.config import from_mapping, to_mapping

R = TypeVar("R", bound="Record")


def _json_safe(v: Any) -> Any:
    """NaN/inf have no JSON spelling: written as the strings "nan"/"inf"/"-inf", which
    ``protos.config.coerce`` reads back as floats."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


class Record:
    """Mixin for frozen dataclasses that are written as JSON with a schema name and version."""

    SCHEMA: ClassVar[str] = ""  # "fedshift.<name>/<version>"; bump the version on an incompatible change
    # properties also written for people reading the file (accuracy, rates); ignored on load
    DERIVED: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        derived = {k: getattr(self, k) for k in self.DERIVED}
        return {"schema": self.SCHEMA, **_json_safe({**to_mapping(self), **derived})}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        data = dict(data)
        schema = data.pop("schema", None)
        for k in cls.DERIVED:
            data.pop(k, None)
        if schema != cls.SCHEMA:
            raise ValueError(f"{cls.__name__}: schema {schema!r}, expected {cls.SCHEMA!r}")
        return from_mapping(cls, data, where="")

    @classmethod
    def from_json(cls: type[R], text: str) -> R:
        return cls.from_dict(json.loads(text))

    def write(self, path: str | Path) -> Path:
        """Write atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def read(cls: type[R], path: str | Path) -> R:
        try:
            return cls.from_json(Path(path).read_text())
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from exc
