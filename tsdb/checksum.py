"""Files tsdb writes are written atomically and carry a sha256 sidecar (``NAME.sha256``).

A reader verifies the sidecar before trusting the file, so a truncated or bit-flipped
checkpoint, ``model.pt`` or ``weights.pt`` is one clear error instead of a raw traceback or,
worse, silently wrong weights. Write order: data to ``NAME.<pid>.tmp`` (fsynced), its hash to
``NAME.sha256.<pid>.tmp``, then the two renames; a kill between the renames leaves a new file
whose hash is in the pending sidecar, which :func:`verify` accepts and completes (roll
forward). Temporary names carry the process id, so processes writing the same file (the
ranks of a data-parallel run) never interleave their bytes.
Files without a sidecar (written before tsdb kept checksums) are read as they are.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from tsdb.errors import TsdbError

SUFFIX = ".sha256"


def sidecar(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, with its sha256 sidecar."""
    path = Path(path)
    tmp, side = path.with_name(f"{path.name}.{os.getpid()}.tmp"), sidecar(path)
    side_tmp = side.with_name(f"{side.name}.{os.getpid()}.tmp")
    _fsync_write(tmp, data)
    _fsync_write(side_tmp, f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode())
    os.replace(tmp, path)
    os.replace(side_tmp, side)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def _recorded(side: Path) -> str | None:
    try:
        return side.read_text().split()[0]
    except (OSError, IndexError):
        return None


def verify(path: str | os.PathLike, fix: str) -> Path:
    """``path`` if it matches its sidecar (or has none); otherwise a one-line `TsdbError`
    naming the file and ``fix`` (what the user should do)."""
    path = Path(path)
    side = sidecar(path)
    if not side.exists():
        return path
    with open(path, "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if actual == _recorded(side):
        return path
    for pending in side.parent.glob(f"{side.name}.*.tmp"):   # killed between the two renames
        if actual == _recorded(pending):
            os.replace(pending, side)
            return path
    raise TsdbError(f"{path} is corrupt: its sha256 does not match {side.name} (truncated or changed after "
                    f"tsdb wrote it); {fix}")


def read_json(path: str | os.PathLike, fix: str):
    """A JSON file written by tsdb, checksum-verified; unreadable is one line naming it."""
    import json
    path = verify(path, fix)
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TsdbError(f"{path} is not valid JSON ({e}); {fix}") from None


def remove(path: str | os.PathLike) -> None:
    path = Path(path)
    for p in (path, sidecar(path)):
        p.unlink(missing_ok=True)


# -- torch state dicts ----------------------------------------------------------------------

def save_state_dict(state: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` of a state dict, atomic and checksummed."""
    import torch
    buf = io.BytesIO()
    torch.save(state, buf)
    return write_bytes(path, buf.getvalue())


def load_state_dict(path: str | os.PathLike, fix: str) -> dict:
    """A state dict saved by :func:`save_state_dict` (or any plain ``torch.save`` of tensors),
    loaded with ``weights_only=True`` after the checksum check; anything unreadable (a
    truncated file, a pickle with code in it, another format) is one line naming the file."""
    import torch
    path = verify(path, fix)
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a bad file)
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise TsdbError(f"{path} is not a readable tsdb weights file ({reason}); {fix}") from None
    if not isinstance(state, dict):
        raise TsdbError(f"{path} holds a {type(state).__name__}, not a state dict; {fix}")
    return state
