"""guestfs.config: sizes, FUSE option filtering, mount validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guestfs.cli import build_parser, mount_config
from guestfs.config import MountConfig, parse_fuse_options, parse_pages, parse_size, size_to_pages


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


@given(st.integers(min_value=0, max_value=1 << 40), st.sampled_from(["", "K", "M", "G"]))
def test_parse_size_scales_binary_units(number: int, unit: str) -> None:
    assert parse_size(f"{number}{unit}") == number * {"": 1, "K": 1024, "M": 1 << 20, "G": 1 << 30}[unit]


def test_sizes_round_up_to_pages() -> None:
    assert [size_to_pages(n) for n in (0, 1, 4096, 4097, 8192)] == [0, 1, 1, 2, 2]
    assert parse_pages("8K", "--page-cache") == 2
    with pytest.raises(ValueError, match="at least 4096 bytes"):
        parse_pages("0", "--page-cache")


def test_fuse_options_whitelist() -> None:
    assert parse_fuse_options(["allow_other,fsname=x", "noatime"]) == ("allow_other", "fsname=x", "noatime")
    for bad in ("direct_io", "kernel_cache", "allow_other=1", "fsname"):
        with pytest.raises(ValueError, match="not a supported FUSE option"):
            parse_fuse_options([bad])


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
])
def test_mount_config_validates_options(tmp_path: Path, option: str, value: object, message: str) -> None:
    source, mnt = make_dirs(tmp_path)
    with pytest.raises(ValueError, match=message):
        MountConfig.create(str(source), str(mnt), **{option: value})


def test_to_args_roundtrips_through_the_cli_parser(tmp_path: Path) -> None:
    source, mnt = make_dirs(tmp_path)
    config = MountConfig.create(str(source), str(mnt), page_cache_pages=3, tmem_pages=70, abi="v0", fold="ino",
                                compress=True, read_only=True, host_spec="both", server="tcp:127.0.0.1:9",
                                binding="fusepy", attr_timeout=0.25, threads="multi", fuse_options=("noatime", "fsname=z"))
    args = build_parser().parse_args(["mount", str(source), str(mnt), *config.to_args()])
    assert mount_config(args) == config


def test_stack_config_carries_the_cache_settings(tmp_path: Path) -> None:
    source, mnt = make_dirs(tmp_path)
    stack_config = MountConfig.create(str(source), str(mnt), page_cache_pages=5, tmem_pages=9, abi="v1").stack_config()
    assert (stack_config.page_cache_pages, stack_config.tmem_pages, stack_config.abi) == (5, 9, "v1")
