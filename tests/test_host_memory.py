"""Huge pages for the host heap: the environment rule, and the re-executed process for real."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from vimrag_jax import host_memory
from vimrag_jax.host_memory import HUGE_PAGE_TUNABLE, huge_page_environment

GLIBC = (2, 36)


def test_adds_the_tunable_and_keeps_the_rest_of_the_environment():
    env = huge_page_environment({"PATH": "/bin"}, thp="madvise", glibc=GLIBC)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": HUGE_PAGE_TUNABLE}
    env = huge_page_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp="always", glibc=GLIBC
    )
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGE_PAGE_TUNABLE}"}


@pytest.mark.parametrize(
    "environ,thp,glibc",
    [
        ({"GLIBC_TUNABLES": HUGE_PAGE_TUNABLE}, "madvise", GLIBC),  # already there: no loop
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC),  # the user's choice
        ({"VIMRAG_HUGE_PAGES": "0"}, "madvise", GLIBC),  # opted out
        ({}, "never", GLIBC),  # the kernel has them off
        ({}, None, GLIBC),  # no THP file (not Linux, or a kernel without THP)
        ({}, "madvise", (2, 34)),  # glibc before the tunable
        ({}, "madvise", None),  # another C library
    ],
)
def test_no_change_where_it_cannot_help_or_is_decided(environ, thp, glibc):
    assert huge_page_environment(environ, thp=thp, glibc=glibc) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert host_memory.thp_mode(str(path)) == "always"
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def test_glibc_version_matches_the_platform_module():
    name, version = platform.libc_ver()
    if name == "glibc":
        assert host_memory.glibc_version() == tuple(int(p) for p in version.split(".")[:2])
    else:
        assert host_memory.glibc_version() is None


_CHILD = textwrap.dedent(
    """
    import os
    from vimrag_jax import host_memory
    print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
    host_memory.reexec_with_huge_pages()
    import numpy as np
    block = np.ones(64 * 2**20 // 4, np.float32)  # 64 MiB: above glibc's mmap threshold
    with open("/proc/self/smaps_rollup") as f:
        huge_kb = next(int(l.split()[1]) for l in f if l.startswith("AnonHugePages:"))
    print("end", os.getpid(), os.environ.get("GLIBC_TUNABLES"), huge_kb >= 32 * 1024)
    """
)


def _run_child(**env: str) -> list[list[str]]:
    ours = ("GLIBC_TUNABLES", "VIMRAG_HUGE_PAGES")
    environ = {k: v for k, v in os.environ.items() if k not in ours}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        env={**environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [line.split() for line in proc.stdout.splitlines()]


def test_the_process_re_executes_once_and_its_heap_gets_huge_pages():
    supported = host_memory.thp_mode() in ("always", "madvise") and (
        host_memory.glibc_version() or (0, 0)
    ) >= (2, 35)
    lines = _run_child()
    if supported:
        # Started without the tunable, replaced itself (same PID) once, and a large block is
        # backed by transparent huge pages.
        (start, pid, before), (again, pid2, tunables), (end, pid3, after, huge) = lines
        assert (start, before, again, end) == ("start", "None", "start", "end")
        assert pid == pid2 == pid3 and tunables == after == HUGE_PAGE_TUNABLE
        assert huge == "True"
    else:
        assert [line[0] for line in lines] == ["start", "end"]
    # Opted out: no re-execution, 4 KiB pages.
    lines = _run_child(VIMRAG_HUGE_PAGES="0")
    assert [line[0] for line in lines] == ["start", "end"] and lines[-1][2] == "None"
