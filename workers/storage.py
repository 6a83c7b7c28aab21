"""Where results live: a local path or any URI ``pyarrow.fs`` takes (``s3://bucket/prefix``, ``gs://``,
``hdfs://``), read and written the same way by the store, the edit logs and the report.

A *location* is a plain string, so it travels to Ray actors as is and each process opens its own
filesystem client from it. Query options stay on the URI and every file under it keeps them, e.g.
``s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http`` (an S3-compatible server);
credentials come from the usual places (``AWS_ACCESS_KEY_ID``…, instance roles), never from the URI.

Writing is atomic everywhere, by the means each kind of storage has: object stores (S3, GCS) have no
rename, but an object appears only once its upload completes, so a file is written under its final
name there; other filesystems (local POSIX, HDFS) write a hidden temporary file beside it and rename
it into place — locally after an fsync, so a crash leaves the old file or the new one, never half.
"""

from __future__ import annotations

import os
import posixpath
import uuid

import pyarrow.fs as pafs

# Filesystems where a PUT is atomic and a rename would be a copy: files go under their final name.
OBJECT_STORES = ("s3", "gcs")


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location``/part/...; a URI keeps its query options at the end."""
    location = str(location)
    if not is_uri(location):
        return os.path.join(location, *parts)
    base, sep, query = location.partition("?")
    return posixpath.join(base.rstrip("/"), *parts) + sep + query


def display(location: str | os.PathLike) -> str:
    """The location as shown to people: absolute for a local path, a URI without its query options."""
    location = str(location)
    return location.partition("?")[0] if is_uri(location) else os.path.abspath(location)


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (ValueError, OSError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) for unknown schemes
        raise ValueError(f"{display(location)}: not a location pyarrow.fs can open ({exc})") from exc


def is_object_store(filesystem: pafs.FileSystem) -> bool:
    return filesystem.type_name in OBJECT_STORES


def write_bytes(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` as the file ``path``, atomically, replacing any file of that name."""
    if is_object_store(filesystem):
        with filesystem.open_output_stream(path) as out:  # visible only once the upload completes
            out.write(data)
        return
    directory, name = posixpath.split(path)
    filesystem.create_dir(directory, recursive=True)
    tmp = posixpath.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.tmp")  # hidden: readers skip '.' names
    try:
        if isinstance(filesystem, pafs.LocalFileSystem):
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        else:
            with filesystem.open_output_stream(tmp) as out:
                out.write(data)
            filesystem.move(tmp, path)
    finally:
        if filesystem.get_file_info(tmp).type != pafs.FileType.NotFound:
            filesystem.delete_file(tmp)


def read_bytes(filesystem: pafs.FileSystem, path: str, length: int | None = None) -> bytes:
    """The file's bytes (only its first ``length`` when given)."""
    with filesystem.open_input_file(path) as handle:
        return handle.readall() if length is None else handle.read_at(min(length, handle.size()), 0)


def exists(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type == pafs.FileType.Directory
