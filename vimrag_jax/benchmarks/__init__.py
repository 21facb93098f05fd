"""The paper's nine benchmarks as TFDS datasets (array_record), built from their raw releases.

Build one with ``python -m vimrag_jax.benchmarks.build --benchmark=NAME --manual_dir=RAW
--data_dir=OUT`` (`vimrag_jax.benchmarks.build`; layouts and splits in
``docs/benchmarks_data.md``; ``--format=universalrag|vrag`` reads a derived subset instead,
`vimrag_jax.benchmarks.derived`), then read it with `load`, a random-access
``tfds.data_source`` whose examples follow `vimrag_jax.benchmarks.features` (``id``,
``question``, ``answers``, ``answer_format``, ``choices``, ``evidence``, ``metadata``).

The learner, eval and the corpus builder feed it to grain::

    import grain
    from vimrag_jax import benchmarks

    source = benchmarks.load("hotpotqa", data_dir=OUT, split="validation")
    questions = (
        grain.MapDataset.source(source)
        .map(lambda ex: {"id": ex["id"].decode(), "question": ex["question"].decode(),
                         "answers": [a.decode() for a in ex["answers"]]})
    )
    questions[0]  # random access; .shuffle(seed=...), .batch(...), .to_iter_dataset() as usual

Strings come back as ``bytes`` (`features.as_text` decodes either), sequences as lists, and
``evidence`` as a dict of lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vimrag_jax.benchmarks.documents import MMLongBenchDoc, SlideVQA
from vimrag_jax.benchmarks.raw import RAW, MissingRawFiles, RawBenchmark, RawFormatError
from vimrag_jax.benchmarks.text_qa import HotpotQA, SQuAD
from vimrag_jax.benchmarks.videos import LVBench, SyntheticQA, WikiHowQA, XVBench
from vimrag_jax.benchmarks.web import WebQA

BUILDERS: dict[str, type[RawBenchmark]] = {
    b.name: b
    for b in (
        HotpotQA,
        SQuAD,
        WebQA,
        SlideVQA,
        MMLongBenchDoc,
        LVBench,
        WikiHowQA,
        SyntheticQA,
        XVBench,
    )
}
NAMES: tuple[str, ...] = tuple(BUILDERS)

__all__ = ["BUILDERS", "NAMES", "MissingRawFiles", "RawFormatError", "builder", "load"]


def builder(name: str, *, data_dir: str | Path, config: str = RAW) -> RawBenchmark:
    """The TFDS builder of benchmark ``name`` writing to / reading from ``data_dir``.

    ``config`` is ``"raw"`` (the benchmark's own release) or a derived subset the benchmark
    also reads (``"universalrag"``, ``"vrag"``; see `vimrag_jax.benchmarks.derived`).
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(NAMES)}")
    configs = [RAW, *BUILDERS[name].DERIVED]
    if config not in configs:
        raise ValueError(f"{name} has no format {config!r}; it reads {', '.join(configs)}")
    return BUILDERS[name](data_dir=str(data_dir), config=config)


def load(
    name: str, *, data_dir: str | Path, split: str, config: str = RAW
) -> Sequence[dict[str, Any]]:
    """The built benchmark ``name``'s ``split`` as a random-access ``tfds.data_source``.

    ``config`` picks the raw release (default) or a derived subset, as in `builder`;
    ``split`` may be a TFDS slice such as ``"validation[:100]"``.

    Raises ``FileNotFoundError`` when the benchmark has not been built into ``data_dir``
    (including after a failed build, which leaves nothing behind), and ``ValueError`` for an
    unknown name or split.
    """
    dataset = builder(name, data_dir=data_dir, config=config)
    if not dataset.is_prepared():
        raise FileNotFoundError(
            f"benchmark {name!r} is not built in {data_dir} (no {dataset.data_path}); build it "
            f"with python -m vimrag_jax.benchmarks.build --benchmark={name} "
            f"--format={config} --manual_dir=RAW --data_dir={data_dir}"
        )
    splits = list(dataset.info.splits)
    if split.split("[")[0] not in splits:  # "validation[:100]" and the like are TFDS slices
        raise ValueError(f"{name} in {data_dir} has splits {splits}, not {split!r}")
    return dataset.as_data_source(split=split)
