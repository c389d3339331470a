"""Error types shared by every layer, for failures whose message is complete in itself.

The CLI's error boundary (`orchestrator.boundary`) prints these as one line; their messages name the
file (and where it makes sense the record and field) and what was wrong.
"""

from __future__ import annotations


class CorruptFileError(ValueError):
    """A file the orchestrator wrote or reads back (JSON, parquet) cannot be parsed."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")
