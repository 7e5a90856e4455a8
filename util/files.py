"""Files the runs write: one atomic-write helper (checkpoints, args.json), log.txt lines, writable folders."""

import codecs
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from PIL import Image

from util.errors import UsageError


def temp_path(path: Path) -> Path:
    """The temporary file an atomic write of ``path`` goes through: ``.{name}.tmp.{pid}`` in the same folder."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every file system lets a folder be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, fsync, then rename it over ``path``.

    Readers see the old file or the whole new one, never a part. A process killed partway through leaves ``path``
    as it was and the temporary file behind (``util.checkpoint.remove_stale_temp_files`` deletes those); a write
    that raises removes it.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def append_log_line(output_dir: str, stats: dict) -> None:
    """One JSON line per epoch in ``output_dir/log.txt``, as the official code."""
    with open(Path(output_dir) / "log.txt", mode="a", encoding="utf-8") as f:
        f.write(json.dumps(stats) + "\n")
        f.flush()


def check_output_dir(output_dir: str, flag: str = "--output_dir") -> None:
    """Create ``output_dir`` and make sure we can write there (before any work is done)."""
    if not output_dir:
        return
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(output_dir) / f".write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{flag} {output_dir} is not writable: {e.strerror or e}") from e


NPY_MAGIC = b"\x93NUMPY"  # the first bytes of a NumPy .npy file


def image_format(head: bytes) -> str | None:
    """The image format PIL identifies from a file's first bytes ``head`` ("PNG", "JPEG", ...), else None."""
    try:
        with Image.open(io.BytesIO(head)) as img:
            return img.format
    except Exception:
        return None


def decodes_as_utf8(head: bytes) -> bool:
    """Whether a file's first bytes ``head`` are UTF-8 text (a byte-order mark, or a character cut at the end, is
    fine)."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        return False
    return True
