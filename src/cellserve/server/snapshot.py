"""Session snapshots: a streaming session's recurrent state and pending input as one self-describing blob,
so a client can resume its stream on another replica or after a restart (`sequence_snapshot` /
`sequence_restore`).

On the wire the blob travels base64-encoded in a BYTES tensor, so it fits JSON as well as raw gRPC bytes.

Layout (little-endian): b"CSNAP", a format version byte, a u32 length and a JSON header (model name,
architecture hash, state array names and widths, pending frames shape), the float32 state values then
pending frames, and a CRC-32 of everything before it. Loading checks each part and says which is wrong.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
import zlib

import numpy as np

MAGIC = b"CSNAP"
VERSION = 1


class SnapshotError(ValueError):
    """A blob that is not a snapshot of this model (HTTP 400 / gRPC INVALID_ARGUMENT)."""


def architecture_hash(model) -> str:
    """A short digest of the model's architecture (its config: sizes, cell types, options)."""
    return hashlib.sha256(json.dumps(model.config(), sort_keys=True).encode()).hexdigest()[:16]


def dump(model_name: str, arch: str, snapshot: dict) -> bytes:
    state, pending = snapshot["state"], np.asarray(snapshot["pending"], np.float32)
    header = json.dumps({"model": model_name, "architecture": arch,
                         "state": [[name, int(len(values))] for name, values in state.items()],
                         "pending": list(pending.shape)}).encode()
    body = b"".join([MAGIC, bytes([VERSION]), struct.pack("<I", len(header)), header]
                    + [np.asarray(v, "<f4").tobytes() for v in state.values()] + [pending.astype("<f4").tobytes()])
    return body + struct.pack("<I", zlib.crc32(body))


def load(blob: bytes, model_name: str, arch: str) -> dict:
    """The snapshot in `blob`, checked against the model that is to restore it."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) < len(MAGIC) + 9 or not blob.startswith(MAGIC):
        raise SnapshotError("sequence_snapshot is not a cellserve session snapshot")
    version = blob[len(MAGIC)]
    if version != VERSION:
        raise SnapshotError(f"snapshot format version {version} is not supported (this server reads {VERSION})")
    body, (crc,) = blob[:-4], struct.unpack("<I", blob[-4:])
    if zlib.crc32(body) != crc:
        raise SnapshotError("sequence_snapshot is corrupted (checksum mismatch)")
    start = len(MAGIC) + 1
    (length,) = struct.unpack_from("<I", body, start)
    try:
        header = json.loads(body[start + 4:start + 4 + length])
        names = [(str(n), int(w)) for n, w in header["state"]]
        pending_shape = tuple(int(d) for d in header["pending"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"sequence_snapshot has an unreadable header: {exc}")
    if header.get("model") != model_name or header.get("architecture") != arch:
        raise SnapshotError(f"the snapshot is of model {header.get('model')!r} (architecture "
                            f"{header.get('architecture')}), not {model_name!r} (architecture {arch})")
    values = np.frombuffer(body, "<f4", offset=start + 4 + length) if len(body) > start + 4 + length else np.zeros(0)
    sizes = [w for _, w in names]
    if len(values) != sum(sizes) + int(np.prod(pending_shape)):
        raise SnapshotError("sequence_snapshot's data does not match its header")
    state, offset = {}, 0
    for (name, width) in names:
        state[name] = values[offset:offset + width].astype(np.float32)
        offset += width
    return {"state": state, "pending": values[offset:].astype(np.float32).reshape(pending_shape)}


def to_text(model_name: str, arch: str, snapshot: dict) -> bytes:
    """dump, base64-encoded (the sequence_snapshot tensor's element)."""
    return base64.b64encode(dump(model_name, arch, snapshot))


def from_text(text: bytes, model_name: str, arch: str) -> dict:
    try:
        blob = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise SnapshotError("sequence_snapshot is not a cellserve session snapshot (not base64)")
    return load(blob, model_name, arch)
