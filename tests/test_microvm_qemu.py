"""Pure parts of the microvm tier: the QEMU argv builder (golden files), sizing, cpio."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from moat.errors import InvalidArgumentError
from moat.runtime.microvm import cpio, qemu
from moat.runtime.microvm.guest_init import INIT_SCRIPT
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
        ("template", {"qmp_fd": 4}),
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
