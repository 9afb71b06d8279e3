"""The fast tar member reader agrees with tarfile on every archive it reads, hands the
archives it does not parse to tarfile, and fails on damage as tarfile does."""

from __future__ import annotations

import io
import tarfile

import pytest

from vae_scale.data.streaming.tar_members import tar_members


def make_tar(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


MEMBERS = [
    ("s0.npy", bytes(range(256)) * 3),
    ("s0.cls", b"7"),
    ("s1.npy", b""),  # empty member: no data blocks
    ("s1.cls", b"3"),
    ("deep/dir/" + "x" * 90 + ".png", b"\x89PNG" * 130),  # ustar prefix field
    ("s2.json", b'{"a": 1}' * 64),  # exactly 512 bytes: no padding block
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_members_as_tarfile(fmt):
    data = make_tar(MEMBERS, fmt)
    assert list(tar_members(data)) == tarfile_members(data) == MEMBERS


def test_long_names_beyond_ustar_go_through_tarfile():
    members = [("n" * 300 + ".npy", b"abc"), ("short.cls", b"1")]  # needs pax / GNU records
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        assert list(tar_members(make_tar(members, fmt))) == members


def test_directories_and_meta_members_are_skipped():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name in ("__index__", "a.cls"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"1"))
    assert list(tar_members(buf.getvalue())) == [("a.cls", b"1")]


def test_truncated_archive_yields_members_before_the_damage_then_raises():
    data = make_tar(MEMBERS)
    # cut inside the 5th member's content: the first four come out, then the error
    cut = data.index(b"\x89PNG") + 100
    got = []
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        for member in tar_members(data[:cut]):
            got.append(member)
    assert got == MEMBERS[:4]
    with pytest.raises(tarfile.ReadError, match="unexpected end of data at byte"):
        list(tar_members(data[: 512 * 3 + 100]))  # cut inside a header


def test_bad_header_checksum_raises():
    data = bytearray(make_tar(MEMBERS))
    second_header = 512 + 1024  # s0.npy: header + 768 bytes padded to 1024
    assert data[second_header : second_header + 6] == b"s0.cls"
    data[second_header] = ord("t")
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_members(bytes(data)))
    with pytest.raises(tarfile.ReadError):  # tarfile agrees the archive is damaged
        tarfile_members(bytes(data)[second_header:])


def test_non_utf8_names_go_through_tarfile():
    members = [("caf\udce9.npy", b"abc")]  # a latin-1 byte, as tarfile's surrogateescape shows it
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf,
        mode="w",
        format=tarfile.USTAR_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    ) as tar:
        info = tarfile.TarInfo(members[0][0])
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    data = buf.getvalue()
    assert b"caf\xe9.npy" in data[:100]
    assert [content for _, content in tar_members(data)] == [b"abc"]


def test_signed_checksums_of_old_tars_are_accepted():
    data = bytearray(make_tar([("\u00e9t\u00e9.cls", b"1")]))  # UTF-8 bytes >= 0x80 in the name
    header = bytes(data[:512])
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + b" " * 8 + header[156:])
    data[148:156] = f"{signed:06o}\0 ".encode()
    assert (
        list(tar_members(bytes(data)))
        == tarfile_members(bytes(data))
        == [("\u00e9t\u00e9.cls", b"1")]
    )
