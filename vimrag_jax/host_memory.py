"""Transparent huge pages for the host heap of the CPU entry points (train, eval, worker).

Why: XLA:CPU allocates each execution's temporaries as one block with `malloc` (1.1 GiB for the
benchmark's Qwen3 training step, `benchmarks/model_step.py`). glibc serves blocks above its
mmap threshold (at most 32 MiB) with a fresh `mmap` and returns them with `munmap` on free, so
every step faults the whole block in again, 4 KiB at a time: ~295k minor faults and 0.6 s of
kernel time in a ~2.4 s step on the 2-core CI machine. glibc's `glibc.malloc.hugetlb=1`
tunable (glibc 2.35 and later) makes malloc `madvise(MADV_HUGEPAGE)` the memory it maps, so the
kernel faults the same block in 2 MiB at a time (~1k faults, ~0.15 s). Peak memory is unchanged:
the block is still returned after each step. Measured in docs/benchmarks.md ("Huge pages").

How: glibc reads its tunables once, when the process starts, so `reexec_with_huge_pages`
re-executes the interpreter with the same arguments and `GLIBC_TUNABLES` extended, before the
entry point imports anything heavy (the process keeps its PID; children inherit the setting).
It does nothing when the setting is already there, when the kernel has transparent huge pages
off (`never`), on other C libraries or glibc before 2.35, and when ``VIMRAG_HUGE_PAGES=0``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "VIMRAG_HUGE_PAGES"  # "0" keeps glibc's default 4 KiB pages
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, None under another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    major, minor = (int(part) for part in version.split(".")[:2])
    return major, minor


def huge_page_environment(
    environ: Mapping[str, str],
    *,
    thp: str | None,
    glibc: tuple[int, int] | None,
) -> dict[str, str] | None:
    """`environ` with the huge-page tunable added, or None when it needs or admits no change.

    None when ``VIMRAG_HUGE_PAGES=0``, when `GLIBC_TUNABLES` already sets `glibc.malloc.hugetlb`
    (to any value: the user's choice wins), when the kernel's mode `thp` is "never" or unknown,
    or when `glibc` is not a glibc of at least 2.35 (older ones do not know the tunable).
    Other tunables in `GLIBC_TUNABLES` are kept.
    """
    if environ.get(OPT_OUT, "1").strip() == "0":
        return None
    if thp not in ("always", "madvise") or glibc is None or glibc < _MIN_GLIBC:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(item.split("=")[0] == "glibc.malloc.hugetlb" for item in tunables.split(":")):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGE_TUNABLE}" if tunables else HUGE_PAGE_TUNABLE
    return env


def reexec_with_huge_pages() -> None:
    """Re-executes this process with the huge-page tunable when it helps; returns otherwise.

    Call it first thing in an entry point's ``if __name__ == "__main__":`` (before importing
    jax: the replaced process would only have paid for the import). The new process sees the
    tunable and returns from here at once.
    """
    if sys.platform != "linux":
        return
    env = huge_page_environment(os.environ, thp=thp_mode(), glibc=glibc_version())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
