"""The configuration's error: where a value came from, which field, why."""
from __future__ import annotations

from dpo_ds.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A configuration problem, already phrased for the user (where it came from, which field, why)."""

    def __init__(self, message: str, field_name: str | None = None):
        super().__init__(message)
        self.field_name = field_name
