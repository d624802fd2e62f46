"""The build sandbox's pure argv builder (moat.runtime.container.build.build_argv, issue 12)."""

from __future__ import annotations

from pathlib import Path

from moat.runtime.container import build as b
from moat.runtime.container.bwrap import HOST_ETC


def _pairs(argv: list[str], flag: str) -> list[tuple[str, str]]:
    return [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == flag]


def test_step_argv_is_isolated_and_fails_closed() -> None:
    spec = b.BuildSpec("bld-0123456789abcdef", Path("/L/root"), ("/bin/sh", "-c", "true"))
    argv = b.build_argv(spec, seccomp_fd=5, info_fd=6, block_fd=7)
    command = " ".join(argv).partition(" -- ")[2]
    flags = ("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
             "--unshare-cgroup", "--die-with-parent", "--new-session", "--clearenv")  # fmt: skip
    for flag in flags:
        assert flag in argv
    assert "--unshare-user" not in argv  # joins the mapped namespace made for it
    assert argv[argv.index("--seccomp") + 1] == "5"
    assert argv[argv.index("--info-fd") + 1] == "6" and argv[argv.index("--block-fd") + 1] == "7"
    assert ("/L/root", "/") in _pairs(argv, "--bind")
    # no capability beyond the package-install set, none of the host's files
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    caps = [argv[i + 1] for i, a in enumerate(argv) if a == "--cap-add"]
    assert set(caps) == set(b.CAPS) and "CAP_SYS_ADMIN" not in caps
    assert "/usr" not in [dst for _, dst in _pairs(argv, "--ro-bind")]
    env = dict(_pairs(argv, "--setenv"))
    assert env["http_proxy"] == env["https_proxy"] == f"http://127.0.0.1:{b.PROXY_PORT}"
    assert command == "/bin/sh -c true"


def test_host_root_argv_sees_usr_and_a_vetted_etc_only() -> None:
    spec = b.BuildSpec(
        "bld-0123456789abcdef",
        Path("/L/t"),
        ("mmdebstrap",),
        host_root=True,
        inputs=Path("/L/in"),
        ca_file=Path("/site/ca.pem"),
    )
    argv = b.build_argv(spec, 5, 6, 7)
    assert ("/usr", "/usr") in _pairs(argv, "--ro-bind")
    etc = [dst for _, dst in _pairs(argv, "--ro-bind-try") if dst.startswith("/etc")]
    assert etc and all(e.removeprefix("/etc/") in HOST_ETC for e in etc)
    assert "/etc/passwd" not in etc and "/etc/shadow" not in etc
    assert ("/L/t", "/target") in _pairs(argv, "--bind")
    assert ("/L/in", b.INPUT_DIR) in _pairs(argv, "--ro-bind")
    assert ("/site/ca.pem", b.CA_FILE) in _pairs(argv, "--ro-bind")
    env = dict(_pairs(argv, "--setenv"))
    assert env["PIP_CERT"] == env["SSL_CERT_FILE"] == b.CA_FILE


def test_read_only_root() -> None:
    spec = b.BuildSpec("bld-0123456789abcdef", Path("/R"), ("true",), read_only=True)
    assert ("/R", "/") in _pairs(b.build_argv(spec, 5, 6, 7), "--ro-bind")
