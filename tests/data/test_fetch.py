"""`synth data fetch`: a real local HTTP server (with Range support), resume, hashes, mirror."""

from __future__ import annotations

import hashlib
import http.server
import re
import shutil
import socket
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from _shared import cowley_root, requires_cowley
from synth.data import fetch
from synth.errors import DataError, UserError


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves files under ``server.base``; honours ``Range: bytes=N-`` unless disabled."""

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        p = srv.base / urllib.parse.unquote(self.path.lstrip("/"))
        if not p.is_file():
            self.send_error(404, "Not Found")
            return
        data = p.read_bytes()
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and srv.ranges:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        srv.sent += len(body)  # counted before sending: the client may finish first
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def server(tmp_path):
    """A threaded HTTP server on 127.0.0.1 (random port) serving tmp_path/'served'."""
    base = tmp_path / "served"
    base.mkdir()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.base, srv.requests, srv.sent, srv.ranges = base, [], 0, True
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)


def _put(base: Path, rel: str, data: bytes) -> str:
    p = base / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _blob(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_download_verifies_and_skips_present(server, tmp_path):
    data = {"a/x.bin": _blob(70_000, 1), "b c/y.npy": _blob(1234, 2)}
    manifest = {rel: _put(server.base, rel, d) for rel, d in data.items()}
    dest = tmp_path / "dest"
    paths = fetch.fetch_files(manifest, dest, base_url=server.url)
    assert paths == [dest / rel for rel in manifest]
    for rel, d in data.items():
        assert (dest / rel).read_bytes() == d
    assert not list(dest.rglob("*.part"))
    n = len(server.requests)
    fetch.fetch_files(manifest, dest, base_url=server.url)
    assert len(server.requests) == n  # present with the right hash: no request


def test_resume_from_partial_file(server, tmp_path):
    blob = _blob(300_000, 3)
    manifest = {"d/big.bin": _put(server.base, "d/big.bin", blob)}
    dest = tmp_path / "dest"
    part = dest / "d" / "big.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(blob[:100_000])
    fetch.fetch_files(manifest, dest, base_url=server.url)
    assert server.requests == [("/d/big.bin", "bytes=100000-")]
    assert server.sent == 200_000  # only the missing tail was sent
    assert (dest / "d" / "big.bin").read_bytes() == blob
    assert not part.exists()


def test_stale_partial_file_restarts_once(server, tmp_path):
    blob = _blob(50_000, 4)
    manifest = {"s.bin": _put(server.base, "s.bin", blob)}
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "s.bin.part").write_bytes(b"\x00" * 1000)  # wrong prefix
    fetch.fetch_files(manifest, dest, base_url=server.url)
    assert [r for _, r in server.requests] == ["bytes=1000-", None]
    assert (dest / "s.bin").read_bytes() == blob


def test_server_without_range_support(server, tmp_path):
    server.ranges = False
    blob = _blob(40_000, 5)
    manifest = {"n.bin": _put(server.base, "n.bin", blob)}
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "n.bin.part").write_bytes(blob[:10_000])
    fetch.fetch_files(manifest, dest, base_url=server.url)
    assert (dest / "n.bin").read_bytes() == blob  # 200 reply: started over, not appended


def test_corrupt_server_file(server, tmp_path):
    good = _blob(20_000, 6)
    manifest = {"c.bin": hashlib.sha256(good).hexdigest()}
    _put(server.base, "c.bin", good[:-1] + bytes([good[-1] ^ 0xFF]))
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=r"c\.bin: SHA-256 mismatch"):
        fetch.fetch_files(manifest, dest, base_url=server.url)
    assert not (dest / "c.bin").exists()
    assert not (dest / "c.bin.part").exists()


def test_http_404(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        fetch.fetch_files({"missing.bin": "0" * 64}, tmp_path / "dest", base_url=server.url)


def test_offline_message(tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=r"cannot reach http://127\.0\.0\.1:\d+/x\.bin: .*use --mirror DIR or download manually"):
        fetch.fetch_files({"x.bin": "0" * 64}, tmp_path / "dest", base_url=f"http://127.0.0.1:{port}", timeout=5)


def test_mirror_copy_and_missing_file(tmp_path):
    mirror = tmp_path / "mirror"
    manifest = {"m/one.bin": _put(mirror, "m/one.bin", _blob(5000, 7))}
    dest = tmp_path / "dest"
    fetch.fetch_files(manifest, dest, mirror=mirror)
    assert (dest / "m/one.bin").read_bytes() == (mirror / "m/one.bin").read_bytes()
    with pytest.raises(DataError, match=r"two\.bin: not found in the mirror"):
        fetch.fetch_files({"m/two.bin": "0" * 64}, dest, mirror=mirror)
    bad = {"m/one.bin": "1" * 64}
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        fetch.fetch_files(bad, tmp_path / "dest2", mirror=mirror)
    assert not (tmp_path / "dest2" / "m" / "one.bin").exists()


def test_manifest_parsing_and_names():
    m = fetch.parse_manifest("# c\n" + "a" * 64 + "  ./x/y.npy\n")
    assert m == {"x/y.npy": "a" * 64}
    with pytest.raises(DataError, match="unsafe path"):
        fetch.parse_manifest("a" * 64 + "  ../etc/passwd\n")
    with pytest.raises(DataError, match=":1: expected"):
        fetch.parse_manifest("nothex  file\n")
    with pytest.raises(UserError, match="unknown data set 'cowley'.*cowley2023"):
        fetch.fetch_dataset("cowley", "x")
    with pytest.raises(UserError, match="not a file of data set"):
        fetch.fetch_dataset("cowley2023", "x", files=["nope.txt"])
    shipped = fetch.read_manifest("cowley2023")
    assert "LICENSE" in shipped and len(shipped) >= 100
    assert all(k.startswith(("data_", "LICENSE")) for k in shipped)


@requires_cowley
def test_shipped_manifest_matches_shared_checksums():
    sums = fetch.parse_manifest((cowley_root() / "SHA256SUMS").read_text())
    sums = {k: v for k, v in sums.items() if k not in ("README.md", "SHA256SUMS")}
    assert fetch.read_manifest("cowley2023") == sums


@requires_cowley
def test_fetch_real_subset_over_http(server, tmp_path):
    files = [
        "LICENSE",
        "data_V4_responses/responses_repeat_averaged/responses_190928.npy",
        "data_V4_responses/responses_repeat_averaged/responses_210305.npy",
        "data_V4_responses/images/images_210305.zip",
    ]
    for rel in files:
        (server.base / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cowley_root() / rel, server.base / rel)
    dest = tmp_path / "cowley"
    paths = fetch.fetch_dataset("cowley2023", dest, base_url=server.url, files=files)
    assert [p.relative_to(dest).as_posix() for p in paths] == [k for k in fetch.read_manifest("cowley2023") if k in files]
    for rel in files:
        assert (dest / rel).read_bytes() == (cowley_root() / rel).read_bytes()
    from synth.data import cowley

    ids, x, rec = cowley.load_session(dest, "210305")  # the fetched layout is the loader's
    assert x.shape[0] == rec.n_stimuli == len(ids)


@requires_cowley
def test_fetch_real_subset_from_mirror(tmp_path):
    files = ["data_V4_responses/responses_repeat_averaged/responses_210325.npy", "data_V4_responses/readme.txt"]
    paths = fetch.fetch_dataset("cowley2023", tmp_path / "m", mirror=str(cowley_root()), files=files)
    assert all(p.exists() for p in paths) and len(paths) == 2
