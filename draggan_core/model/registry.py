"""Registry of known public StyleGAN2 checkpoints and a resumable, verifying downloader.

`draggan_core/registry.json` (paths.PACKAGE_DIR) lists each model's URL, resolution, size and sha256 where they
are known (null otherwise: a download is then checked only against the server's reported length).
Downloads stream to `<dest>/<filename>.part`, resume with an HTTP Range request when a partial file
exists, verify, and are renamed into place atomically, so a half-written file never looks complete.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

from .paths import PACKAGE_DIR

# DRAGGAN_REGISTRY: another registry file (a mirror, a private model list, tests on loopback)
REGISTRY_PATH = Path(os.environ.get("DRAGGAN_REGISTRY") or PACKAGE_DIR / "registry.json")
USER_AGENT = "draggan-core-downloader/1"
CHUNK_BYTES = 1 << 20


class DownloadError(Exception):
    """A download failed; the message is meant for users (one line)."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    url: str
    filename: str
    resolution: int | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    licence: str | None = None
    description: str = ""
    format: str = "nvidia-pickle"
    source: str = ""

    def local_path(self, checkpoints_dir: str | os.PathLike = "checkpoints") -> Path:
        return Path(checkpoints_dir) / self.filename

    @classmethod
    def from_dict(cls, d: dict) -> "ModelEntry":
        known = {f.name for f in fields(cls)}
        entry = cls(**{k: v for k, v in d.items() if k in known})
        if entry.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", entry.sha256):
            raise ValueError(f"registry entry {entry.name}: sha256 must be 64 lowercase hex digits")
        if Path(entry.filename).name != entry.filename or entry.filename in ("", ".", ".."):
            raise ValueError(f"registry entry {entry.name}: filename must be a plain file name")
        return entry

    @classmethod
    def from_url(cls, url: str, sha256: str | None = None, size_bytes: int | None = None) -> "ModelEntry":
        filename = Path(urllib.parse.urlparse(url).path).name or "download.bin"
        return cls(name=Path(filename).stem, url=url, filename=filename, sha256=sha256, size_bytes=size_bytes)


@lru_cache(maxsize=None)
def _load_registry(path: str) -> tuple[ModelEntry, ...]:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    return tuple(ModelEntry.from_dict(d) for d in doc["models"])


def list_models() -> list[ModelEntry]:
    return list(_load_registry(str(REGISTRY_PATH)))


def get_model(name: str) -> ModelEntry:
    for entry in list_models():
        if entry.name == name:
            return entry
    known = ", ".join(e.name for e in list_models())
    raise ValueError(f"unknown model {name!r}; known models: {known}")


def _resolve(name_or_url_entry) -> ModelEntry:
    if isinstance(name_or_url_entry, ModelEntry):
        return name_or_url_entry
    if isinstance(name_or_url_entry, dict):
        return ModelEntry.from_dict(name_or_url_entry)
    text = str(name_or_url_entry)
    if re.match(r"^https?://", text, re.IGNORECASE):
        return ModelEntry.from_url(text)
    return get_model(text)


# --------------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------------

def _host(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    return parsed.netloc or url


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
        if not isinstance(e, BaseException):
            return str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def _verify(entry: ModelEntry, path: Path, expected_size: int | None) -> str | None:
    """None when the file passes every known check, else the reason."""
    size = path.stat().st_size
    want = entry.size_bytes if entry.size_bytes is not None else expected_size
    if want is not None and size != want:
        return f"size is {size} bytes, expected {want}"
    if entry.sha256 is not None:
        got = _sha256(path)
        if got != entry.sha256.lower():
            return f"sha256 mismatch (got {got[:16]}..., expected {entry.sha256[:16]}...)"
    return None


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    """'bytes START-END/TOTAL' -> (START, TOTAL or None)."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        return None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416:
            return e  # range not satisfiable: handled by the caller
        raise DownloadError(f"{url}: server answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, socket.timeout, http.client.HTTPException) as e:
        raise DownloadError(f"cannot reach {_host(url)}: {_reason(e)} (offline?)") from None


def _progress_bar(total, initial, desc, enabled):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, leave=True, dynamic_ncols=True)


def download(name_or_url_entry, dest_dir: str | os.PathLike = "checkpoints", progress: bool = True,
             timeout: float = 30.0) -> Path:
    """Download a registry model (name, ModelEntry, entry dict or http(s) URL) into dest_dir.

    Returns the final path. Resumes from `<filename>.part` with a Range request; restarts from zero
    when the server ignores Range. Raises DownloadError on network failure or failed verification
    (a checksum mismatch deletes the partial file and leaves no final file).
    """
    entry = _resolve(name_or_url_entry)
    scheme = urllib.parse.urlparse(entry.url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"{entry.url}: only http(s) URLs can be downloaded")
    dest_dir = Path(dest_dir)
    final = entry.local_path(dest_dir)
    # Only complete downloads are ever renamed into place, so an existing file that passes the known
    # checks (or has none to pass) is kept; one that fails them is downloaded again.
    if final.is_file() and _verify(entry, final, None) is None:
        return final
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"{dest_dir}: cannot create directory ({_reason(e)})") from None
    part = final.with_name(final.name + ".part")

    for attempt in range(2):  # a second pass only after a stale/oversized .part was discarded
        start = part.stat().st_size if part.is_file() else 0
        if entry.size_bytes is not None and start > entry.size_bytes:
            part.unlink()
            start = 0
        if entry.size_bytes is not None and start == entry.size_bytes:
            total = start  # already complete: only verification is left
        else:
            total = _fetch(entry, part, start, timeout, progress)
        if total == -1:  # 416 on a .part that does not verify: discard and start over
            part.unlink(missing_ok=True)
            continue
        problem = _verify(entry, part, total)
        if problem is None:
            os.replace(part, final)
            return final
        if entry.sha256 is not None or attempt == 1:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{entry.url}: downloaded file failed verification: {problem}; "
                                "the partial file was deleted")
        part.unlink(missing_ok=True)
    raise DownloadError(f"{entry.url}: download could not be completed")


def _fetch(entry: ModelEntry, part: Path, start: int, timeout: float, progress: bool) -> int | None:
    """Stream the (rest of the) file into `part`. Returns the expected full size (None if unknown),
    or -1 when the server says the requested range is past the end of the file."""
    url = entry.url
    resp = _open(url, start, timeout)
    with resp:
        status = getattr(resp, "status", None) or resp.getcode()
        if status == 416:
            total = _parse_total_416(resp.headers.get("Content-Range"))
            if total is not None and total == start and start > 0:
                return total  # the .part already holds the whole file
            return -1
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206 and start > 0:
            cr = _parse_content_range(resp.headers.get("Content-Range"))
            if cr is None or cr[0] != start:
                raise DownloadError(f"{url}: server sent an unexpected range ({resp.headers.get('Content-Range')})")
            total = cr[1] if cr[1] is not None else (start + length if length is not None else None)
            mode, offset = "ab", start
        else:  # 200: a fresh download, or a server that ignores Range -> start from zero
            total = length
            mode, offset = "wb", 0
        if total is None and entry.size_bytes is not None:
            total = entry.size_bytes
        bar = _progress_bar(total, offset, entry.filename, progress)
        written = offset
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        chunk = resp.read(CHUNK_BYTES)
                    except (OSError, socket.timeout, ValueError, http.client.HTTPException) as e:
                        raise DownloadError(f"download from {_host(url)} interrupted after {written} bytes: "
                                            f"{_reason(e)}; run again to resume") from None
                    if not chunk:
                        break
                    f.write(chunk)
                    written += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        if total is not None and written < total:
            raise DownloadError(f"download from {_host(url)} ended early ({written} of {total} bytes); "
                                "run again to resume")
        return total


def _parse_total_416(value: str | None) -> int | None:
    m = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", value or "")
    return int(m.group(1)) if m else None
