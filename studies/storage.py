"""Where a study's files live: a local folder, a shared NFS path, or any URI Ray Tune accepts
(``s3://bucket/prefix``, ``gs://…``, ``s3://bucket/prefix?endpoint_override=host:port&scheme=http``).

One small API for every path the study scripts and the report use, so that no URI is ever wrapped
in ``Path(...)``:

- :func:`resolve`, :func:`join`, :func:`is_remote`: build paths (a URI keeps its query when parts
  are joined, as Tune's own URI handling does);
- :func:`exists`, :func:`read_text`, :func:`write_text`, :func:`write_json`: small files;
- :func:`download` (a folder's small result files, or one file, into a local folder) and
  :func:`upload` (a local folder or file to storage);
- :func:`make_report`: the report of results anywhere, written anywhere (built locally, uploaded);
- :func:`redact`: credentials out of any URL before it is printed or written.

File systems come from ``pyarrow.fs.FileSystem.from_uri``, as in Ray Tune: S3 reads the usual AWS
settings (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``,
``~/.aws``, an instance role), or ``s3://KEY:SECRET@bucket/...`` in the URI itself (discouraged:
see :func:`redact`). Local paths behave exactly as plain folders.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# The files of a run that the report reads; model weights and Tune's own files stay in storage.
REPORT_FILES = ("summary.json", "per_image.csv", "epsilon.csv", "history.csv", "best_config.json")

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")  # two letters at least: not a Windows drive
# scheme://user:PASSWORD@host: the password (anything up to the @, as URL-encoded passwords may
# hold any other character).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@?#]+):[^\s@]*@")
# ?…&secret_key=VALUE&…: the value of every query parameter named like a credential.
_SECRET_PARAM = re.compile(
    r"([?&][^\s=&#?]*(?:secret|password|passwd|token|credential|signature|key)[^\s=&#?]*=)[^\s&#]*",
    re.IGNORECASE)


def redact(text: str | os.PathLike) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``: the password of
    ``scheme://user:password@host`` and the value of query parameters named like credentials
    (``secret_key``, ``access_key``, ``session_token``, ``password``, ``sig``-nature, …). Anything
    printed or written by the studies goes through it."""
    text = _USERINFO.sub(r"\1:***@", str(text))
    return _SECRET_PARAM.sub(r"\1***", text)


def has_credentials(uri: str | os.PathLike) -> bool:
    return redact(uri) != str(uri)


def is_uri(path: str | os.PathLike) -> bool:
    return bool(_SCHEME.match(str(path)))


def is_remote(path: str | os.PathLike) -> bool:
    """A URI of another file system than this machine's (``file://`` is local)."""
    return is_uri(path) and not str(path).lower().startswith("file://")


def _local(path: str | os.PathLike) -> Path:
    text = str(path)
    if text.lower().startswith("file://"):
        text = urlsplit(text).path
    return Path(text).expanduser()


def resolve(path: str | os.PathLike) -> str:
    """What Tune takes as ``storage_path``: an absolute local path, or the URI unchanged."""
    return str(path) if is_remote(path) else str(_local(path).resolve())


def join(root: str | os.PathLike, *parts: str) -> str:
    """``root/part/...``; for a URI the parts go into its path, before its query
    (``s3://b/p?endpoint_override=h:9000`` + ``x`` → ``s3://b/p/x?endpoint_override=h:9000``)."""
    if not is_uri(root):
        return str(Path(root, *parts))
    scheme, netloc, path, query, fragment = urlsplit(str(root))
    path = posixpath.join(path.rstrip("/") or "/", *(p.strip("/") for p in parts))
    return urlunsplit((scheme, netloc, path, query, fragment))


@functools.lru_cache(maxsize=32)
def _from_uri(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def filesystem(path: str | os.PathLike):
    """``(pyarrow file system, path on it)`` of a local path or URI."""
    import pyarrow.fs

    if not is_remote(path):
        return pyarrow.fs.LocalFileSystem(), str(_local(path).resolve())
    return _from_uri(str(path))


def _info(path: str | os.PathLike):
    fs, fs_path = filesystem(path)
    return fs, fs_path, fs.get_file_info(fs_path)


def exists(path: str | os.PathLike) -> bool:
    import pyarrow.fs

    if not is_remote(path):
        return _local(path).exists()
    return _info(path)[2].type != pyarrow.fs.FileType.NotFound


def read_text(path: str | os.PathLike) -> str:
    """The text of a file; ``FileNotFoundError`` when there is none."""
    if not is_remote(path):
        return _local(path).read_text()
    fs, fs_path = filesystem(path)
    if not exists(path):
        raise FileNotFoundError(f"no such file: {redact(path)}")
    with fs.open_input_stream(fs_path) as f:
        return f.read().decode()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small file, creating its folders; on storage the object is replaced whole."""
    if not is_remote(path):
        local = _local(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, local)
        return
    fs, fs_path = filesystem(path)
    _make_dir(fs, posixpath.dirname(fs_path))
    with fs.open_output_stream(fs_path) as f:
        f.write(text.encode())


def write_json(path: str | os.PathLike, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def _make_dir(fs, fs_path: str) -> None:
    try:
        fs.create_dir(fs_path, recursive=True)
    except OSError:
        pass  # object stores need no folders; a bucket that does not exist fails on the write


def download(path: str | os.PathLike, local_dir: str | os.PathLike, names: tuple[str, ...] | None = REPORT_FILES) -> Path:
    """The local counterpart of ``path``.

    A local ``path`` is returned as it is (nothing is copied). A remote folder's files named in
    ``names`` (every file with ``names=None``) are copied below ``local_dir`` with their relative
    paths and modification times, and ``local_dir`` is returned; a remote file is copied into
    ``local_dir`` and its copy returned.

    Raises:
        FileNotFoundError: nothing at ``path``.
    """
    import pyarrow.fs

    if not is_remote(path):
        return _local(path)
    fs, fs_path, info = _info(path)
    local_dir = Path(local_dir)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {redact(path)}")
    if info.type == pyarrow.fs.FileType.File:
        files, base = [info], posixpath.dirname(fs_path)
    else:
        selector = pyarrow.fs.FileSelector(fs_path, recursive=True)
        files = [f for f in fs.get_file_info(selector)
                 if f.type == pyarrow.fs.FileType.File and (names is None or f.base_name in names)]
        base = fs_path
    local_dir.mkdir(parents=True, exist_ok=True)

    def fetch(f) -> None:
        target = local_dir / posixpath.relpath(f.path, base)
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f.path) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if f.mtime is not None:  # the report keeps the newest of two runs of the same fold
            os.utime(target, (f.mtime.timestamp(), f.mtime.timestamp()))

    # Many small objects: their round trips overlap.
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(fetch, files))
    return local_dir / posixpath.basename(fs_path) if info.type == pyarrow.fs.FileType.File else local_dir


def upload(local: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy a local folder (its whole tree, into ``path``) or file (to ``path``) to storage;
    to a local ``path`` it is a plain copy."""
    import pyarrow.fs

    local = Path(local)
    if not is_remote(path):
        target = _local(path)
        if target.resolve() == local.resolve():
            return
        if local.is_dir():
            shutil.copytree(local, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local, target)
        return
    fs, fs_path = filesystem(path)
    _make_dir(fs, fs_path if local.is_dir() else posixpath.dirname(fs_path))
    pyarrow.fs.copy_files(str(local.resolve()), fs_path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs)


def report_dirs(storage_path: str | os.PathLike, name: str) -> tuple[str, Path]:
    """``(where the report of <name> goes, the local folder it is built in)``: both
    ``<storage>/<name>-report`` for local storage; for remote storage the report is built in
    ``./<name>-report`` (the current folder) and uploaded to ``<storage>/<name>-report``."""
    uri = join(resolve(storage_path), f"{name}-report")
    return uri, (Path(uri) if not is_remote(uri) else Path.cwd() / f"{name}-report")


def optuna_db(storage_path: str | os.PathLike, study: str) -> Path:
    """The default SQLite file of a study's Optuna studies: ``<storage>/<study>-optuna.db`` for
    local storage; ``./<study>-optuna.db`` (the driver's current folder) for remote storage, as
    SQLite cannot live in an object store."""
    if is_remote(storage_path):
        return Path.cwd() / f"{study}-optuna.db"
    return _local(storage_path).resolve() / f"{study}-optuna.db"


def make_report(results: list[str | os.PathLike], out: str | os.PathLike, *, local_out: str | os.PathLike | None = None,
                best_config: str | os.PathLike | None = None, builder=None, **kwargs) -> tuple[Path, str | None]:
    """``report.make_report`` (or ``builder``) for results and ``best_config`` anywhere, written anywhere.

    Remote results folders are downloaded (their :data:`REPORT_FILES` only) to a temporary folder,
    removed afterwards. A remote ``out`` is built in ``local_out`` (default: a temporary folder,
    removed afterwards) and uploaded. The written tables name the results by their (redacted)
    URIs, not the temporary copies, and no credential of any URL reaches them.

    Returns:
        ``(table.md where it was built, the URI of the uploaded table.md or None)``; the local
        path is gone after the call when ``out`` is remote and ``local_out`` not given.

    Raises:
        ValueError: as ``report.make_report``, and for a remote folder with nothing in it.
    """
    if builder is None:
        from report import make_report as builder

    with tempfile.TemporaryDirectory(prefix="polydice-report-") as tmp:
        names: dict[str, str] = {}  # temporary copy → redacted URI, for the written text

        def local(path, i, missing_ok=False):
            if not is_remote(path):
                return Path(path)
            try:
                copy = download(path, Path(tmp) / "inputs" / str(i))
            except FileNotFoundError as exc:
                if not missing_ok:
                    raise ValueError(f"results folder {redact(path)} does not exist") from exc
                copy = Path(tmp) / "inputs" / str(i) / "missing"  # the report lists it as unreadable
            names[str(copy)] = redact(path)
            return copy

        local_results = [local(r, i) for i, r in enumerate(results)]
        local_best = None if best_config is None else local(best_config, len(results), missing_ok=True)
        remote_out = is_remote(out)
        build = Path(local_out) if (remote_out and local_out is not None) else \
            Path(tmp) / "report" if remote_out else _local(out)
        table = builder(local_results, build, best_config=local_best, **kwargs)
        for written in [*build.glob("*.md"), *build.glob("*.csv")]:
            text = original = written.read_text()
            for copy, uri in sorted(names.items(), key=lambda kv: -len(kv[0])):
                text = text.replace(copy, uri)
            text = redact(text)
            if text != original:
                written.write_text(text)
        if not remote_out:
            return table, None
        upload(build, out)
        return table, join(out, table.name)
