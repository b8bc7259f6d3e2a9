"""What every configuration section shares: its field names and the "> 0" check most of them need."""
from __future__ import annotations

import dataclasses


class Section:
    """A frozen dataclass of one concern; `validate()` returns one line per problem, naming the fix."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def defaults(cls) -> dict:
        """Every field's default (a fresh copy of mutable ones)."""
        return {k: v for k, v in vars(cls()).items()}

    def validate(self) -> list[str]:
        return []


def positive(section: Section, *names: str) -> list[str]:
    """`--name must be > 0 (got v)` for each named field that is set and not > 0."""
    return [f"--{name.replace('_', '-')} must be > 0 (got {v})" for name in names
            if (v := getattr(section, name)) is not None and not v > 0]
