"""Model registry and the resumable downloader, against a loopback HTTP server (no internet)."""
from __future__ import annotations

import hashlib
import http.server
import random
import re
import socket
import threading
from pathlib import Path

import pytest

from draggan_core.model import registry
from draggan_core.model.registry import DownloadError, ModelEntry, download, get_model, list_models

PAYLOAD = random.Random(0).randbytes(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append({"path": self.path, "range": self.headers.get("Range")})
        body = srv.files.get(self.path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not srv.ignore_range:
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start:]
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Accept-Ranges", "none" if srv.ignore_range else "bytes")
        self.end_headers()
        if srv.cut_after is not None:  # simulate a dropped connection mid-transfer
            chunk = chunk[: srv.cut_after]
            srv.cut_after = None
            srv.sent_bytes += len(chunk)  # counted before sending: the client may finish first
            self.wfile.write(chunk)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        srv.sent_bytes += len(chunk)
        self.wfile.write(chunk)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files = {"/models/tiny.pkl": PAYLOAD}
    srv.requests, srv.sent_bytes, srv.ignore_range, srv.cut_after = [], 0, False, None
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def entry(server, sha=SHA, size=len(PAYLOAD), path="/models/tiny.pkl") -> ModelEntry:
    return ModelEntry(name="tiny", url=server.url + path, filename="tiny.pkl", resolution=64,
                      size_bytes=size, sha256=sha, licence="test")


def test_full_download_with_checksum(server, tmp_path, capsys):
    out = download(entry(server), tmp_path / "ckpt", progress=True)
    assert out == tmp_path / "ckpt" / "tiny.pkl"
    assert out.read_bytes() == PAYLOAD
    assert not (tmp_path / "ckpt" / "tiny.pkl.part").exists()
    assert server.requests == [{"path": "/models/tiny.pkl", "range": None}]
    assert "tiny.pkl" in capsys.readouterr().err  # tqdm bar goes to stderr
    # a verified file is not fetched again
    assert download(entry(server), tmp_path / "ckpt", progress=False) == out
    assert len(server.requests) == 1


def test_resume_from_partial_file(server, tmp_path):
    half = 123_456
    (tmp_path / "tiny.pkl.part").write_bytes(PAYLOAD[:half])
    out = download(entry(server), tmp_path, progress=False)
    assert out.read_bytes() == PAYLOAD
    assert server.requests == [{"path": "/models/tiny.pkl", "range": f"bytes={half}-"}]
    assert server.sent_bytes == len(PAYLOAD) - half


def test_interrupted_download_resumes_on_next_call(server, tmp_path):
    server.cut_after = 100_000
    with pytest.raises(DownloadError, match=r"run again to resume"):
        download(entry(server), tmp_path, progress=False)
    part = tmp_path / "tiny.pkl.part"
    assert part.is_file() and part.stat().st_size == 100_000
    assert not (tmp_path / "tiny.pkl").exists()
    out = download(entry(server), tmp_path, progress=False)
    assert out.read_bytes() == PAYLOAD
    assert server.requests[-1]["range"] == "bytes=100000-"
    assert server.sent_bytes == len(PAYLOAD)


def test_checksum_mismatch_leaves_no_file(server, tmp_path):
    with pytest.raises(DownloadError, match="sha256 mismatch") as info:
        download(entry(server, sha="0" * 64), tmp_path, progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "tiny.pkl").exists()
    assert not (tmp_path / "tiny.pkl.part").exists()


def test_size_mismatch_is_an_error(server, tmp_path):
    with pytest.raises(DownloadError, match="size"):
        download(entry(server, sha=None, size=len(PAYLOAD) + 5), tmp_path, progress=False)
    assert not (tmp_path / "tiny.pkl").exists()


def test_server_ignoring_range_restarts(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "tiny.pkl.part").write_bytes(PAYLOAD[:50_000])
    out = download(entry(server), tmp_path, progress=False)
    assert out.read_bytes() == PAYLOAD
    assert server.requests[0]["range"] == "bytes=50000-"  # asked, but got the whole file (200)
    assert server.sent_bytes == len(PAYLOAD)


def test_corrupt_partial_file_is_recovered(server, tmp_path):
    (tmp_path / "tiny.pkl.part").write_bytes(b"x" * 1000 + PAYLOAD[1000:2000])  # wrong bytes, resumed
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download(entry(server), tmp_path, progress=False)
    assert not (tmp_path / "tiny.pkl.part").exists()  # discarded, so the next try starts clean
    assert download(entry(server), tmp_path, progress=False).read_bytes() == PAYLOAD


def test_complete_part_file_and_416(server, tmp_path):
    (tmp_path / "tiny.pkl.part").write_bytes(PAYLOAD)
    out = download(entry(server, size=None), tmp_path, progress=False)  # size unknown -> server says 416
    assert out.read_bytes() == PAYLOAD
    assert server.requests[-1]["range"] == f"bytes={len(PAYLOAD)}-"
    (tmp_path / "tiny.pkl").unlink()
    (tmp_path / "tiny.pkl.part").write_bytes(PAYLOAD)
    n = len(server.requests)
    download(entry(server), tmp_path, progress=False)  # size known: verified without a request
    assert len(server.requests) == n


def test_unknown_checksum_still_downloads(server, tmp_path):
    out = download(entry(server, sha=None, size=None), tmp_path, progress=False)
    assert out.read_bytes() == PAYLOAD
    n = len(server.requests)
    assert download(entry(server, sha=None, size=None), tmp_path, progress=False) == out  # kept, not refetched
    assert len(server.requests) == n
    out.write_bytes(b"stale")  # fails the known checksum -> fetched again
    assert download(entry(server), tmp_path, progress=False).read_bytes() == PAYLOAD


def test_http_error(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(entry(server, path="/missing.pkl"), tmp_path, progress=False)
    assert not (tmp_path / "tiny.pkl").exists() and not (tmp_path / "tiny.pkl.part").exists()


def test_unreachable_host(tmp_path):
    with socket.socket() as s:  # find a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = ModelEntry(name="x", url=f"http://127.0.0.1:{port}/x.pkl", filename="x.pkl")
    with pytest.raises(DownloadError) as info:
        download(e, tmp_path, progress=False, timeout=5)
    msg = str(info.value)
    assert msg.startswith(f"cannot reach 127.0.0.1:{port}") and "offline?" in msg and "\n" not in msg
    assert not (tmp_path / "x.pkl").exists()


def test_download_by_url_and_refused_schemes(server, tmp_path):
    out = download(server.url + "/models/tiny.pkl", tmp_path, progress=False)
    assert out == tmp_path / "tiny.pkl" and out.read_bytes() == PAYLOAD
    with pytest.raises(DownloadError, match="http"):
        download(ModelEntry(name="f", url="file:///etc/passwd", filename="f"), tmp_path, progress=False)


def test_cli_download(server, tmp_path, monkeypatch, capsys):
    from draggan_core.cli import program as cli
    monkeypatch.setattr(registry, "get_model", lambda name: entry(server))
    assert cli.main(["download", "tiny", "--dir", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "tiny.pkl").read_bytes() == PAYLOAD
    monkeypatch.setattr(registry, "get_model", lambda name: entry(server, sha="1" * 64))
    (tmp_path / "tiny.pkl").unlink()
    capsys.readouterr()
    assert cli.main(["download", "tiny", "--dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "sha256" in err and "Traceback" not in err


def test_registry_contents():
    models = list_models()
    names = [m.name for m in models]
    assert len(names) == len(set(names))
    for expected in ("stylegan2-ffhq-256", "stylegan2-ffhq-512", "stylegan2-ffhq-1024", "stylegan2-afhqcat-512",
                     "stylegan2-afhqdog-512", "stylegan2-afhqwild-512", "stylegan2-metfaces-1024",
                     "stylegan2-brecahad-512", "stylegan2-cifar10-32"):
        assert expected in names
    for m in models:
        assert m.url.startswith("https://") and m.url.endswith(".pkl")
        assert m.resolution in (32, 256, 512, 1024)
        assert str(m.resolution) in m.url
        assert m.licence
        assert m.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", m.sha256)
        assert m.local_path("ckpts") == Path("ckpts") / m.filename
    assert get_model("stylegan2-ffhq-512").url == (
        "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan2/versions/1/files/stylegan2-ffhq-512x512.pkl")
    with pytest.raises(ValueError, match="unknown model"):
        get_model("nope")
