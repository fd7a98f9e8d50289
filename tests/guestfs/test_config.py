"""guestfs.config: sizes, FUSE option filtering, mount validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guestfs.cli import build_parser, mount_config
from guestfs.config import (
    MAX_SIZE,
    PAGE_SIZE,
    MountConfig,
    parse_fuse_options,
    parse_pages,
    parse_seconds,
    parse_size,
    size_to_pages,
)


@pytest.mark.parametrize("text, expected", [
    ("4096", 4096), ("0", 0), ("16K", 16384), ("16k", 16384), ("64M", 64 << 20), ("1G", 1 << 30),
    ("2MiB", 2 << 20), ("8KB", 8192), (" 3M ", 3 << 20),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-1", "1.5M", "12X", "ten", "1 M B", "0x10"])
def test_parse_size_rejects_with_one_line(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert "\n" not in str(info.value) and repr(text) in str(info.value)


UNITS = {"": 1, "K": 1024, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@given(st.integers(min_value=0, max_value=1 << 40), st.sampled_from(list(UNITS)))
def test_parse_size_scales_binary_units_up_to_one_tib(number: int, unit: str) -> None:
    size = number * UNITS[unit]
    if size <= MAX_SIZE:
        assert parse_size(f"{number}{unit}") == size
    else:
        with pytest.raises(ValueError, match="larger than the 1 TiB limit"):
            parse_size(f"{number}{unit}")


def test_huge_sizes_are_refused_not_turned_into_floats() -> None:
    assert parse_size("1T") == MAX_SIZE == 1 << 40
    with pytest.raises(ValueError) as info:
        parse_pages("99999999999999G", "--page-cache")
    assert str(info.value) == "--page-cache: size '99999999999999G' is larger than the 1 TiB limit"


@given(st.integers(min_value=0, max_value=1 << 80))
def test_size_to_pages_is_exact_integer_ceil(nbytes: int) -> None:
    pages = size_to_pages(nbytes)
    assert isinstance(pages, int) and (pages - 1) * PAGE_SIZE < nbytes <= pages * PAGE_SIZE or nbytes == pages == 0


def test_sizes_round_up_to_pages() -> None:
    assert [size_to_pages(n) for n in (0, 1, 4096, 4097, 8192)] == [0, 1, 1, 2, 2]
    assert size_to_pages((1 << 60) + 1) == (1 << 48) + 1  # a float division would lose the +1
    assert parse_pages("8K", "--page-cache") == 2
    assert parse_pages("1K", "--tmem") == parse_pages("1", "--tmem") == 1  # what the error below promises
    with pytest.raises(ValueError) as info:
        parse_pages("0", "--page-cache")
    assert "at least 1 byte" in str(info.value) and "4096-byte pages" in str(info.value)


@pytest.mark.parametrize("text, allow_zero", [("nan", True), ("inf", True), ("-inf", False), ("-1", True),
                                              ("0", False), ("-0.0", False), ("soon", True)])
def test_parse_seconds_refuses_non_finite_and_out_of_range(text: str, allow_zero: bool) -> None:
    with pytest.raises(ValueError, match="--x must be"):
        parse_seconds(text, "--x", allow_zero=allow_zero)


def test_parse_seconds_accepts() -> None:
    assert parse_seconds("0", "--x", allow_zero=True) == 0.0 and parse_seconds("2.5", "--x", allow_zero=False) == 2.5


def test_fuse_options_whitelist() -> None:
    assert parse_fuse_options(["allow_other,fsname=x", "noatime"]) == ("allow_other", "fsname=x", "noatime")
    for bad in ("direct_io", "kernel_cache", "allow_other=1", "fsname"):
        with pytest.raises(ValueError, match="not a supported FUSE option"):
            parse_fuse_options([bad])


@pytest.mark.parametrize("bad, message", [
    ("entry_timeout=abc", "must be a number of seconds"),
    ("negative_timeout=-1", "finite number of seconds >= 0"),
    ("entry_timeout=nan", "finite number of seconds >= 0"),
    ("fsname=", "needs a value"),
    ("subtype=x", "not a supported FUSE option"),  # the type `guestfs umount` checks for
])
def test_fuse_option_values_checked_before_mounting(bad: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_fuse_options([bad])
    assert parse_fuse_options(["entry_timeout=0.5,negative_timeout=0"]) == ("entry_timeout=0.5", "negative_timeout=0")


def test_parse_seconds_maximum() -> None:
    assert parse_seconds("3600", "--x", allow_zero=True, maximum=3600) == 3600.0
    with pytest.raises(ValueError, match=r"--x must be a finite number of seconds >= 0 and <= 3600, got '3601'"):
        parse_seconds("3601", "--x", allow_zero=True, maximum=3600)


def make_dirs(tmp_path: Path) -> tuple[Path, Path]:
    source, mnt = tmp_path / "src", tmp_path / "mnt"
    source.mkdir()
    mnt.mkdir()
    return source, mnt


def test_mount_config_validates_paths(tmp_path: Path) -> None:
    source, mnt = make_dirs(tmp_path)
    (tmp_path / "file").write_text("x")
    cases = [
        (tmp_path / "missing", mnt, "does not exist"),
        (tmp_path / "file", mnt, "is not a directory"),
        (source, tmp_path / "file", "is not a directory"),
        (source, tmp_path / "missing", "is not a directory"),
        (source, source, "must differ"),
        (source, source / "inner", "must not contain each other"),
        (mnt / "inner", mnt, "must not contain each other"),
    ]
    (source / "inner").mkdir()
    (mnt / "inner").mkdir()
    for src, mountpoint, message in cases:
        with pytest.raises(ValueError, match=message):
            MountConfig.create(str(src), str(mountpoint))


@pytest.mark.parametrize("option, value, message", [
    ("abi", "v2", "--abi"), ("fold", "crc", "--v0-fold"), ("host_spec", "v9", "--host-spec"),
    ("binding", "llfuse", "--fuse"), ("attr_timeout", -1.0, "--attr-timeout"), ("server", "127.0.0.1:1", "--server"),
    ("page_cache_pages", 0, "at least one page"), ("threads", "many", "--threads"),
    ("attr_timeout", float("nan"), "--attr-timeout"), ("attr_timeout", float("inf"), "--attr-timeout"),
    ("client_id", 0, "--client-id"), ("client_id", 0xFFFF, "--client-id"), ("server", "tcp:x", "--server"),
])
def test_mount_config_validates_options(tmp_path: Path, option: str, value: object, message: str) -> None:
    source, mnt = make_dirs(tmp_path)
    with pytest.raises(ValueError, match=message):
        MountConfig.create(str(source), str(mnt), **{option: value})


def test_to_args_roundtrips_through_the_cli_parser(tmp_path: Path) -> None:
    source, mnt = make_dirs(tmp_path)
    embedded = MountConfig.create(str(source), str(mnt), page_cache_pages=3, tmem_pages=70, abi="v0", fold="ino",
                                  compress=True, read_only=True, host_spec="both", client_id=7, binding="fusepy",
                                  attr_timeout=0.25, threads="multi", fuse_options=("noatime", "fsname=z"),
                                  first_chance="daemon")
    remote = MountConfig.create(str(source), str(mnt), abi="v1", server="tcp:127.0.0.1:9",
                                read_only=True, attr_timeout=0.0, backing_direct=True)
    for config in (embedded, remote):
        args = build_parser().parse_args(["mount", str(source), str(mnt), *config.to_args()])
        assert mount_config(args) == config


def test_embedded_host_options_with_server_are_refused(tmp_path: Path) -> None:
    source, mnt = make_dirs(tmp_path)
    with pytest.raises(ValueError, match="--compress needs the embedded host"):
        MountConfig.create(str(source), str(mnt), compress=True, server="unix:/run/tmemd.sock")
    with pytest.raises(ValueError, match="--host-spec configures the embedded host"):
        MountConfig.create(str(source), str(mnt), host_spec="v0", server="unix:/run/tmemd.sock")


def test_stack_config_carries_the_cache_settings(tmp_path: Path) -> None:
    source, mnt = make_dirs(tmp_path)
    stack_config = MountConfig.create(str(source), str(mnt), page_cache_pages=5, tmem_pages=9, abi="v1",
                                      client_id=3, first_chance="daemon").stack_config()
    assert (stack_config.page_cache_pages, stack_config.tmem_pages, stack_config.abi) == (5, 9, "v1")
    assert stack_config.client_id == 3 and stack_config.first_chance == "daemon"
    default = MountConfig.create(str(source), str(mnt), backing_direct=True).stack_config()
    assert default.client_id is None and default.first_chance == "kernel" and default.backing_direct


def test_page_cache_is_refused_with_the_kernel_first_chance(tmp_path: Path) -> None:
    source, mnt = make_dirs(tmp_path)
    with pytest.raises(ValueError, match="--first-chance daemon"):
        MountConfig.create(str(source), str(mnt), page_cache_pages=5)
    with pytest.raises(ValueError, match="--first-chance must be one of kernel, daemon"):
        MountConfig.create(str(source), str(mnt), first_chance="both")
