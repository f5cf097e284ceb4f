"""The export format of a session: an opaque, versioned, checksummed blob.

Layout (all integers little-endian):
  4 bytes   magic b"RNSS"
  2 bytes   format version (1)
  4 bytes   header length N
  N bytes   header, UTF-8 JSON: model, fingerprint, position, dtype, shape, ttl_s, created_ms
  M bytes   packed state (see rnnstream.state.codec); M is given by the header's shape
  16 bytes  BLAKE2b-128 digest of everything before it
"""

from __future__ import annotations

import array
import hashlib
import json
import math
import struct

from ..errors import InvalidArgument
from .codec import DTYPE, state_nbytes
from .record import SessionRecord

MAGIC = b"RNSS"
VERSION = 1
DIGEST_SIZE = 16
MAX_POSITION = 2**63 - 1  # positions are uint64 in the API and int64 in Redis's Lua numbers
PREFIX = struct.Struct("<4sHI")


def export_blob(record: SessionRecord) -> bytes:
    header = json.dumps(
        {
            "model": record.model,
            "fingerprint": record.fingerprint,
            "position": record.position,
            "dtype": record.dtype,
            "shape": list(record.shape),
            "ttl_s": record.ttl_s,
            "created_ms": record.created_ms,
        },
        sort_keys=True,
    ).encode()
    body = PREFIX.pack(MAGIC, VERSION, len(header)) + header + record.state
    return body + hashlib.blake2b(body, digest_size=DIGEST_SIZE).digest()


def _field(header: dict, name: str, kind: type):
    """Return header[name] if it has exactly the JSON type kind (no bool for int, no float for int)."""
    value = header[name]
    if type(value) is not kind:
        raise TypeError(f"field {name!r} is {value!r}, not of type {kind.__name__}")
    return value


def import_blob(blob: bytes) -> dict:
    """Check and unpack a blob; return its header fields plus "state". Raise InvalidArgument if it is damaged."""
    if len(blob) < PREFIX.size + DIGEST_SIZE:
        raise InvalidArgument(f"state blob of {len(blob)} bytes is too short to be an rnnstream export")
    magic, version, header_size = PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise InvalidArgument("state blob is not an rnnstream export (wrong magic bytes)")
    if version != VERSION:
        raise InvalidArgument(f"state blob has format version {version}; this server reads version {VERSION}")

    body, digest = blob[:-DIGEST_SIZE], blob[-DIGEST_SIZE:]
    if hashlib.blake2b(body, digest_size=DIGEST_SIZE).digest() != digest:
        raise InvalidArgument("state blob is corrupted: its checksum does not match")

    try:
        header = json.loads(body[PREFIX.size : PREFIX.size + header_size])
        fields = {
            "model": _field(header, "model", str),
            "fingerprint": _field(header, "fingerprint", str),
            "position": _field(header, "position", int),
            "dtype": _field(header, "dtype", str),
            "shape": tuple(_field({"size": size}, "size", int) for size in _field(header, "shape", list)),
            "ttl_s": _field(header, "ttl_s", int),
            "state": body[PREFIX.size + header_size :],
        }
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidArgument(f"state blob has an invalid header: {error}") from error
    shape, state = fields["shape"], fields["state"]

    if not 0 <= fields["position"] <= MAX_POSITION:
        raise InvalidArgument(f"state blob has position {fields['position']}; allowed 0 to {MAX_POSITION}")
    if fields["dtype"] != DTYPE:
        raise InvalidArgument(f"state blob has dtype {fields['dtype']!r}; expected {DTYPE!r}")
    if len(state) != state_nbytes(shape):
        raise InvalidArgument(f"state blob contains {len(state)} state bytes; its shape {shape} needs {state_nbytes(shape)}")
    if not all(math.isfinite(value) for value in array.array("f", state)):
        raise InvalidArgument("state blob contains a NaN or infinite state value")
    return fields
