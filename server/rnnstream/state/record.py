"""The stored form of a session."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SessionRecord:
    """One session: its model binding, position, timestamps and packed recurrent state.

    `state` is the packed float32 array described in rnnstream.state.codec, with
    `shape` (S, num_layers, hidden). `reply_tag` and `reply` keep the last
    applied step's request tag and encoded reply, so a retried step gets the
    same reply without being applied twice.
    """

    session_id: str
    model: str
    fingerprint: str
    position: int
    created_ms: int
    updated_ms: int
    ttl_s: int
    shape: tuple[int, ...]
    state: bytes
    dtype: str = "float32"
    reply_tag: str = ""
    reply: bytes = b""
    ttl_remaining_ms: int = -1

    def advanced(self, tokens: int, state: bytes, now_ms: int, reply_tag: str = "", reply: bytes = b"") -> "SessionRecord":
        return replace(
            self,
            position=self.position + tokens,
            state=state,
            updated_ms=now_ms,
            reply_tag=reply_tag,
            reply=reply,
        )


class SaveStatus(enum.Enum):
    SAVED = "saved"
    CONFLICT = "conflict"  # the stored position differs from the expected one
    MISSING = "missing"  # the session expired or was deleted


@dataclass(frozen=True)
class SaveResult:
    status: SaveStatus
    current_position: int = -1
