"""Downloads of every dataset's files: through `<file>.part`, resumed with an HTTP Range request after an
interruption, the size checked against the server's, optionally checked to be a zip, renamed into place only when
complete; a hanging DNS lookup or server fails within the timeout. prepare_MIND_dataset.py (MIND's zips) and the
converters (EB-NeRD's bundles and artifacts, xMIND's zips, Adressa's tar.gz) all download through `download`.
"""
from __future__ import annotations

import http.client
import os
import socket
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Callable

from util import replace_dir_atomically

DOWNLOAD_TIMEOUT_S = 10.0
CHUNK = 1 << 20
REPORT_EVERY_S = 10.0


def resolve_with_timeout(host: str, port: int, timeout: float) -> None:
    """Fail within `timeout` when DNS hangs (urllib's timeout does not cover name resolution)."""
    result: dict = {}

    def work():
        try:
            socket.getaddrinfo(host, port)
            result["ok"] = True
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    if "error" in result:
        raise result["error"]
    if "ok" not in result:
        raise socket.timeout(f"resolving {host} took more than {timeout:.0f}s")


def _total(response, have: int) -> tuple[bool, int | None]:
    """(resumed, the file's full size or None) from a response to a request that had `have` bytes already."""
    resumed = response.status == 206
    content_range = response.headers.get("Content-Range", "")
    length = response.headers.get("Content-Length")
    if resumed and "/" in content_range and content_range.rsplit("/", 1)[1].strip().isdigit():
        return resumed, int(content_range.rsplit("/", 1)[1])
    if length is not None:
        return resumed, int(length) + (have if resumed else 0)
    return resumed, None


def _copy(response, part: Path, have: int, url: str, name: str, log: Callable) -> int | None:
    """Append (or write, when the server ignored the Range) the response to `part`; returns the full size. A
    connection cut short keeps what arrived, for the next run to resume."""
    resumed, total = _total(response, have)
    done = have if resumed else 0
    last_report = time.time()
    with open(part, "ab" if resumed else "wb") as f:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (http.client.IncompleteRead, OSError) as e:
                if isinstance(e, http.client.IncompleteRead) and e.partial:
                    f.write(e.partial)
                raise OSError(f"{url}: the connection broke after {part.stat().st_size if part.exists() else 0} "
                              f"bytes ({type(e).__name__}); run again to resume from {part}") from None
            if not chunk:
                break
            f.write(chunk)
            done += len(chunk)
            if time.time() - last_report > REPORT_EVERY_S:
                last_report = time.time()
                log(f"  {name}: {done / 2**20:,.0f} MiB" + (f" of {total / 2**20:,.0f}" if total else ""))
    return total


def download(url: str, path: str | Path, *, timeout: float = DOWNLOAD_TIMEOUT_S, check_zip: bool = True,
             log: Callable = print, hint: str | None = None) -> Path:
    """Download `url` to `path` through `<path>.part`, resuming a partial `.part` with a Range request.

    The size is checked against the server's (Content-Range total, or Content-Length), with `check_zip` the file
    must be a zip (Adressa's tar.gz is not), and only then is it renamed to `path`. Network errors raise OSError
    (URLError, timeouts, a connection cut short) quickly; the `.part` is kept and resumed by the next call. With
    `hint` (where else to get the file), any failure is one OSError: `could not download <url> (<why>). <hint>`."""
    if hint is None:
        return _download(url, Path(path), timeout, check_zip, log)
    try:
        return _download(url, Path(path), timeout, check_zip, log)
    except (OSError, http.client.HTTPException) as e:
        part = Path(path).with_name(Path(path).name + ".part")
        kept = f" The partial download {part} is kept and resumes next time." if part.exists() else ""
        raise OSError(f"could not download {url} ({e}). {hint}{kept}") from None


def _download(url: str, path: Path, timeout: float, check_zip: bool, log: Callable) -> Path:
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    parsed = urllib.parse.urlsplit(url)
    if parsed.hostname:
        resolve_with_timeout(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80), timeout)
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "prepare_MIND_dataset.py"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and have):  # 416 with a .part: nothing left to fetch, the .part is complete
            raise
        response = None
    total = have
    if response is not None:
        with response:
            total = _copy(response, part, have, url, path.name, log)
    size = part.stat().st_size
    if total is not None and size != total:
        raise OSError(f"{url}: got {size} of {total} bytes; run again to resume from {part}")
    if check_zip and not zipfile.is_zipfile(part):
        part.unlink()
        raise OSError(f"{url}: the download is not a zip file (deleted it; try again)")
    os.replace(part, path)
    return path


def unpack_atomically(archive: str | Path, target: str | Path) -> Path:
    """Unpack a .zip or a .tar(.gz) into `target`, which appears whole or not at all (built in a hidden folder
    beside it, then renamed): an interrupted unpack never leaves a half folder that a later run would take for the
    data. An archive whose members all sit in one folder named like `target` (`one_week/...` for `one_week/`) is
    unpacked without that extra level. Member paths are sanitised (zipfile's rules; tarfile's "data" filter)."""
    archive, target = Path(archive), Path(target)

    def build(tmp: Path) -> None:
        try:
            if archive.suffix == ".zip":
                with zipfile.ZipFile(archive) as z:
                    z.extractall(tmp)
            else:
                with tarfile.open(archive) as t:
                    t.extractall(tmp, filter="data")
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:  # not the user's mistake to debug
            raise ValueError(f"{archive} cannot be unpacked ({type(e).__name__}: {e}): an interrupted copy or "
                             f"download? Delete it and run this again") from None
        entries = list(tmp.iterdir())
        if len(entries) == 1 and entries[0].is_dir() and entries[0].name == target.name:
            inner = tmp / ".unpacked-top"  # renamed first: it may hold a folder of its own name
            os.replace(entries[0], inner)
            for child in list(inner.iterdir()):
                os.replace(child, tmp / child.name)
            inner.rmdir()

    replace_dir_atomically(target, build)
    return target

