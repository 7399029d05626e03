"""stages.lib.fetch against a local HTTP server on 127.0.0.1 (no other network)."""
from __future__ import annotations

import base64
import hashlib
import http.server
import io
import logging
import stat
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.lib import fetch
from stages.lib.fetch import ChecksumError, FetchError, fetch_raw

ROLES = ("train_images", "test_images", "test_labels", "clicks", "breeds")
FAST = {"retries": 3, "timeout_s": 5.0, "backoff_s": 0.01}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(role: str, n: int = 2000) -> bytes:
    """Distinct, deterministic TSV-like content per role."""
    return "".join(f"{role}-{i}\tvalue {i * 7919 % 1000}\n" for i in range(n)).encode()


class Server:
    """A threaded HTTP server on 127.0.0.1 with Range support and scripted faults."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop_first: set[str] = set()    # first GET of these paths: send half, then close
        self.ignore_range = False            # answer Range requests with the whole file (200)
        self.status: dict[str, int] = {}     # path -> error status to answer with
        self.stall_first: dict[str, float] = {}  # path -> seconds to wait before the first answer
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.redirect: dict[str, str] = {}   # path -> Location of a 302
        self.endless: set[str] = set()       # paths answered with bytes until the client hangs up
        self.auth: list[tuple[str, str | None]] = []  # (path, Authorization header) of every GET
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                with server._lock:
                    first = all(p != self.path for p, _ in server.requests)
                    server.requests.append((self.path, self.headers.get("Range")))
                    server.auth.append((self.path, self.headers.get("Authorization")))
                if first and self.path in server.stall_first:
                    time.sleep(server.stall_first[self.path])
                if self.path in server.status:
                    self.send_error(server.status[self.path])
                    return
                if self.path in server.redirect:
                    self.send_response(302)
                    self.send_header("Location", server.redirect[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path in server.endless:  # no Content-Length: the body ends when the connection does
                    self.send_response(200)
                    self.end_headers()
                    self.close_connection = True
                    try:
                        while True:
                            self.wfile.write(b"x" * 65536)
                    except OSError:
                        return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, rng = 0, self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
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
                self.end_headers()
                if first and self.path in server.drop_first:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def add(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.url(path)

    def hits(self, path: str) -> list[str | None]:
        return [rng for p, rng in self.requests if p == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def no_netrc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home folder of the test's own for every test here (fetch reads ~/.netrc): the developer's
    credentials are neither sent to the test server nor able to change a result."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def serve_roles(server: Server, roles=ROLES) -> tuple[dict[str, dict[str, str]], dict[str, bytes]]:
    data = {r: payload(r) for r in roles}
    files = {r: {"url": server.add(f"/{r}.tsv", d), "sha256": sha(d)} for r, d in data.items()}
    return files, data


def make_tar(members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return buf.getvalue()


def assert_only(out: Path, names: set[str]) -> None:
    assert {p.name for p in out.iterdir()} == names


def test_url_download_places_roles_and_checksums(server: Server, tmp_path: Path) -> None:
    files, data = serve_roles(server, ROLES + ("truth",))
    out = tmp_path / "raw"
    sums = fetch_raw(files, out, source="url", **FAST)
    for role, content in data.items():
        assert (out / f"{role}.tsv").read_bytes() == content
        assert sums[f"{role}.tsv"] == sha(content)
    assert_only(out, {f"{r}.tsv" for r in data} | {"SHA256SUMS"})
    lines = (out / "SHA256SUMS").read_text().splitlines()
    assert lines == [f"{sha(data[r])}  {r}.tsv" for r in sorted(data)]
    assert list(sums) == sorted(sums)


def test_resume_after_connection_dropped_mid_file(server: Server, tmp_path: Path) -> None:
    files, data = serve_roles(server)
    server.drop_first.add("/clicks.tsv")
    fetch_raw(files, tmp_path / "raw", source="url", **FAST)
    assert (tmp_path / "raw" / "clicks.tsv").read_bytes() == data["clicks"]
    first, second = server.hits("/clicks.tsv")
    assert first is None and second == f"bytes={len(data['clicks']) // 2}-"


def test_server_ignoring_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    files, data = serve_roles(server)
    server.drop_first.add("/breeds.tsv")
    server.ignore_range = True
    fetch_raw(files, tmp_path / "raw", source="url", **FAST)
    assert (tmp_path / "raw" / "breeds.tsv").read_bytes() == data["breeds"]
    assert len(server.hits("/breeds.tsv")) == 2


def test_resume_across_runs_and_stale_part_is_replaced(server: Server, tmp_path: Path) -> None:
    files, data = serve_roles(server)
    cache = tmp_path / "cache"
    cache.mkdir()
    good, bad = data["clicks"], data["breeds"]
    (cache / f"{sha(good)}.part").write_bytes(good[:500])          # a genuine prefix: resumed
    (cache / f"{sha(bad)}.part").write_bytes(b"X" * 100)           # another file's bytes: redone
    fetch_raw(files, tmp_path / "raw", source="url", cache_dir=cache, **FAST)
    assert server.hits("/clicks.tsv") == ["bytes=500-"]
    assert server.hits("/breeds.tsv") == ["bytes=100-", None]
    assert (tmp_path / "raw" / "breeds.tsv").read_bytes() == bad
    assert not list(cache.glob("*.part"))
    server.requests.clear()  # a second run reuses the verified cache
    fetch_raw(files, tmp_path / "raw2", source="url", cache_dir=cache, **FAST)
    assert server.requests == []


def test_timeout_is_retried(server: Server, tmp_path: Path) -> None:
    files, data = serve_roles(server)
    server.stall_first["/test_labels.tsv"] = 1.0
    fetch_raw(files, tmp_path / "raw", source="url", retries=2, timeout_s=0.2, backoff_s=0.01)
    assert (tmp_path / "raw" / "test_labels.tsv").read_bytes() == data["test_labels"]


def test_wrong_checksum_is_clear_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    files, data = serve_roles(server)
    wrong = "0" * 64
    files["clicks"] = {**files["clicks"], "sha256": wrong}
    out, cache = tmp_path / "raw", tmp_path / "cache"
    out.mkdir()
    (out / "clicks.tsv").write_text("stale from an earlier run\n")
    with pytest.raises(ChecksumError) as err:
        fetch_raw(files, out, source="url", cache_dir=cache, **FAST)
    msg = str(err.value)
    assert "clicks" in msg and wrong in msg and sha(data["clicks"]) in msg
    assert_only(out, set())
    assert not list(cache.glob(f"{wrong}*"))


@pytest.mark.parametrize(("status", "attempts"), [(503, 4), (404, 1)])
def test_http_errors_retry_only_when_transient(server: Server, tmp_path: Path, status: int, attempts: int) -> None:
    files, _ = serve_roles(server)
    server.status["/clicks.tsv"] = status
    with pytest.raises(FetchError, match=str(status) if status == 404 else "giving up"):
        fetch_raw(files, tmp_path / "raw", source="url", **FAST)
    assert len(server.hits("/clicks.tsv")) == attempts
    assert_only(tmp_path / "raw", set())


def test_tar_gz_members_from_one_download(server: Server, tmp_path: Path) -> None:
    members = {r: payload(r, 300) for r in ROLES}
    archive = make_tar({f"./clickture/{r}.tsv": d for r, d in members.items()} | {"../evil": b"x"})
    url = server.add("/clickture.tar.gz", archive)
    files = {r: {"url": url, "sha256": sha(archive), "member": f"clickture/{r}.tsv"} for r in ROLES}
    out = tmp_path / "raw"
    sums = fetch_raw(files, out, source="url", **FAST)
    assert len(server.hits("/clickture.tar.gz")) == 1
    for role, content in members.items():
        assert (out / f"{role}.tsv").read_bytes() == content
        assert sums[f"{role}.tsv"] == sha(content)
    assert_only(out, {f"{r}.tsv" for r in ROLES} | {"SHA256SUMS"})
    assert not (tmp_path / "evil").exists()


def _link(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    ("member", "error"),
    [
        ("../evil", ValueError),         # refused by name before the download
        ("/abs/evil", ValueError),
        ("link", FetchError),            # symlink to /etc/passwd inside the archive
        ("hard", FetchError),            # hard link
        ("dev", FetchError),             # character device
        ("missing.tsv", FetchError),
    ],
)
def test_malicious_tar_refused(server: Server, tmp_path: Path, member: str, error: type) -> None:
    archive = make_tar(
        {"../evil": b"x", "/abs/evil": b"x", "ok.tsv": b"a\tb\n"},
        [_link("link", tarfile.SYMTYPE, "/etc/passwd"), _link("hard", tarfile.LNKTYPE, "ok.tsv"),
         _link("dev", tarfile.CHRTYPE)],
    )
    url = server.add("/bad.tar.gz", archive)
    files = {r: {"url": url, "sha256": sha(archive), "member": "ok.tsv"} for r in ROLES}
    files["clicks"] = {**files["clicks"], "member": member}
    with pytest.raises(error, match="member|no member"):
        fetch_raw(files, tmp_path / "raw", source="url", **FAST)
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())
    assert not (tmp_path / "evil").exists() and not (tmp_path / "abs").exists()


@pytest.mark.parametrize(("member", "error"), [("../evil", ValueError), ("link", FetchError)])
def test_malicious_zip_refused(tmp_path: Path, member: str, error: type) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../evil", b"x")
        zf.writestr("ok.tsv", b"a\tb\n")
        link = zipfile.ZipInfo("link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    files = {r: {"path": str(archive), "member": "ok.tsv"} for r in ROLES}
    files["clicks"] = {**files["clicks"], "member": member}
    with pytest.raises(error, match="member"):
        fetch_raw(files, tmp_path / "raw", source="path")
    assert not (tmp_path / "evil").exists()
    files["clicks"]["member"] = "ok.tsv"  # the same archive's safe member is fine
    fetch_raw(files, tmp_path / "raw", source="path")
    assert (tmp_path / "raw" / "clicks.tsv").read_bytes() == b"a\tb\n"


def test_path_source_copies_and_verifies(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    files = {}
    for role in ROLES:
        (src / f"{role}.tsv").write_bytes(payload(role, 50))
        files[role] = {"path": str(src / f"{role}.tsv")}
    files["breeds"]["sha256"] = sha(payload("breeds", 50))
    out = tmp_path / "raw"
    sums = fetch_raw(files, out, source="path")
    for role in ROLES:
        placed = out / f"{role}.tsv"
        assert not placed.is_symlink() and placed.read_bytes() == payload(role, 50)
    assert sums["breeds.tsv"] == files["breeds"]["sha256"]
    files["breeds"]["sha256"] = "f" * 64
    with pytest.raises(ChecksumError, match="breeds"):
        fetch_raw(files, out, source="path")
    assert_only(out, set())


@pytest.mark.parametrize(
    ("change", "source", "match"),
    [
        (lambda f: f.pop("breeds"), "url", r"missing required role\(s\) \['breeds'\]"),
        (lambda f: f.update(dogs={"url": "http://127.0.0.1/x", "sha256": "0" * 64}), "url", "unknown role"),
        (lambda f: f["breeds"].pop("sha256"), "url", r"breeds: missing \['sha256'\]"),
        (lambda f: f["breeds"].pop("url"), "url", r"breeds: missing \['url'\]"),
        (lambda f: f["breeds"].update(sha256="abc"), "url", "64 hex"),
        (lambda f: f["breeds"].update(url="file:///etc/passwd"), "url", "http"),
        (lambda f: f["breeds"].update(url="http://127.0.0.1/a.tar.gz"), "url", "member"),
        (lambda f: None, "ftp", "data.source"),
        (lambda f: None, "path", r"missing \['path'\]"),
    ],
)
def test_bad_params_fail_before_any_request(tmp_path: Path, change, source: str, match: str) -> None:
    files = {r: {"url": f"http://127.0.0.1:9/{r}.tsv", "sha256": "0" * 64} for r in ROLES}
    change(files)
    with pytest.raises(ValueError, match=match):
        fetch_raw(files, tmp_path / "raw", source=source)
    assert not (tmp_path / "raw").exists()


def test_module_roles_match_layout() -> None:
    # a release with weak labels in its image file has no click log: clicks is optional
    assert fetch.REQUIRED_ROLES == tuple(r for r in ROLES if r != "clicks")
    assert fetch.OPTIONAL_ROLES == ("clicks", "truth")


def test_an_endless_response_stops_at_the_size_in_params(server: Server, tmp_path: Path) -> None:
    files, _ = serve_roles(server)
    files["clicks"] = {"url": server.url("/endless"), "sha256": sha(b"1234"), "size": 4}
    server.endless.add("/endless")
    with pytest.raises(FetchError, match=r"clicks .*: the server sent more than the 4 bytes of data.files size"):
        fetch_raw(files, tmp_path / "raw", source="url", retries=0, backoff_s=0)
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def test_a_size_that_contradicts_the_server_is_an_error(server: Server, tmp_path: Path) -> None:
    files, data = serve_roles(server)
    files["clicks"]["size"] = len(data["clicks"]) + 1
    with pytest.raises(FetchError, match=f"announces {len(data['clicks'])} bytes, data.files gives size"):
        fetch_raw(files, tmp_path / "raw", source="url", retries=0, backoff_s=0)
    files["clicks"]["size"] = "12"
    with pytest.raises(ValueError, match=r"data.files.clicks: size must be the download's length in bytes"):
        fetch_raw(files, tmp_path / "raw", source="url", retries=0, backoff_s=0)


def test_redirects_are_followed_to_http_only(server: Server, tmp_path: Path) -> None:
    files, data = serve_roles(server)
    server.redirect["/moved"] = "/clicks.tsv"  # http -> http: followed
    files["clicks"]["url"] = server.url("/moved")
    fetch_raw(files, tmp_path / "raw", source="url", retries=0, backoff_s=0)
    assert (tmp_path / "raw" / "clicks.tsv").read_bytes() == data["clicks"]
    server.redirect["/elsewhere"] = "ftp://127.0.0.1/clicks.tsv"
    files["clicks"]["url"] = server.url("/elsewhere")
    with pytest.raises(FetchError, match=r"redirected to 'ftp://127.0.0.1/clicks.tsv'; only http\(s\)"):
        fetch_raw(files, tmp_path / "raw2", source="url", retries=0, backoff_s=0)


# --- credentials: from the environment (data.files.<role>.auth_env) or ~/.netrc, never from params ---

TOKEN_VAR = "CLICKDOG_TEST_TOKEN"
SECRET = "s3cr3t-7f1e9c0a-never-on-disk"


def assert_secret_nowhere(secret: str, folders: list[Path], *texts: str) -> None:
    """Neither the secret nor its base64 (basic auth) in any file under ``folders`` nor in ``texts``."""
    needles = [secret.encode(), base64.b64encode(secret.encode())]
    files = [p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()]
    assert files, "nothing was written: the scan would prove nothing"
    for path in files:
        data = path.read_bytes()
        assert not any(n in data for n in needles), f"the secret is in {path}"
    for text in texts:
        assert not any(n.decode() in text for n in needles), "the secret is in the log output"


def test_token_from_auth_env_is_sent_and_written_nowhere(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture, no_netrc: Path,
) -> None:
    monkeypatch.setenv(TOKEN_VAR, f"Bearer {SECRET}")
    files, data = serve_roles(server)
    for spec in files.values():
        spec["auth_env"] = TOKEN_VAR
    server.redirect["/moved"] = "/clicks.tsv"  # the same host: the header goes along
    files["clicks"]["url"] = server.url("/moved")
    caplog.set_level(logging.DEBUG)
    out, cache = tmp_path / "raw", tmp_path / "cache"
    fetch_raw(files, out, source="url", cache_dir=cache, **FAST)
    assert (out / "clicks.tsv").read_bytes() == data["clicks"]
    assert len(server.auth) == len(ROLES) + 1
    assert all(header == f"Bearer {SECRET}" for _, header in server.auth)
    printed = capfd.readouterr()
    assert_secret_nowhere(SECRET, [out, cache], caplog.text, printed.out, printed.err)


def test_authorization_is_not_sent_to_another_host_on_redirect(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_netrc: Path,
) -> None:
    monkeypatch.setenv(TOKEN_VAR, f"Bearer {SECRET}")
    files, data = serve_roles(server)
    other = Server()  # another port: another origin, as for requests and browsers
    try:
        files["clicks"] = {"url": server.url("/away"), "sha256": sha(data["clicks"]), "auth_env": TOKEN_VAR}
        server.redirect["/away"] = other.add("/clicks.tsv", data["clicks"])
        fetch_raw(files, tmp_path / "raw", source="url", **FAST)
        assert ("/away", f"Bearer {SECRET}") in server.auth
        assert other.auth == [("/clicks.tsv", None)]
        assert (tmp_path / "raw" / "clicks.tsv").read_bytes() == data["clicks"]
    finally:
        other.close()


def test_netrc_credentials_are_sent_as_basic_auth(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture, no_netrc: Path,
) -> None:
    netrc_file = no_netrc / ".netrc"
    netrc_file.write_text(f"machine 127.0.0.1 login alice password {SECRET}\n")
    netrc_file.chmod(0o600)  # netrc refuses a password in a file others can read
    files, _ = serve_roles(server)
    caplog.set_level(logging.DEBUG)
    fetch_raw(files, tmp_path / "raw", source="url", cache_dir=tmp_path / "cache", **FAST)
    basic = "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()
    assert {header for _, header in server.auth} == {basic}
    assert_secret_nowhere(SECRET, [tmp_path / "raw", tmp_path / "cache"], caplog.text)
    assert_secret_nowhere(basic.removeprefix("Basic "), [tmp_path / "raw", tmp_path / "cache"], caplog.text)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"url": f"http://alice:{SECRET}@127.0.0.1:9/x.tsv"}, r"credentials in the url .*auth_env.*\.netrc"),
        ({"url": "http://alice@127.0.0.1:9/x.tsv"}, r"credentials in the url .*auth_env.*\.netrc"),
        ({"auth_env": "CLICKDOG_TEST_UNSET_VAR"}, r"data.files.clicks.auth_env: environment variable "
                                                  r"CLICKDOG_TEST_UNSET_VAR is not set"),
        ({"auth_env": "not a name"}, r"auth_env must name an environment variable"),
    ],
)
def test_bad_credentials_params_fail_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_netrc: Path, spec: dict, match: str,
) -> None:
    monkeypatch.delenv("CLICKDOG_TEST_UNSET_VAR", raising=False)
    files = {r: {"url": f"http://127.0.0.1:9/{r}.tsv", "sha256": "0" * 64} for r in ROLES}
    files["clicks"].update(spec)
    with pytest.raises(ValueError, match=match) as err:
        fetch_raw(files, tmp_path / "raw", source="url", retries=0, backoff_s=0)
    assert SECRET not in str(err.value)
    assert not (tmp_path / "raw").exists()


def test_a_header_value_with_a_line_break_is_refused_without_echoing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_netrc: Path,
) -> None:
    monkeypatch.setenv(TOKEN_VAR, f"Bearer {SECRET}\r\nX-Injected: 1")
    files = {r: {"url": f"http://127.0.0.1:9/{r}.tsv", "sha256": "0" * 64, "auth_env": TOKEN_VAR} for r in ROLES}
    with pytest.raises(ValueError, match=f"{TOKEN_VAR} holds a line break") as err:
        fetch_raw(files, tmp_path / "raw", source="url", retries=0, backoff_s=0)
    assert SECRET not in str(err.value)


# --- a download whose length nobody gives is capped by data.max_download_mb ---

def test_a_chunked_response_without_size_stops_at_max_download_mb(server: Server, tmp_path: Path) -> None:
    files, _ = serve_roles(server)
    files["clicks"] = {"url": server.url("/endless?sig=abc"), "sha256": sha(b"1234")}
    server.endless.add("/endless?sig=abc")
    cache = tmp_path / "cache"
    with pytest.raises(FetchError) as err:
        fetch_raw(files, tmp_path / "raw", source="url", cache_dir=cache, retries=0, backoff_s=0,
                  max_download_mb=0.5)
    msg = str(err.value)
    assert f"clicks ({server.url('/endless')})" in msg and "sig=abc" not in msg
    assert "data.max_download_mb" in msg and "0.5 MB" in msg and "data.files.clicks.size" in msg
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())
    assert not list(cache.glob("*.part"))  # no partial download kept either (the verified ones stay, for reuse)


def test_a_content_length_above_max_download_mb_is_refused_unless_size_is_given(
    server: Server, tmp_path: Path,
) -> None:
    files, data = serve_roles(server)
    big = b"y" * 1_500_000
    files["clicks"] = {"url": server.add("/big.tsv", big), "sha256": sha(big)}
    with pytest.raises(FetchError, match=r"clicks .*/big.tsv\): the server announces 1500000 bytes, more than "
                                         r"data.max_download_mb"):
        fetch_raw(files, tmp_path / "raw", source="url", cache_dir=tmp_path / "cache", retries=0, backoff_s=0,
                  max_download_mb=1)
    assert not list((tmp_path / "cache").glob("*.part"))
    files["clicks"]["size"] = len(big)  # a size in params is the author's word: it replaces the cap
    fetch_raw(files, tmp_path / "raw", source="url", retries=0, backoff_s=0, max_download_mb=1)
    assert (tmp_path / "raw" / "clicks.tsv").read_bytes() == big


def test_max_download_mb_must_be_positive(tmp_path: Path) -> None:
    files = {r: {"url": f"http://127.0.0.1:9/{r}.tsv", "sha256": "0" * 64} for r in ROLES}
    with pytest.raises(ValueError, match=r"data.max_download_mb must be > 0"):
        fetch_raw(files, tmp_path / "raw", source="url", max_download_mb=0)


def test_a_broken_netrc_is_named_without_quoting_it(server: Server, tmp_path: Path, no_netrc: Path) -> None:
    netrc_file = no_netrc / ".netrc"
    netrc_file.write_text(f"machine 127.0.0.1 login alice {SECRET}\n")  # "password" forgotten
    netrc_file.chmod(0o600)
    files, _ = serve_roles(server)
    with pytest.raises(FetchError, match=r"\.netrc, line \d+: cannot read this netrc file") as err:
        fetch_raw(files, tmp_path / "raw", source="url", retries=0, backoff_s=0)
    # the parse error, which quotes the token, is not chained into the traceback either
    assert SECRET not in str(err.value) and err.value.__cause__ is None and err.value.__suppress_context__
