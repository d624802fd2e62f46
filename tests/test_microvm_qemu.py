"""Pure parts of the microvm tier: the QEMU argv builder (golden files), sizing, cpio."""

from __future__ import annotations

import importlib.util
import stat
from pathlib import Path

import pytest

from moat.errors import InvalidArgumentError
from moat.guest.init import INIT_SCRIPT
from moat.runtime.microvm import cpio, qemu
from moat.runtime.spec import Limits

GOLDEN = Path(__file__).parent / "golden"


def _cfg(**kw: object) -> qemu.VMConfig:
    base: dict[str, object] = {
        "qemu": "qemu-system-x86_64",
        "accel": "tcg",
        "vmlinux": "/state/microvm/artifacts/vmlinux",
        "initrd": "/state/microvm/initrd/0123.cpio",
        "usr_image": "/state/microvm/artifacts/usr.img",
        "memory_mb": 608,
        "cpus": 1,
        "tsc_khz": 2596142,
        "name": "moat-t-0123456789ab",
        "agent_fd": 3,
    }
    base.update(kw)
    return qemu.VMConfig(**base)  # type: ignore[arg-type]


def _check_golden(name: str, argv: list[str]) -> None:
    text = "\n".join(argv) + "\n"
    path = GOLDEN / f"microvm_{name}.txt"
    assert path.read_text() == text, f"argv changed; review and update {path.name}"


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("boot", {}),
        ("restore", {"incoming_fd": 4, "memory_mb": 1120, "cpus": 2}),
        ("base", {"qmp_fd": 4}),
        # every sandbox VM since issue 11: a monitor and guest root's control port
        ("ctl", {"qmp_fd": 4, "ctl_fd": 5, "incoming_fd": 6}),
    ],
)
def test_argv_golden(name: str, kw: dict[str, object]) -> None:
    _check_golden(name, qemu.build_argv(_cfg(**kw)))


def test_argv_has_no_network_and_readonly_usr() -> None:
    argv = qemu.build_argv(_cfg())
    joined = " ".join(argv)
    assert "-nic none" in joined and "-nodefaults" in argv
    assert not any(a.startswith(("virtio-net", "user,", "tap")) for a in argv)
    assert any("readonly=on" in a for a in argv)
    assert any(a.startswith("on,") and "spawn=deny" in a for a in argv)


def test_kvm_uses_host_cpu() -> None:
    argv = qemu.build_argv(_cfg(accel="kvm"))
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-cpu") + 1] == "host"


@pytest.mark.parametrize(
    "kw",
    [
        {"accel": "hvf"},
        {"memory_mb": 64},
        {"cpus": 0},
        {"tsc_khz": 5},
        {"usr_image": "/x,readonly=off"},
    ],
)
def test_config_rejects_bad_values(kw: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        _cfg(**kw)


def test_sizing() -> None:
    assert qemu.vm_memory_mb(Limits(memory_mb=512)) == 512 + qemu.MEMORY_OVERHEAD_MB
    assert qemu.vm_memory_mb(Limits(memory_mb=32)) == qemu.MIN_VM_MB
    assert qemu.vm_cpus(Limits(cpus=0.5)) == 1
    assert qemu.vm_cpus(Limits(cpus=1.5)) == 2


def test_cpio_newc_layout() -> None:
    data = cpio.archive(
        [
            cpio.directory("/"),
            cpio.file("/init", INIT_SCRIPT.encode(), 0o755),
            cpio.symlink("/bin", "usr/bin"),
        ]
    )
    assert len(data) % 512 == 0
    assert data.startswith(b"070701")
    # walk the headers: every member starts 4-aligned, names as given, trailer last
    names, off = [], 0
    while True:
        hdr = data[off : off + 110]
        mode = int(hdr[14:22], 16)
        size = int(hdr[54:62], 16)
        nlen = int(hdr[94:102], 16)
        name = data[off + 110 : off + 110 + nlen - 1].decode()
        names.append(name)
        off += 110 + nlen
        off += (4 - off % 4) % 4
        body = data[off : off + size]
        off += size + (4 - size % 4) % 4
        if name == "TRAILER!!!":
            break
        if name == "init":
            assert stat.S_ISREG(mode) and body.startswith(b"#!")
        if name == "bin":
            assert stat.S_ISLNK(mode) and body == b"usr/bin"
    assert names == [".", "init", "bin", "TRAILER!!!"]


def _members(data: bytes) -> dict[str, bytes]:
    """name -> body of every member of a (possibly concatenated) newc archive; last wins."""
    out: dict[str, bytes] = {}
    off = 0
    while off < len(data):
        if data[off : off + 6] != b"070701":
            off += 1  # zero padding between archives
            continue
        hdr = data[off : off + 110]
        size = int(hdr[54:62], 16)
        nlen = int(hdr[94:102], 16)
        name = data[off + 110 : off + 110 + nlen - 1].decode()
        off += 110 + nlen
        off += (4 - off % 4) % 4
        if name != "TRAILER!!!":
            out[name] = data[off : off + size]
        off += size + (4 - size % 4) % 4
    return out


def test_agent_archive_carries_init_and_compiled_stage2(tmp_path: Path) -> None:
    import marshal
    import sys

    from moat.guest import boot as guest_boot
    from moat.runtime.microvm import initramfs

    (tmp_path / "moat").mkdir()
    (tmp_path / "moat" / "__init__.py").write_text("")
    members = _members(initramfs.agent_archive(tmp_path))
    # /init and stage 2 travel with the agent: changes take effect without a new setup
    assert members["init"] == INIT_SCRIPT.encode()
    source = Path(guest_boot.__file__).read_bytes()
    assert members[".moat/boot.py"] == source
    pyc = members[f".moat/__pycache__/boot.{sys.implementation.cache_tag}.pyc"]
    assert pyc[:4] == importlib.util.MAGIC_NUMBER
    code = marshal.loads(pyc[16:])
    assert code.co_filename == "/.moat/boot.py"


def test_stage2_runs_with_the_agents_flags() -> None:
    from moat.guest import boot as guest_boot
    from moat.guest import init as guest_init
    from moat.runtime import agentdir

    argv = agentdir.agent_argv(channel="/dev/vport0p1")
    assert argv[1:4] == [*guest_init.STAGE2_FLAGS, "-c"]
    assert guest_boot.FLAGS == list(guest_init.STAGE2_FLAGS)
    assert (
        f'python3 {" ".join(guest_init.STAGE2_FLAGS)} -c "{guest_init.STAGE2_CODE}"\n'
        in INIT_SCRIPT
    )
    # the guest's copy of the protocol constants (it runs without the moat package)
    assert guest_boot.MARKER == guest_init.BOOT_MARKER
    assert guest_boot.BASE_REQUEST == guest_init.BASE_REQUEST
    assert guest_boot.WARM_MARKER == guest_init.WARM_MARKER
    assert guest_boot.TOOLS == guest_init.TOOLS


def test_stage2_reads_exactly_one_line() -> None:
    import os

    from moat.guest import boot as guest_boot

    def feed(*chunks: bytes) -> bytes:
        r, w = os.pipe()
        try:
            for c in chunks:
                os.write(w, c)
            os.close(w)
            w = -1
            return guest_boot._read_line(r)
        finally:
            os.close(r)
            if w != -1:
                os.close(w)

    assert feed(b'{"a":', b"1}\n") == b'{"a":1}\n'
    with pytest.raises(ValueError, match="after the host's line"):
        feed(b'{"a":1}\n\x00\x00\x00\x10')  # a frame must not ride along with the config
    with pytest.raises(EOFError):
        feed(b'{"a":1}')
    assert guest_boot._parse_config(b'{"a":1}\n') == {"a": 1}
    with pytest.raises(ValueError, match="not an object"):
        guest_boot._parse_config(b"[1]\n")
