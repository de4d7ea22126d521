"""Storing an uploaded file's bytes (POST /v1/files, the console's new-job form): streamed to disk under the
request caps, never whole in memory, and moved into place only once complete."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from fastapi import UploadFile

from api.errors import PayloadTooLarge

CHUNK = 1024 * 1024


def store_upload(upload: UploadFile, target: Path, *, max_bytes: int, max_line_bytes: int) -> tuple[int, int, str]:
    """Stream the upload to disk (never whole in memory) and move it into place only when complete,
    so a crash leaves at most an unreferenced temp file. A line over `max_line_bytes` refuses the upload as soon
    as it passes the limit, whatever chunk it spans."""
    digest = hashlib.sha256()
    size = lines = 0
    line_bytes = 0  # of the line being read, so far (its newline left out)
    last = b"\n"
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".upload-", delete=False) as out:
        try:
            while chunk := upload.file.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(
                        f"file over the limit of {max_bytes} bytes", param="file", code="file_too_large"
                    )
                line_bytes = _check_line_lengths(chunk, line_bytes, first_line=lines + 1, max_bytes=max_line_bytes)
                digest.update(chunk)
                lines += chunk.count(b"\n")
                last = chunk[-1:]
                out.write(chunk)
        except BaseException:
            out.close()
            os.unlink(out.name)
            raise
    if last != b"\n":
        lines += 1
    os.replace(out.name, target)
    return size, lines, digest.hexdigest()


def _check_line_lengths(chunk: bytes, carried: int, *, first_line: int, max_bytes: int) -> int:
    """Refuse a line of ``chunk`` longer than ``max_bytes`` (its first piece continues a line of ``carried``
    bytes, numbered ``first_line``); returns the bytes of the line still open at the chunk's end."""
    pieces = chunk.split(b"\n")
    lengths = [carried + len(pieces[0]), *map(len, pieces[1:])]
    if max(lengths) > max_bytes:
        number = first_line + next(i for i, length in enumerate(lengths) if length > max_bytes)
        raise PayloadTooLarge(
            f"file: line {number} is over the limit of {max_bytes} bytes per line (max_line_bytes)",
            param="file",
            code="line_too_long",
        )
    return lengths[-1]
