"""Where a training run keeps its files: a location on a `pyarrow.fs` filesystem that every node
of the cluster reaches, the same storage Ray Train persists checkpoints to
(`RunConfig(storage_path=..., storage_filesystem=...)`).

A `Storage` is a path on a filesystem: a local (or shared, e.g. an NFS/CephFS volume mounted on
every node) directory, or an object-store prefix such as s3://bucket/runs. The driver uploads the
tokenized data through it; workers read it (downloading into a worker-local directory when the
storage is not the local filesystem), write the history and the final HF directory through it,
and Ray Train copies the reported checkpoints to it. Nothing of a run lives only on the driver's
node. A `Storage` pickles (pyarrow filesystems do), so the driver hands it to the workers and to
the RouterActor.

Writes are whole-file: to a temporary name, then moved over the target, so a reader sees the old
file or the new one (an object store's PUT is atomic anyway). Appends use the filesystem's append
stream where it has one (local files) and rewrite the object where it has none (S3, GCS).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

# URI schemes accepted for `storage`: those pyarrow.fs.FileSystem.from_uri resolves to a filesystem
# that several nodes share (plus file://, a path on a shared mount). A plain path is local too.
SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def uri_scheme(location: str) -> str:
    """The URI scheme of `location` ("" for a plain path); ValueError naming an unsupported one
    and the accepted ones. Checks the text only (resolving an s3:// URI reaches the network)."""
    scheme = urlparse(location).scheme
    if scheme and scheme not in SCHEMES:
        raise ValueError(
            f"storage {location!r}: unsupported URI scheme {scheme!r}; accepted: a path (a shared "
            f"volume on a cluster) or a URI with scheme {', '.join(SCHEMES)}"
        )
    return scheme


class Storage:
    """A file or directory `path` on `filesystem` (pyarrow.fs)."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, scheme: str = "") -> None:
        self.filesystem = filesystem
        self.path = path if path == "/" else path.rstrip("/")
        self.scheme = scheme

    @staticmethod
    def at(location: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> Storage:
        """A path (absolute or relative to the cwd, `~` expanded) or a URI; with `filesystem`,
        `location` is a path on it (Ray's `storage_filesystem` convention: no scheme)."""
        text = os.fspath(location)
        if filesystem is not None:
            return Storage(filesystem, text)
        scheme = uri_scheme(text)
        if not scheme:
            path = Path(text).expanduser().resolve()
            return Storage(pafs.LocalFileSystem(), path.as_posix())
        filesystem, path = pafs.FileSystem.from_uri(text)
        return Storage(filesystem, path, "" if scheme == "file" else scheme)

    # -- locations -----------------------------------------------------------------------------
    def join(self, *parts: str) -> Storage:
        return Storage(self.filesystem, PurePosixPath(self.path, *parts).as_posix(), self.scheme)

    def __truediv__(self, part: str) -> Storage:
        """`storage / "name"`, as with a Path: `run(job) / "tokenizer.json"`."""
        return self.join(part)

    def sibling(self, name: str) -> Storage:
        """`name` in this location's parent directory."""
        parent = PurePosixPath(self.path).parent
        return Storage(self.filesystem, (parent / name).as_posix(), self.scheme)

    def resolve(self, location: str) -> Storage:
        """`location` under this directory when relative, else its own (an absolute path, or a
        URI), on this filesystem when that is not the local one and `location` has no scheme."""
        if urlparse(location).scheme:
            return Storage.at(location)
        if PurePosixPath(location).is_absolute() or location.startswith("~"):
            return Storage.at(location) if self.is_local else Storage(self.filesystem, location)
        return self.join(location)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def is_local(self) -> bool:
        """On this machine's filesystem (a local disk or a volume mounted on every node)."""
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path | None:
        return Path(self.path) if self.is_local else None

    def __fspath__(self) -> str:
        if not self.is_local:
            raise TypeError(f"{self} is not on the local filesystem")
        return self.path

    def __str__(self) -> str:
        if self.is_local:
            return self.path
        if self.scheme:
            return f"{self.scheme}://{self.path}"
        return f"{self.filesystem.type_name}:{self.path}"

    def __repr__(self) -> str:
        return f"Storage({self})"

    # -- queries -------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.filesystem.get_file_info(self.path).type != pafs.FileType.NotFound

    def children(self, pattern: str = "*") -> list[Storage]:
        """The entries of this directory whose name matches `pattern`, by name; [] if none."""
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        names = sorted(PurePosixPath(i.path).name for i in infos)
        return [self.join(n) for n in names if fnmatch.fnmatchcase(n, pattern)]

    # -- files ---------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Replace the file whole: write a temporary sibling, then move it over the target."""
        parent = PurePosixPath(self.path).parent.as_posix()
        self.filesystem.create_dir(parent, recursive=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        with self.filesystem.open_output_stream(tmp) as f:
            f.write(data)
        self.filesystem.move(tmp, self.path)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def append_text(self, text: str) -> None:
        """Append to the file (created if missing). Object stores have no append: there the
        object is rewritten whole (a 10k-step history.jsonl is about 3 MB)."""
        parent = PurePosixPath(self.path).parent.as_posix()
        self.filesystem.create_dir(parent, recursive=True)
        try:
            stream = self.filesystem.open_append_stream(self.path)
        except (NotImplementedError, pa.ArrowNotImplementedError):
            old = self.read_bytes() if self.exists() else b""
            self.write_bytes(old + text.encode())
            return
        with stream:
            stream.write(text.encode())

    # -- transfers -----------------------------------------------------------------------------
    def upload(self, local: str | os.PathLike) -> None:
        """Copy a local file or directory (recursively) here."""
        src = Path(local).resolve()
        if self.is_local and src == Path(self.path).resolve():
            return
        if src.is_dir():
            self.filesystem.create_dir(self.path, recursive=True)
        else:
            self.filesystem.create_dir(PurePosixPath(self.path).parent.as_posix(), recursive=True)
        pafs.copy_files(
            src.as_posix(),
            self.path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.filesystem,
        )

    def download(self, local: str | os.PathLike) -> Path:
        """Copy this file or directory (recursively) to `local`; returns `local`."""
        dst = Path(local)
        if dst.exists():  # a copy from an earlier attempt (same name): replace it whole
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        info = self.filesystem.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self} does not exist")
        (dst if info.type == pafs.FileType.Directory else dst.parent).mkdir(
            parents=True, exist_ok=True
        )
        pafs.copy_files(
            self.path,
            dst.as_posix(),
            source_filesystem=self.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        return dst

    def local_copy(self, scratch: str | os.PathLike) -> Path:
        """A local path holding this file or directory: itself on the local filesystem, else a
        download into `scratch` (a worker-local directory) under the same name."""
        if self.local_path is not None:
            if not self.exists():
                raise FileNotFoundError(f"{self} does not exist")
            return self.local_path
        return self.download(Path(scratch) / self.name)


def scratch_dir(key: str) -> Path:
    """A worker-local directory for downloads, the same for every attempt with this `key` (so a
    restarted worker overwrites, not accumulates, its copies)."""
    d = Path(tempfile.gettempdir()) / f"moeray-{key}"
    d.mkdir(parents=True, exist_ok=True)
    return d
