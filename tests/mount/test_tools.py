"""Tools people use on a mount: cp -a, tar, git, grep -r, python, and fio with crc32c verification."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from guestfs.pageio import wait_until_cacheable
from tests.mount.conftest import FIRST_CHANCES

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120, method="thread")]

MountFactory = Callable[..., Any]


def run(*command: str, cwd: Path | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result.stdout


def make_project(root: Path) -> None:
    (root / "pkg" / "sub").mkdir(parents=True)
    for index in range(30):
        (root / "pkg" / f"mod{index}.py").write_text(f"VALUE_{index} = {index}\n" + "# filler\n" * index * 40)
    (root / "pkg" / "sub" / "data.bin").write_bytes(os.urandom(300_000))
    os.symlink("mod1.py", root / "pkg" / "alias.py")
    os.link(root / "pkg" / "mod2.py", root / "pkg" / "mod2-hardlink.py")


def test_cp_tar_grep_python(mount_factory: MountFactory, tmp_path: Path) -> None:
    m = mount_factory("--page-cache", "64K", "--tmem", "4M")
    original = tmp_path / "original"
    original.mkdir()
    make_project(original)
    run("cp", "-a", str(original / "pkg"), str(m.mnt / "pkg"))
    run("diff", "-r", "--no-dereference", str(original / "pkg"), str(m.mnt / "pkg"))
    run("diff", "-r", "--no-dereference", str(original / "pkg"), str(m.source / "pkg"))
    assert os.stat(m.mnt / "pkg" / "mod2-hardlink.py").st_nlink == 2

    run("tar", "-C", str(m.mnt), "-cf", str(tmp_path / "pkg.tar"), "pkg")
    run("tar", "-C", str(m.mnt), "-xf", str(tmp_path / "pkg.tar"), "--one-top-level=unpacked")
    run("diff", "-r", "--no-dereference", str(original / "pkg"), str(m.mnt / "unpacked" / "pkg"))

    wait_until_cacheable(m.source)  # cp -a and tar -x set modes and times: files cache once that settles
    hits = run("grep", "-rl", "VALUE_17 =", str(m.mnt))
    assert sorted(Path(line).name for line in hits.split()) == ["mod17.py", "mod17.py"]  # pkg and unpacked

    script = "import sys; sys.path.insert(0, sys.argv[1]); import pkg.mod29 as m; print(m.VALUE_29)"
    (m.mnt / "pkg" / "__init__.py").write_text("")
    assert run(sys.executable, "-B", "-c", script, str(m.mnt)).strip() == "29"
    stats = m.stats()
    assert stats["puts"] > 0 and stats["succ_gets"] > 0, stats  # the tiny first-chance cache spilled to tmem


def test_git_init_add_commit_log(mount_factory: MountFactory) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    m = mount_factory()
    repo = m.mnt / "repo"
    repo.mkdir()
    make_project(repo)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "init.defaultBranch=main"]
    run(*git, "init", "-q", cwd=repo)
    run(*git, "add", "-A", cwd=repo)
    run(*git, "commit", "-q", "-m", "first", cwd=repo)
    (repo / "pkg" / "mod3.py").write_text("changed\n")
    run(*git, "commit", "-q", "-am", "second", cwd=repo)
    assert run("git", "log", "--format=%s", cwd=repo).split() == ["second", "first"]
    run("git", "fsck", "--strict", cwd=repo)
    assert run("git", "status", "--porcelain", cwd=repo) == ""


# --verify_state_save=0: fio would otherwise leave local-verify-0-verify.state in its working directory
FIO_JOB = ["--name=verify", "--rw=randrw", "--bs=4k", "--size=8M", "--ioengine=psync", "--verify=crc32c",
           "--verify_fatal=1", "--do_verify=1", "--randrepeat=1", "--randseed=7", "--group_reporting",
           "--verify_state_save=0"]


@pytest.mark.parametrize("first_chance", FIRST_CHANCES)
@pytest.mark.parametrize("direct", [0, 1])
def test_fio_randrw_with_crc32c_verify(mount_factory: MountFactory, direct: int, first_chance: str,
                                       tmp_path: Path) -> None:
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    # caches smaller than the file: all tiers work (daemon: first-chance, tmem, backing; kernel: the
    # kernel's page cache, tmem, backing; --page-cache is refused with --first-chance kernel)
    sizes = ["--page-cache", "256K"] if first_chance == "daemon" else []
    m = mount_factory(*sizes, "--tmem", "2M", first_chance=first_chance)
    workdir = tmp_path / "fio-cwd"
    workdir.mkdir()
    state_files_before = set(Path.cwd().glob("*verify.state"))
    result = subprocess.run(["fio", *FIO_JOB, f"--direct={direct}", f"--directory={m.mnt}"],
                            capture_output=True, text=True, timeout=100, cwd=workdir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "verify" in result.stdout and "err= 0" in result.stdout
    assert list(workdir.iterdir()) == [] and set(Path.cwd().glob("*verify.state")) == state_files_before
    stats = m.stats()
    assert stats["first_chance"] == first_chance and stats["bytes_written"] >= 8 << 20, stats  # type: ignore[operator]
