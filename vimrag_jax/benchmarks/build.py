"""Builds one benchmark's TFDS dataset from its raw release; nothing is downloaded.

    python -m vimrag_jax.benchmarks.build --benchmark=NAME --manual_dir=RAW --data_dir=OUT
        [--format=raw|universalrag|vrag] [--overwrite]

``NAME`` is one of ``hotpotqa squad webqa slidevqa mmlongbench_doc lvbench wikihowqa
syntheticqa xvbench``; ``RAW`` holds the release in its published layout (the files each
benchmark expects are listed in ``docs/benchmarks_data.md`` and by the error when none is
found); the dataset is written to ``OUT/NAME/FORMAT/1.0.0/`` as array_record and read back
with `vimrag_jax.benchmarks.load`. ``--format`` (default ``raw``, the benchmark's own release)
picks a derived subset instead where the benchmark has one: ``universalrag`` (hotpotqa, squad,
webqa, lvbench, wikihowqa, syntheticqa) or ``vrag`` (slidevqa, mmlongbench_doc). A built
dataset is reused unless ``--overwrite`` (which removes it first). A malformed raw file stops
the build with an error naming the file and record, and leaves no dataset behind.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from absl import app, flags

from vimrag_jax import benchmarks
from vimrag_jax.benchmarks.raw import RAW, MissingRawFiles, RawFormatError, find_split_files

_FLAGS: dict[str, flags.FlagHolder] = {}


def build(
    name: str,
    *,
    manual_dir: str | Path,
    data_dir: str | Path,
    config: str = "raw",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Builds benchmark ``name`` from ``manual_dir`` into ``data_dir``; returns split -> count.

    Raises ``ValueError`` for an unknown name, `MissingRawFiles` when ``manual_dir`` holds
    none of the benchmark's files and `RawFormatError` for a malformed one.
    """
    import tensorflow_datasets as tfds

    dataset = benchmarks.builder(name, data_dir=data_dir, config=config)
    found = find_split_files(name, manual_dir, dataset.split_files)
    for split, candidates in dataset.split_files.items():
        where = found[split] if split in found else f"not found ({' or '.join(candidates)})"
        log(f"{name} {split}: {where}")
    if dataset.is_prepared() and not overwrite:
        log(f"{name}: already built in {dataset.data_path}; reused (--overwrite rebuilds it)")
    mode = tfds.download.GenerateMode
    config = tfds.download.DownloadConfig(
        manual_dir=str(manual_dir),
        download_mode=mode.REUSE_CACHE_IF_EXISTS if overwrite else mode.REUSE_DATASET_IF_EXISTS,
    )
    # Nothing is downloaded; a throwaway download_dir keeps TFDS's empty downloads/ folders
    # out of data_dir.
    with tempfile.TemporaryDirectory(prefix="vimrag_benchmarks_") as downloads:
        dataset.download_and_prepare(download_dir=downloads, download_config=config)
    counts = {split: info.num_examples for split, info in dataset.info.splits.items()}
    for split, count in counts.items():
        log(f"{name} {split}: {count} examples")
    log(f"{name}: {dataset.data_path}")
    return counts


def _define_flags() -> None:
    # Defined only when run as a program, so importing this module defines no global flags.
    _FLAGS.update(
        benchmark=flags.DEFINE_enum("benchmark", None, benchmarks.NAMES, "Benchmark to build."),
        manual_dir=flags.DEFINE_string("manual_dir", None, "The raw release (published layout)."),
        data_dir=flags.DEFINE_string("data_dir", None, "Where TFDS datasets are written."),
        format=flags.DEFINE_enum(
            "format", RAW, [RAW, "universalrag", "vrag"], "Raw release or a derived subset."
        ),
        overwrite=flags.DEFINE_bool("overwrite", False, "Rebuild an already built dataset."),
    )
    flags.mark_flags_as_required(["benchmark", "manual_dir", "data_dir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    value = {name: holder.value for name, holder in _FLAGS.items()}
    start = time.perf_counter()
    try:
        build(
            value["benchmark"],
            manual_dir=value["manual_dir"],
            data_dir=value["data_dir"],
            config=value["format"],
            overwrite=value["overwrite"],
        )
    except (MissingRawFiles, RawFormatError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"built {value['benchmark']} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
