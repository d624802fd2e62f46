"""``/files`` through a real ``moat serve`` and the unmodified E2B SDK (E2B-WIRE.md §2b).

Signed URLs fetched with plain httpx as a browser would (no sandbox headers, no token), gzip
both ways, multipart uploads, ``X-Metadata-*`` round trips, and the error statuses. What is
checked is what reached the client and what is in the sandbox afterwards.
"""

from __future__ import annotations

import gzip
import os
import time
import urllib.parse
import zlib
from collections.abc import Iterator

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import (
    AuthenticationException,
    InvalidArgumentException,
    NotEnoughSpaceException,
    NotFoundException,
)
from e2b.sandbox.filesystem.filesystem import WriteEntry
from tests.conftest import require_tier
from tests.server_support import Server, new_key, serving, tenant_name

pytestmark = [pytest.mark.container, pytest.mark.slow]


#: A moat profile (a templateID to the server) with a 2 MiB disk: for the 507 test.
_POLICY = """
[profiles.tinydisk]
isolation = "container"
limits = { disk_mb = 2 }
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_tier("container")
    where = tmp_path_factory.mktemp("serve")
    policy = where / "moat.toml"
    policy.write_text(_POLICY)
    policy.chmod(0o600)
    saved = os.environ.get("MOAT_POLICY_FILE")
    os.environ["MOAT_POLICY_FILE"] = str(policy)
    try:
        with serving(where / "server.log") as srv:
            yield srv
    finally:
        if saved is None:
            os.environ.pop("MOAT_POLICY_FILE", None)
        else:
            os.environ["MOAT_POLICY_FILE"] = saved


@pytest.fixture(scope="module")
def key(server: Server) -> str:
    return new_key(tenant_name("files"))


@pytest.fixture(scope="module")
def sbx(key: str) -> Iterator[Sandbox]:
    s = Sandbox.create(api_key=key, timeout=300, secure=True)
    yield s
    s.kill()


def _headers(s: Sandbox) -> dict[str, str]:
    token = s._envd_access_token
    assert token is not None
    return {"E2b-Sandbox-Id": s.sandbox_id, "E2b-Sandbox-Port": "49983", "X-Access-Token": token}


def _with(url: str, **changes: str | None) -> str:
    """``url`` with query parameters replaced (None: removed)."""
    parts = urllib.parse.urlsplit(url)
    q = dict(urllib.parse.parse_qsl(parts.query))
    for k, val in changes.items():
        if val is None:
            q.pop(k, None)
        else:
            q[k] = val
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q)))


# -- signed URLs -----------------------------------------------------------------------------


def test_secure_create_gives_an_access_token(sbx: Sandbox) -> None:
    assert sbx._envd_access_token and sbx._envd_version.base_version == "0.6.4"


def test_signed_download_and_upload_urls_work_like_a_browser(sbx: Sandbox) -> None:
    sbx.files.write("signed/a.txt", "signed content")
    for url in (
        sbx.download_url("signed/a.txt"),  # user "" (default), no expiration
        sbx.download_url("signed/a.txt", "user"),
        sbx.download_url("signed/a.txt", use_signature_expiration=120),
    ):
        assert "signature=v1_" in url
        r = httpx.get(url, timeout=30)  # no sandbox headers, no token: the link alone
        assert r.status_code == 200, r.text
        assert r.content == b"signed content"
    up = sbx.upload_url("signed/up.txt", use_signature_expiration=120)
    r = httpx.post(up, files={"file": ("ignored-name.txt", b"from a browser")}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()[0]["path"] == "/home/user/signed/up.txt"
    assert sbx.files.read("signed/up.txt") == "from a browser"
    # A signed /health answers for the sandbox its headers name, without the token.
    hdr = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
    health = sbx.download_url("signed/a.txt").replace("/files?", "/health?")
    assert httpx.get(health, headers=hdr, timeout=30).status_code == 204
    assert httpx.get(_with(health, signature="v1_x"), headers=hdr, timeout=30).status_code == 401
    unsigned = httpx.get(health.split("?")[0], headers=hdr, timeout=30)
    assert unsigned.status_code == 502 and "was not found" in unsigned.text


def test_signed_urls_refuse_anything_they_were_not_signed_for(key: str, sbx: Sandbox) -> None:
    sbx.files.write("signed/b.txt", "b")
    url = sbx.download_url("signed/b.txt", "user", use_signature_expiration=120)
    assert httpx.get(url, timeout=30).status_code == 200  # positive control
    expired = sbx.download_url("signed/b.txt", "user", use_signature_expiration=-120)
    r = httpx.get(expired, timeout=30)
    assert r.status_code == 401
    assert r.json() == {"code": 401, "message": "signature is already expired"}
    wrong = [
        _with(url, path="signed/a.txt"),  # another path
        _with(url, username=None),  # another user ("" was not signed)
        _with(url, signature_expiration=str(int(time.time()) + 9999)),  # a longer life
        _with(url, signature="v1_" + "A" * 43),
    ]
    for bad in wrong:
        r = httpx.get(bad, timeout=30)
        assert (r.status_code, r.json()) == (401, {"code": 401, "message": "invalid signature"})
    # A read signature does not upload, nor a write signature download.
    r = httpx.post(url, files={"file": ("x", b"x")}, timeout=30)
    assert r.status_code == 401
    assert sbx.files.read("signed/b.txt") == "b"
    up = sbx.upload_url("signed/b.txt", "user")
    assert httpx.get(up, timeout=30).status_code == 401
    # Another sandbox's signature, even naming this sandbox in the headers, opens nothing;
    # an unknown sandbox id answers exactly the same (invariant 11).
    other = Sandbox.create(api_key=new_key(tenant_name("other")), timeout=120, secure=True)
    try:
        theirs = other.download_url("/home/user/signed/b.txt")
        hdr = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
        r1 = httpx.get(theirs, headers=hdr, timeout=30)
        r2 = httpx.get(theirs, headers={**hdr, "E2b-Sandbox-Id": "sbx-0000"}, timeout=30)
        assert r1.status_code == r2.status_code == 401 and r1.json() == r2.json()
        r3 = httpx.get(theirs, timeout=30)  # headerless: finds the other sandbox, no file
        assert r3.status_code == 404
    finally:
        other.kill()
    # The token still works as before; a wrong token is an unknown sandbox, signed or not.
    r = httpx.get(url, headers={**_headers(sbx), "X-Access-Token": "nope"}, timeout=30)
    assert r.status_code == 502 and "was not found" in r.text


def test_another_user_is_401(sbx: Sandbox) -> None:
    # A user moat does not have is 401 as envd answers; root is a user moat knows (the
    # container tier's root: docs/users.md), in signed URLs too.
    sbx.files.write("u.txt", "u")
    with pytest.raises(AuthenticationException):
        sbx.files.read("u.txt", user="admin")
    signed = sbx.download_url("u.txt", "admin")
    assert httpx.get(signed, timeout=30).status_code == 401
    assert sbx.files.read("u.txt", user="root") == "u"
    signed = sbx.download_url("u.txt", "root")
    got = httpx.get(signed, timeout=30)
    assert got.status_code == 200 and got.text == "u"


# -- gzip ------------------------------------------------------------------------------------


def test_gzip_both_ways(server: Server, sbx: Sandbox) -> None:
    text = "gzip me " * 1000
    info = sbx.files.write("gz/a.txt", text, gzip=True)
    assert info.path == "/home/user/gz/a.txt"
    assert sbx.files.read("gz/a.txt", gzip=True) == text
    assert sbx.files.read("gz/a.txt") == text
    infos = sbx.files.write_files(
        [WriteEntry(path="gz/m1.txt", data="one"), WriteEntry(path="gz/m2.txt", data="two")],
        gzip=True,
    )
    assert [i.path for i in infos] == ["/home/user/gz/m1.txt", "/home/user/gz/m2.txt"]
    assert sbx.files.read("gz/m2.txt") == "two"
    # On the wire: gzip when asked for, identity otherwise.
    h = _headers(sbx)
    params = {"path": "gz/a.txt"}
    with httpx.stream("GET", server.url + "/files", params=params,
                      headers={**h, "Accept-Encoding": "gzip"}, timeout=30) as r:  # fmt: skip
        raw = b"".join(r.iter_raw())
        assert r.headers["content-encoding"] == "gzip"
    assert len(raw) < len(text) // 10 and gzip.decompress(raw) == text.encode()
    plain = {**h, "Accept-Encoding": "identity"}  # httpx asks for gzip by default
    r = httpx.get(server.url + "/files", params=params, headers=plain, timeout=30)
    assert "content-encoding" not in r.headers and r.content == text.encode()
    r = httpx.get(server.url + "/files", params=params,
                  headers={**h, "Accept-Encoding": "br, identity;q=0"}, timeout=30)  # fmt: skip
    assert r.status_code == 406
    r = httpx.post(server.url + "/files", params={"path": "gz/br.txt"}, content=b"x",
                   headers={**h, "Content-Type": "application/octet-stream",
                            "Content-Encoding": "br"}, timeout=30)  # fmt: skip
    assert r.status_code == 400 and "Content-Encoding" in r.json()["message"]
    r = httpx.post(server.url + "/files", params={"path": "gz/bad.txt"}, content=b"not gzip",
                   headers={**h, "Content-Type": "application/octet-stream",
                            "Content-Encoding": "gzip"}, timeout=30)  # fmt: skip
    assert r.status_code == 400
    assert not sbx.files.exists("gz/br.txt") and not sbx.files.exists("gz/bad.txt")


def _hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_gzip_bomb_hits_the_body_cap_while_streaming(server: Server, sbx: Sandbox) -> None:
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b"\0" * (1 << 20)
    bomb = b"".join(comp.compress(chunk) for _ in range(1024)) + comp.flush()  # 1 GiB of zeros
    assert len(bomb) < 2 << 20
    before = _hwm_kib(server.proc.pid)
    r = httpx.post(
        server.url + "/files", params={"path": "bomb.bin"}, content=bomb,
        headers={**_headers(sbx), "Content-Type": "application/octet-stream",
                 "Content-Encoding": "gzip"}, timeout=120,
    )  # fmt: skip
    assert r.status_code == 413, r.text
    grown_mib = (_hwm_kib(server.proc.pid) - before) / 1024
    assert grown_mib < 256, f"the server's peak memory grew by {grown_mib:.0f} MiB"
    assert not sbx.files.exists("bomb.bin")
    assert server.healthy() and sbx.files.read("gz/m1.txt") == "one"


# -- multipart -------------------------------------------------------------------------------


def test_multipart_several_files_and_a_single_one_with_path(server: Server, sbx: Sandbox) -> None:
    h = _headers(sbx)
    files = [
        ("file", ("/home/user/mp/deep/er/one.txt", b"one")),
        ("file", ("mp/two.txt", b"two")),
        ("other", ("ignored.txt", b"not a file part")),
        ("file", ("/tmp/mp3.bin", os.urandom(70_000))),
    ]
    r = httpx.post(server.url + "/files", files=files, headers=h, timeout=30)
    assert r.status_code == 200, r.text
    got = r.json()
    assert [e["path"] for e in got] == [
        "/home/user/mp/deep/er/one.txt", "/home/user/mp/two.txt", "/tmp/mp3.bin",
    ]  # fmt: skip
    assert all(e["type"] == "file" and "metadata" not in e for e in got)
    assert sbx.files.read("mp/deep/er/one.txt") == "one"
    assert bytes(sbx.files.read("/tmp/mp3.bin", format="bytes")) == files[3][1][1]
    assert not sbx.files.exists("ignored.txt")
    # One file: `path` names the destination, whatever the part's filename.
    r = httpx.post(server.url + "/files", params={"path": "mp/by-path.txt"},
                   files={"file": ("whatever.txt", b"p")}, headers=h, timeout=30)  # fmt: skip
    assert r.status_code == 200 and r.json()[0]["path"] == "/home/user/mp/by-path.txt"
    assert not sbx.files.exists("whatever.txt")
    # Two parts to one place, or no file part at all: 400, nothing written.
    dup = [("file", ("mp/dup.txt", b"1")), ("file", ("mp/dup.txt", b"2"))]
    r = httpx.post(server.url + "/files", files=dup, headers=h, timeout=30)
    assert r.status_code == 400 and not sbx.files.exists("mp/dup.txt")
    r = httpx.post(server.url + "/files", files={"x": ("a", b"b")}, headers=h, timeout=30)
    assert r.status_code == 400
    r = httpx.post(server.url + "/files", content=b"--x\r\nbroken",
                   headers={**h, "Content-Type": "multipart/form-data; boundary=x"},
                   timeout=30)  # fmt: skip
    assert r.status_code == 400


# -- metadata --------------------------------------------------------------------------------


def test_metadata_round_trip(sbx: Sandbox) -> None:
    meta = {"author": "mish", "purpose": "upload"}
    info = sbx.files.write("md/a.txt", "a", metadata=meta)
    assert info.metadata == meta
    assert sbx.files.get_info("md/a.txt").metadata == meta
    listed = {e.name: e.metadata for e in sbx.files.list("md")}
    assert listed == {"a.txt": meta}
    assert sbx.files.rename("md/a.txt", "md/b.txt").metadata == meta
    infos = sbx.files.write_files([WriteEntry(path="md/c.txt", data="c")],
                                  metadata={"Mixed-Case": "v"}, use_octet_stream=True)  # fmt: skip
    assert infos[0].metadata == {"mixed-case": "v"}  # keys are lowercased, as envd's are
    # Overwriting without metadata clears it.
    assert sbx.files.write("md/b.txt", "again").metadata is None
    assert sbx.files.get_info("md/b.txt").metadata is None
    # Checked on the host: the file is not even created.
    with pytest.raises(InvalidArgumentException):
        sbx.files.write("md/big.txt", "x", metadata={"k": "v" * 5000})
    assert not sbx.files.exists("md/big.txt")


def test_metadata_set_inside_is_shown_when_valid_and_left_out_when_not(
    server: Server, sbx: Sandbox
) -> None:
    sbx.files.write("md/x.txt", "x")
    code = (
        "import os; p='/home/user/md/x.txt'; "
        "os.setxattr(p, 'user.e2b.author', b'mish'); "
        "os.setxattr(p, 'user.e2b.bad', b'\\x1b[31m\\xff'); "
        "os.setxattr(p, 'user.other', b'not ours'); "
        "os.setxattr(p, 'user.e2b.k' + 'x' * 230, b'v' * 3000); "
        "os.setxattr(p, 'user.e2b.zz', b'v' * 3000)"
    )
    r = sbx.commands.run(f'python3 -c "{code}"')
    assert r.exit_code == 0, r.stderr
    got = sbx.files.get_info("md/x.txt").metadata
    assert got is not None and got["author"] == "mish"
    assert "bad" not in got and "other" not in got  # not printable ASCII / not user.e2b.
    total = sum(9 + len(k) + len(val) for k, val in got.items())
    assert total <= 4096 and len(got) == 2  # the 4 KiB cap held: one long entry fits
    assert sbx.is_running()


def test_bad_metadata_headers_are_400(server: Server, sbx: Sandbox) -> None:
    h = {**_headers(sbx), "Content-Type": "application/octet-stream"}
    for bad in ({"X-Metadata-" + "k" * 247: "v"}, {"X-Metadata-a": "v" * 4100}):
        r = httpx.post(server.url + "/files", params={"path": "md/h.txt"}, content=b"x",
                       headers={**h, **bad}, timeout=30)  # fmt: skip
        assert r.status_code == 400, r.text
    r = httpx.post(server.url + "/files", params={"path": "md/h.txt"}, content=b"x",
                   headers=[*((k.encode(), v.encode()) for k, v in h.items()),
                            (b"X-Metadata-a", "caf\u00e9".encode())],
                   timeout=30)  # fmt: skip
    assert r.status_code == 400
    assert not sbx.files.exists("md/h.txt")


# -- statuses --------------------------------------------------------------------------------


def test_download_of_an_unusual_name(server: Server, sbx: Sandbox) -> None:
    name = 'caf\u00e9 "q"\\.txt'
    sbx.files.write(f"odd/{name}", "odd")
    r = httpx.get(server.url + "/files", params={"path": f"odd/{name}"}, headers=_headers(sbx),
                  timeout=30)  # fmt: skip
    assert r.status_code == 200 and r.content == b"odd"
    disp = r.headers["content-disposition"]
    assert disp.isascii() and "filename*=UTF-8''caf%C3%A9%20%22q%22%5C.txt" in disp


def test_error_statuses(server: Server, sbx: Sandbox) -> None:
    with pytest.raises(NotFoundException):
        sbx.files.read("nope/missing.txt")
    h = _headers(sbx)
    r = httpx.get(server.url + "/files", params={"path": "/home/user"}, headers=h, timeout=30)
    assert r.status_code == 400
    sbx.files.make_dir("adir")
    octet = {**h, "Content-Type": "application/octet-stream"}
    r = httpx.post(
        server.url + "/files", params={"path": "adir"}, content=b"x", headers=octet, timeout=30
    )
    assert r.status_code == 400
    r = httpx.post(server.url + "/files", params={"path": "x"}, content=b"x",
                   headers={**h, "Content-Type": "text/plain"}, timeout=30)  # fmt: skip
    assert r.status_code == 400


def test_a_full_disk_is_507_not_enough_space(key: str) -> None:
    small = Sandbox.create("tinydisk", api_key=key, timeout=120)
    try:
        with pytest.raises(NotEnoughSpaceException):  # one file over the limit (EFBIG)
            small.files.write("big.bin", os.urandom(3 << 20))
        small.files.remove("big.bin")  # what was written before the limit stays, as in E2B
        small.files.write("a.bin", os.urandom(1200 << 10))
        with pytest.raises(NotEnoughSpaceException):  # the disk is full (ENOSPC)
            small.files.write("b.bin", os.urandom(1200 << 10))
        small.files.remove("a.bin")
        small.files.remove("b.bin")
        small.files.write("small.txt", "still writable")  # positive control: a write fits
        assert small.files.read("small.txt") == "still writable"
    finally:
        small.kill()
