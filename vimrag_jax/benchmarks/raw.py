"""Reading raw benchmark releases, and the TFDS builder base class every benchmark shares.

A builder declares, per split, where its file lies in the release (`RawBenchmark.SPLIT_FILES`,
paths relative to ``manual_dir``) and turns one file into examples (`RawBenchmark.examples`).
Nothing is downloaded. Splits whose file is absent are skipped (a release is often fetched in
part, e.g. only the dev file); a ``manual_dir`` holding none of the files is an error that
names them. A malformed file raises `RawFormatError` naming the file and the record; TFDS writes
into a temporary directory and moves it into place only after every split succeeded, so a
failed build leaves no dataset that `vimrag_jax.benchmarks.load` would accept.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import tensorflow_datasets as tfds

from vimrag_jax.benchmarks import features

VERSION = tfds.core.Version("1.0.0")
_OPTION = re.compile(r"^\(([A-Z])\)\s?(.*)$")
RAW = "raw"  # the builder config that reads the benchmark's own release


class Format(NamedTuple):
    """A derived file format a builder also reads, as a TFDS builder config of that name."""

    description: str
    split_files: dict[str, tuple[str, ...]]
    read: Callable[[Path, str], Iterator[tuple[str, dict[str, Any]]]]


class RawFormatError(ValueError):
    """A raw file does not have its benchmark's published layout; names the file and record."""

    def __init__(self, path: str | Path, record: str, problem: str):
        self.path, self.record = str(path), record
        super().__init__(f"{path}: record {record}: {problem}")


class MissingRawFiles(FileNotFoundError):
    """``manual_dir`` holds none of a benchmark's raw files; names the files expected."""

    def __init__(self, name: str, manual_dir: str | Path, expected: Mapping[str, tuple[str, ...]]):
        listed = "; ".join(f"{split}: {' or '.join(paths)}" for split, paths in expected.items())
        super().__init__(
            f"{name}: none of the raw files was found under {manual_dir}; expected (per split, "
            f"relative to manual_dir) {listed}"
        )


class Record:
    """One raw record with checked field access; errors name the file and the record."""

    def __init__(self, path: str | Path, where: str, data: Any):
        self.path, self.where, self.data = path, where, data
        if not isinstance(data, dict):
            raise self.error(f"should be a JSON object, got {type(data).__name__}")

    def error(self, problem: str) -> RawFormatError:
        return RawFormatError(self.path, self.where, problem)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        """The field ``key`` if present (checked to be a ``kind``), else ``default``."""
        if key not in self.data or self.data[key] is None:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a true/false where a number belongs is a malformed record.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise self.error(f"field {key!r} should be {names}, got {type(value).__name__}")
        return value

    def need(self, key: str, kind: type | tuple[type, ...]) -> Any:
        """The field ``key``, which must be present and a ``kind``."""
        value = self.get(key, kind)
        if value is None:
            raise self.error(f"field {key!r} is missing")
        return value

    def first(self, keys: tuple[str, ...], kind: type | tuple[type, ...]) -> Any:
        """The first of ``keys`` present (for releases whose key names vary)."""
        for key in keys:
            value = self.get(key, kind)
            if value is not None:
                return value
        raise self.error(f"none of the fields {list(keys)} is present")

    def sub(self, key: str, index: int, data: Any) -> Record:
        """A nested object, e.g. one QA of a video or one fact of a WebQA record."""
        return Record(self.path, f"{self.where}, {key}[{index}]", data)


def read_json(path: Path) -> Any:
    """A whole JSON file; invalid JSON names the file and the position."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RawFormatError(
            path, f"at line {err.lineno} column {err.colno}", f"invalid JSON ({err.msg})"
        ) from err
    except UnicodeDecodeError as err:
        raise RawFormatError(path, f"at byte {err.start}", "not UTF-8 text") from err


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line number, object) for each non-blank line of a JSON-lines file."""
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise RawFormatError(path, f"line {number}", "not UTF-8 text") from err
            except json.JSONDecodeError as err:
                raise RawFormatError(path, f"line {number}", f"invalid JSON ({err.msg})") from err


def json_list(path: Path, key: str | None = None) -> list[Any]:
    """A file holding a JSON list (or an object whose ``key`` holds the list)."""
    data = read_json(path)
    if key is not None:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise RawFormatError(path, "(top level)", f"should be an object with a {key!r} list")
        return data[key]
    if not isinstance(data, list):
        kind = type(data).__name__
        raise RawFormatError(path, "(top level)", f"should be a JSON list, got {kind}")
    return data


# Values some releases encode in strings: pages, Python lists, clock times, options.


def pages(record: Record, key: str, values: Any) -> list[int]:
    """A list of 1-based page numbers, checked."""
    if not isinstance(values, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in values
    ):
        raise record.error(f"field {key!r} should be a list of 1-based pages, got {values!r}")
    return values


def python_list(record: Record, key: str) -> list[Any]:
    """A field holding a Python list literal as a string (MMLongBench-Doc's ``"[19, 20]"``)."""
    text = record.need(key, str)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise record.error(f"field {key!r} is not a Python list literal: {text!r}") from err
    if not isinstance(value, list):
        raise record.error(f"field {key!r} is not a Python list literal: {text!r}")
    return value


def seconds(text: str) -> float:
    """``"MM:SS"`` or ``"HH:MM:SS"`` as seconds; ValueError otherwise."""
    parts = text.strip().split(":")
    if not 2 <= len(parts) <= 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(text)
    value = 0.0
    for part in parts:
        value = value * 60 + int(part)
    return value


def time_span(record: Record, reference: str) -> tuple[float, float]:
    """LVBench's ``"MM:SS-MM:SS"`` as (start, end) seconds."""
    try:
        start, end = (seconds(side) for side in reference.split("-"))
    except ValueError as err:
        raise record.error(f"time_reference {reference!r} is not MM:SS-MM:SS") from err
    if end < start:
        raise record.error(f"time_reference {reference!r} ends before it starts")
    return start, end


def options(record: Record, question: str) -> list[str]:
    """The option texts of a question written ``stem\\n(A) ...\\n(B) ...``, in letter order."""
    found = [m.groups() for m in map(_OPTION.match, question.splitlines()) if m]
    letters = [letter for letter, _ in found]
    if len(found) < 2 or letters != [chr(ord("A") + i) for i in range(len(found))]:
        raise record.error(f"question has no options (A), (B), ... in order: {question!r}")
    return [text.strip() for _, text in found]


def option_letter(record: Record, answer: str, choices: list[str]) -> str:
    """``answer`` checked to be the letter of one of ``choices``."""
    answer = answer.strip()
    if not (len(answer) == 1 and 0 <= ord(answer) - ord("A") < len(choices)):
        raise record.error(f"answer {answer!r} is not one of the options' letters")
    return answer


def clock(value: float) -> str:
    """Seconds as ``"MM:SS"`` (``"HH:MM:SS"`` from an hour on), LVBench's time notation."""
    minutes, secs = divmod(int(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def find_split_files(
    name: str, manual_dir: str | Path, split_files: Mapping[str, tuple[str, ...]]
) -> dict[str, Path]:
    """The present raw file of each split (the first candidate path that exists)."""
    root = Path(manual_dir)
    found = {}
    for split, candidates in split_files.items():
        for relative in candidates:
            if (root / relative).is_file():
                found[split] = root / relative
                break
    if not found:
        raise MissingRawFiles(name, root, split_files)
    return found


class RawBenchmark(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A benchmark read from its raw release in ``manual_dir``, written as array_record.

    Subclasses set ``name``, ``SPLIT_FILES`` (split -> candidate paths relative to
    ``manual_dir``, first present wins), ``HOMEPAGE`` and implement `examples`. Those that
    also read a derived subset of the benchmark (UniversalRAG's query files, VRAG's unified
    files) list it in ``DERIVED``; each becomes a builder config beside the default ``raw``
    one, written to ``data_dir/<name>/<config>/<version>``. Builders are not put in TFDS's
    global registry (TFDS has its own ``squad``); `vimrag_jax.benchmarks` looks them up by
    name instead. Examples keep the file's order (no shuffling), so an index into a split is
    stable across rebuilds.
    """

    VERSION = VERSION
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Built from the raw release."}
    SPLIT_FILES: ClassVar[dict[str, tuple[str, ...]]] = {}
    DERIVED: ClassVar[dict[str, Format]] = {}
    HOMEPAGE: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.BUILDER_CONFIGS = [
            tfds.core.BuilderConfig(name=RAW, description="The benchmark's own release."),
            *(
                tfds.core.BuilderConfig(name=n, description=f.description)
                for n, f in cls.DERIVED.items()
            ),
        ]

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """No code path: TFDS looks for a checksums file beside the builder's module, which a
        builder that downloads nothing does not need; finding the module would also import
        ``importlib_resources``, which TFDS imports lazily but does not depend on."""
        return None

    @property
    def split_files(self) -> dict[str, tuple[str, ...]]:
        """Split -> candidate paths in ``manual_dir`` for this builder config."""
        config = self.builder_config.name
        return self.SPLIT_FILES if config == RAW else self.DERIVED[config].split_files

    @property
    def MANUAL_DOWNLOAD_INSTRUCTIONS(self) -> str:  # noqa: N802 (TFDS's attribute name)
        files = "\n".join(f"  {s}: {' or '.join(p)}" for s, p in self.split_files.items())
        return f"Place the release ({self.HOMEPAGE}) in manual_dir:\n{files}"

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip(),
            features=features.FEATURES,
            homepage=self.HOMEPAGE,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        found = find_split_files(self.name, dl_manager.manual_dir, self.split_files)
        return {split: self._generate_examples(path, split) for split, path in found.items()}

    def _generate_examples(self, path: Path, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        config = self.builder_config.name
        read = self.examples if config == RAW else self.DERIVED[config].read
        seen: dict[str, str] = {}
        for index, (where, example) in enumerate(read(Path(path), split)):
            if example["id"] in seen:
                raise RawFormatError(
                    path, where, f"id {example['id']!r} repeats record {seen[example['id']]}"
                )
            seen[example["id"]] = where
            yield index, example

    def examples(self, path: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(record description for errors, example) for each question of ``split`` in ``path``."""
        raise NotImplementedError
