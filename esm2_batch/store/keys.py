"""What a stored row is keyed by: everything that determines it.

A row depends on the weights (their fingerprint, not the file name), the layer, the
pooling, the truncation or window policy, the compute dtype and the sequence. `scope` is
a digest of all but the sequence (a run's settings dict, as recorded in esm_all.pt's
meta["settings"]); `row_key` adds the sequence. A row is reused only on an exact key
match, so rows made with other settings or other weights are never mixed into a run,
even when the settings file beside them is lost or edited.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["RowKeys", "settings_scope"]


def settings_scope(settings: Mapping[str, object]) -> str:
    """A short digest of what rows depend on (canonical JSON: key order never matters)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


@dataclass(frozen=True, slots=True)
class RowKeys:
    """Keys of rows made under one scope; identical sequences share a key (embedded once)."""

    scope: str

    def of(self, sequence: str) -> str:
        digest = hashlib.blake2b(self.scope.encode("ascii"), digest_size=20)
        digest.update(b"\0")
        digest.update(sequence.encode("ascii", "replace"))
        return digest.hexdigest()
