"""Download a file with resume (HTTP Range) and a size/checksum check.

Why by hand and not ``urllib.request.urlretrieve``: the corpora are 30 MB to 1.8 GB and their hosts are slow,
so an interrupted download must continue where it stopped: bytes go to ``<dest>.part`` and a re-run asks
for ``Range: bytes=<have>-``.  A server that ignores the range (status 200) gets a fresh start.  The file is
renamed to ``dest`` only after its size and digest match; a mismatching file is deleted so that the next run
starts clean.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

from .errors import DataError

CHUNK = 1 << 20


@dataclass
class RemoteFile:
    """A file the project knows: where it lives and what it must hash to (None where no digest is published)."""
    filename: str
    url: str
    size: Optional[int] = None
    md5: Optional[str] = None
    sha256: Optional[str] = None


def file_digest(path: str, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str, size: Optional[int] = None, md5: Optional[str] = None, sha256: Optional[str] = None) -> None:
    """Raise a ``DataError`` if ``path`` does not have the given size / md5 / sha256."""
    if size is not None and os.path.getsize(path) != size:
        raise DataError(f"{path} has {os.path.getsize(path)} bytes, expected {size}: the download is incomplete or "
                        f"a different file; delete it and re-run (or pass --md5/--sha256 for a different mirror)")
    for algo, want in (("md5", md5), ("sha256", sha256)):
        if want:
            got = file_digest(path, algo)
            if got.lower() != want.lower():
                raise DataError(f"checksum mismatch for {path}: {algo} is {got}, expected {want}; the file is corrupt "
                                f"or from a different release: delete it and re-run")


def download(url: str, dest: str, size: Optional[int] = None, md5: Optional[str] = None,
             sha256: Optional[str] = None, timeout: float = 60.0, progress: bool = True) -> str:
    """Fetch ``url`` to ``dest`` (resuming ``dest.part``), verify it, return ``dest``.  An existing ``dest``
    that verifies is kept without contacting the server."""
    if os.path.exists(dest):
        verify(dest, size, md5, sha256)
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": "vqmoe-ds-get-data"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part already holds the whole file
            resp = None
        else:
            raise DataError(f"cannot download {url} (HTTP {e.code} {e.reason}): check the URL or --base-url, or put "
                            f"the file at {dest} by hand") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"cannot reach {url} ({reason}): check the network or --base-url, or put the file at "
                        f"{dest} by hand") from None
    if resp is not None:
        with resp:
            if have and resp.status != 206:
                have = 0  # the server ignored the Range header and sends the whole file
            total = resp.headers.get("Content-Length")
            total = int(total) + have if total is not None else size
            from tqdm import tqdm

            with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                               desc=os.path.basename(dest), disable=not progress,
                                                               leave=False) as bar:
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
                        raise DataError(f"download of {url} broke off after {f.tell()} bytes ({e}): re-run to resume "
                                        f"from {part}") from None
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block))
                if total is not None and f.tell() < total:
                    raise DataError(f"download of {url} broke off after {f.tell()} of {total} bytes: re-run to resume "
                                    f"from {part}")
    try:
        verify(part, size, md5, sha256)
    except DataError as e:
        os.remove(part)
        raise DataError(str(e).replace(part, dest).replace("delete it and re-run", "it was deleted; re-run")) from None
    shutil.move(part, dest)
    return dest
