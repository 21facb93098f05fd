"""Policy weights for the rollout workers: versioned, atomically published safetensors files.

The learner publishes its parameters every few updates; workers (other processes, other hosts
on a shared filesystem) poll for the newest version and reload. Layout::

    WORKDIR/policy/
      LATEST                      "12\\n": the newest complete version
      v00000012/params.safetensors   one tensor per parameter, named by its pytree path
      v00000012/policy.json          {"version": 12, "dtypes": {...}, "created": ...}
      v00000012/hf/                  the same weights in Hugging Face layout (serving backends)
      history.jsonl               one line per publication: {"version", "step", "time"}
      timeline.json               versions lost to a restart (`vimrag_jax.timeline`)

A version is written into a hidden temporary directory and renamed into place, and ``LATEST`` is
replaced atomically after that, so a reader never sees a partial version: a publisher that dies
mid-write leaves only a ``.tmp-*`` directory, which readers ignore and the next publish removes.
Versions only go up, across restarts too (`vimrag_jax.timeline`). Old versions are pruned, keeping
the newest ``keep`` (a worker may still be reading one it picked a moment ago).

Publishing has two halves: `gather_policy` (collective: every process, parameters to process 0's
host) and `write_policy` (process 0 alone, the files). `publish_policy` does both before
returning; the learner's `BackgroundPublisher` gathers in its own thread and writes on a
background thread (``publish.background``), one version at a time, so that the next updates
overlap the seconds it takes to write a large policy.

Safetensors: a flat name → tensor file, no code inside (no pickle), memory-mappable and readable
from any language. bfloat16, which numpy cannot hold natively, is stored as its raw 16 bits and
named in ``policy.json``.

Serving: SGLang and vLLM load Hugging Face checkpoints (``config.json``, safetensors with the
Hugging Face tensor names, bf16, tokenizer and processor files), so with a server backend
(``publish.hf_layout``, on by default for ``rollout.backend`` sglang / vllm) each version also
gets ``vNNNNNNNN/hf/``, written by `write_hf_layout` with ``models.hf.save_pretrained`` (the
end-of-run export's writer). A publisher may write it inside the atomic publish (``hf_writer``
of `publish_policy`); otherwise the first rollout worker that needs it writes it from
``params.safetensors``, also atomically (a hidden directory renamed into place; a second writer's
copy is dropped).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from absl import logging
from safetensors.numpy import save_file

from vimrag_jax.distributed import to_host
from vimrag_jax.faults import armed, kill_point
from vimrag_jax.jsonl import log_entries

POLICY_DIR = "policy"
LATEST = "LATEST"
PARAMS_FILE = "params.safetensors"
INFO_FILE = "policy.json"
HISTORY_FILE = "history.jsonl"
HF_DIR = "hf"
#: Files copied from the source checkpoint into the Hugging Face layout when present (the
#: processor's and the chat template's; the tokenizer is saved from the tokenizer itself).
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)
_VERSION_DIR = re.compile(r"^v(\d{8,})$")
_RAW_DTYPES = {"bfloat16": (ml_dtypes.bfloat16, np.uint16)}


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flatten_params(params: Any) -> tuple[list[str], list[Any], Any]:
    """``(names, leaves, treedef)``: each leaf named by its pytree path joined with ``/``."""
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = ["/".join(_key_name(k) for k in path) for path, _ in leaves_with_paths]
    if len(set(names)) != len(names):
        raise ValueError("parameter paths are not unique after joining with '/'")
    return names, [leaf for _, leaf in leaves_with_paths], treedef


def version_dir(workdir: str | os.PathLike, version: int) -> Path:
    """The directory version ``version`` is (or would be) published to."""
    return Path(workdir) / POLICY_DIR / f"v{int(version):08d}"


def published_versions(workdir: str | os.PathLike) -> list[int]:
    """Complete published versions on disk, oldest first."""
    root = Path(workdir) / POLICY_DIR
    if not root.is_dir():
        return []
    found = (_VERSION_DIR.match(p.name) for p in root.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def latest_policy(workdir: str | os.PathLike) -> tuple[int, Path] | None:
    """``(version, path)`` of the newest complete published version, or None.

    Reads ``LATEST``; when it is missing or names a pruned version, falls back to the newest
    complete version directory.
    """
    root = Path(workdir) / POLICY_DIR
    try:
        version = int((root / LATEST).read_text().strip())
    except (OSError, ValueError):
        version = None
    if version is not None and (version_dir(workdir, version) / INFO_FILE).is_file():
        return version, version_dir(workdir, version)
    versions = published_versions(workdir)
    if not versions:
        return None
    return versions[-1], version_dir(workdir, versions[-1])


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class HostPolicy:
    """A policy's parameters gathered onto this host (`gather_policy`): each parameter's name
    (its pytree path joined with ``/``) and its whole value as a NumPy array, in the same order.
    What `write_policy` writes; holding one is holding a full host copy of the policy."""

    names: tuple[str, ...]
    arrays: tuple[np.ndarray, ...]


def gather_policy(params: Any) -> HostPolicy | None:
    """``params`` gathered whole onto process 0's host; None on the other processes.

    Collective: call it on every process, at the same point (sharded parameters held by other
    processes are gathered with `to_host`). The first half of `publish_policy`.
    """
    names, leaves, _ = flatten_params(params)
    arrays = tuple(to_host(leaf) for leaf in leaves)
    if jax.process_index() != 0:
        return None
    return HostPolicy(tuple(names), arrays)


def write_policy(
    policy: HostPolicy,
    workdir: str | os.PathLike,
    version: int,
    *,
    keep: int = 3,
    step: int | None = None,
    hf_writer: Callable[[Path], None] | None = None,
) -> Path:
    """Writes ``policy`` as ``version`` under ``workdir``; returns the version's directory.

    The second half of `publish_policy`, on process 0 only and with no collective, so it may
    run on a background thread (`BackgroundPublisher`). The version is written into a hidden
    temporary directory renamed into place, then ``LATEST`` is replaced and the history line
    appended, then versions beyond the newest ``keep`` are pruned. ValueError when ``version``
    is not newer than every version on disk.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (config.publish.keep), got {keep}")
    root = Path(workdir) / POLICY_DIR
    root.mkdir(parents=True, exist_ok=True)
    existing = published_versions(workdir)
    if existing and version <= existing[-1]:
        raise ValueError(
            f"policy version {version} is not newer than the published version {existing[-1]} "
            f"in {root}; versions must increase"
        )
    for stale in root.glob(".tmp-*"):  # left by a publisher that died mid-write
        shutil.rmtree(stale, ignore_errors=True)

    tensors, dtypes = {}, {}
    for name, array in zip(policy.names, policy.arrays, strict=True):
        dtypes[name] = array.dtype.name
        if array.dtype.name in _RAW_DTYPES:
            array = array.view(_RAW_DTYPES[array.dtype.name][1])
        tensors[name] = np.ascontiguousarray(array)
    tmp = root / f".tmp-v{int(version):08d}-{uuid.uuid4().hex}"
    tmp.mkdir()
    save_file(tensors, str(tmp / PARAMS_FILE))
    info = {"version": int(version), "dtypes": dtypes, "created": time.time()}
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
    if hf_writer is not None:
        hf_writer(tmp / HF_DIR)
    kill_point("publish", version)
    final = version_dir(workdir, version)
    os.rename(tmp, final)
    kill_point("published", version)
    _write_atomically(root / LATEST, f"{int(version)}\n")
    # One small append per line (whole on POSIX); a line torn by a kill is skipped when read.
    line = json.dumps({"version": int(version), "step": step, "time": time.time()}) + "\n"
    with open(root / HISTORY_FILE, "a") as history:
        history.write(line)

    for old in published_versions(workdir)[:-keep]:
        shutil.rmtree(version_dir(workdir, old), ignore_errors=True)
    return final


def publish_policy(
    params: Any,
    workdir: str | os.PathLike,
    version: int,
    *,
    keep: int = 3,
    step: int | None = None,
    hf_writer: Callable[[Path], None] | None = None,
) -> Path | None:
    """Publishes ``params`` as ``version``; returns its directory on process 0, else None.

    Call it on every process: sharded parameters are gathered collectively (`gather_policy`),
    then only process 0 writes (`write_policy`). ``version`` must exceed every version already
    published. ``step`` (the learner's step) goes into ``history.jsonl`` with the version.
    ``hf_writer(directory)``, if given, writes the Hugging Face layout into ``directory`` (the
    version's ``hf/``) before the version becomes visible, e.g.
    ``lambda d: models.hf.save_pretrained(model, d)``.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (config.publish.keep), got {keep}")
    policy = gather_policy(params)
    if policy is None:
        return None
    return write_policy(policy, workdir, version, keep=keep, step=step, hf_writer=hf_writer)


class PublishError(RuntimeError):
    """Writing a policy version on the background thread failed (the cause is chained)."""


class BackgroundPublisher:
    """Publishes policy versions with the writing on a background thread of process 0.

    `submit` gathers the parameters on the caller's thread (collective: every process calls
    it at the same point), then process 0 writes them (`write_policy`) on a thread while the
    caller goes on training. At most one publication is in flight: `submit` first waits for
    the previous write, so at most one host copy of the policy exists and versions reach the
    disk one after another, in the order submitted, each with `write_policy`'s guarantees
    (atomic, ``LATEST`` after the version, history line, pruning). A failed write is not lost:
    it is raised (`PublishError`, naming the version) by the next `submit` or `wait`. With
    ``background=False`` `submit` writes before returning (the same code, no thread). While a
    kill point is armed (`vimrag_jax.faults.armed`) `submit` also waits for the write, so that
    a kill test's named moment does not race the caller.

    Not thread-safe itself: call `submit` and `wait` from one thread (the learner's).
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, background: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (config.publish.keep), got {keep}")
        self.workdir = Path(workdir)
        self.keep = int(keep)
        self.background = bool(background)
        self._thread: threading.Thread | None = None
        self._failure: tuple[int, BaseException] | None = None
        self._last_version: int | None = None
        #: Seconds the last finished write took (None before the first).
        self.last_write_s: float | None = None

    def submit(
        self,
        params: Any,
        version: int,
        *,
        step: int | None = None,
        hf_writer: Callable[[Path], None] | None = None,
    ) -> None:
        """Publishes ``params`` as ``version`` (see the class); returns once they are gathered
        (and, without ``background``, written). Raises the previous write's failure, and
        ValueError for a ``version`` not above the last one submitted."""
        self.wait()
        version = int(version)
        if self._last_version is not None and version <= self._last_version:
            raise ValueError(
                f"policy version {version} submitted after version {self._last_version}; "
                "versions must increase"
            )
        policy = gather_policy(params)
        self._last_version = version
        if policy is None:  # not process 0: nothing to write
            return
        if not self.background:  # today's behaviour: written before returning, errors as is
            self._write(policy, version, step, hf_writer)
            return
        self._thread = threading.Thread(
            target=self._write_in_background,
            args=(policy, version, step, hf_writer),
            name=f"publish-v{version:08d}",
            daemon=True,  # a kill mid-write leaves only a hidden directory (removed next time)
        )
        self._thread.start()
        if armed():  # a kill test names a moment of the learner's: keep it the same every run
            self.wait()

    def _write(
        self,
        policy: HostPolicy,
        version: int,
        step: int | None,
        hf_writer: Callable[[Path], None] | None,
    ) -> None:
        """Writes one version (`write_policy`) and logs how long it took."""
        began = time.perf_counter()
        write_policy(policy, self.workdir, version, keep=self.keep, step=step, hf_writer=hf_writer)
        self.last_write_s = time.perf_counter() - began
        mode = "background" if self.background else "synchronous"
        logging.info("published policy v%d in %.1f s (%s)", version, self.last_write_s, mode)

    def _write_in_background(
        self,
        policy: HostPolicy,
        version: int,
        step: int | None,
        hf_writer: Callable[[Path], None] | None,
    ) -> None:
        """The thread's body: `_write`, keeping a failure for the learner's thread to raise
        (an exception escaping a thread is only printed)."""
        try:
            self._write(policy, version, step, hf_writer)
        except BaseException as err:
            self._failure = (version, err)

    def pending(self) -> bool:
        """Whether a write is still running."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Blocks until the write in flight (if any) is done; raises `PublishError` when a
        write failed since the last call (once: the publisher is usable after it)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None  # drops the host copy it held
        if self._failure is not None:
            version, err = self._failure
            self._failure = None
            raise PublishError(
                f"writing policy version {version} to {self.workdir / POLICY_DIR} failed: "
                f"{type(err).__name__}: {err}"
            ) from err


#: safetensors dtype codes of the arrays `publish_policy` writes (bfloat16 goes as raw U16).
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
    "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def map_tensors(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as read-only views of one memory map: a worker reads
    only the pages it uses, and never holds a second copy of a large policy (the views stay
    valid after the file is pruned). ValueError for a header it cannot read."""
    data = np.memmap(file, dtype=np.uint8, mode="r")
    size = int.from_bytes(bytes(data[:8]), "little") if len(data) >= 8 else -1
    if not 0 < size <= len(data) - 8:
        raise ValueError(f"{file}: not a safetensors file (header length {size})")
    header = json.loads(bytes(data[8 : 8 + size]))
    body = 8 + size
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name} has dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        raw = data[body + start : body + end]
        out[name] = raw.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return out


def load_policy(path: str | os.PathLike, abstract_params: Any) -> Any:
    """The parameters of a published version, in the structure of ``abstract_params``.

    ``abstract_params`` is the parameter tree (arrays or ``jax.ShapeDtypeStruct``s, e.g. from
    ``nnx.eval_shape``). A leaf with a ``sharding`` is placed with it; others become read-only
    host arrays mapped from the file (`map_tensors`). Raises ValueError naming the parameters
    that are missing or have another shape.
    """
    path = Path(path)
    info = json.loads((path / INFO_FILE).read_text())
    tensors = map_tensors(path / PARAMS_FILE)
    names, leaves, treedef = flatten_params(abstract_params)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{path} lacks parameters {missing[:5]} (of {len(missing)} missing)")
    values = []
    for name, leaf in zip(names, leaves, strict=True):
        array = tensors[name]
        dtype = info["dtypes"].get(name, array.dtype.name)
        if dtype in _RAW_DTYPES:
            array = array.view(_RAW_DTYPES[dtype][0])
        if tuple(array.shape) != tuple(leaf.shape):
            raise ValueError(
                f"{path}: parameter {name} has shape {array.shape}, expected {tuple(leaf.shape)}"
            )
        sharding = getattr(leaf, "sharding", None)
        values.append(array if sharding is None else jax.device_put(array, sharding))
    return jax.tree_util.tree_unflatten(treedef, values)


def hf_layout_dir(path: str | os.PathLike) -> Path:
    """Where a published version's Hugging Face layout is (or would be)."""
    return Path(path) / HF_DIR


def write_hf_layout(
    path: str | os.PathLike,
    abstract_model: Callable[[], Any],
    *,
    tokenizer: Any | None = None,
    source_dir: str | os.PathLike | None = None,
    dtype: str = "bfloat16",
) -> Path:
    """The Hugging Face layout of the published version at ``path``: written on first call,
    reused after; returns its directory (``path/hf``).

    ``abstract_model()`` gives the policy's structure without weights (``nnx.eval_shape``); the
    published parameters fill it and ``models.hf.save_pretrained`` writes ``config.json`` and
    ``dtype`` safetensors with Hugging Face names. ``tokenizer.save_pretrained`` adds the
    tokenizer files, and `PROCESSOR_FILES` found in ``source_dir`` (the initial checkpoint) are
    copied. Written into a hidden directory and renamed into place, so a reader (a server
    loading it) never sees a partial layout. Raises FileNotFoundError when the version is gone
    (pruned), NotImplementedError for a model without a Hugging Face exporter.
    """
    from flax import nnx

    from vimrag_jax.models.hf import save_pretrained

    path = Path(path)
    final = hf_layout_dir(path)
    if (final / "config.json").is_file():
        return final
    if not (path / INFO_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a published policy version (pruned?)")
    model = abstract_model()
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, load_policy(path, nnx.to_pure_dict(state)))
    nnx.update(model, state)
    tmp = path / f".{HF_DIR}.tmp-{uuid.uuid4().hex}"
    try:
        save_pretrained(model, tmp, dtype=dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if source_dir:
            for name in PROCESSOR_FILES:
                if (Path(source_dir) / name).is_file():
                    shutil.copyfile(Path(source_dir) / name, tmp / name)
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():  # not someone else's finished copy: a failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def publication_history(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every publication of the run in order (``history.jsonl``; a line torn by a kill is
    skipped)."""
    return log_entries(Path(workdir) / POLICY_DIR / HISTORY_FILE)
