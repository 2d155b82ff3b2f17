"""The data pipeline's one error type for data that cannot be found, fetched or trusted.

Configuration mistakes (a bad ``data.*`` value) raise ``bitnet_dist.errors.ConfigError`` instead;
``DataError`` is for the files themselves: a corpus that cannot be fetched, a hash that does not match,
a dataset prefix with no .bin/.idx. Its message always says how to provide the files.
"""
from __future__ import annotations


class DataError(RuntimeError):
    """Data files are missing, unreachable or do not match their pinned SHA-256; the message says how to fix it."""
