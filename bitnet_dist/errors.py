"""Errors shared by every layer of the package. This module imports nothing from bitnet_dist, so the
numerics, kernels, data pipeline, engines and entry points can all raise the same error types."""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A setting that cannot work. ``key`` is the Hydra key, ``value`` what was given, ``fix`` what works."""

    def __init__(self, key: str, value: Any, fix: str):
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"invalid {key}={value!r}: {fix}")
