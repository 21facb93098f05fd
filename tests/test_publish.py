"""The background publisher (`publish.BackgroundPublisher`): the same files as `publish_policy`,
in order, one write in flight, failures raised on the learner's thread, `submit` not waiting
for its own write. Ordering is shown with events, never with timings."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from vimrag_jax import publish

#: A nested tree with a bfloat16 leaf (stored as raw 16 bits) and an integer one.
PARAMS = {
    "layer": {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.linspace(-1, 1, 4).astype(ml_dtypes.bfloat16),
    },
    "count": np.array([7, 8], np.int32),
}


def _params(version: int) -> dict:
    """`PARAMS` shifted by ``version``, so each version's files differ."""
    return {
        "layer": {"w": PARAMS["layer"]["w"] + version, "b": PARAMS["layer"]["b"] + version},
        "count": PARAMS["count"] + version,
    }


def _files(workdir: Path) -> dict[str, bytes | dict]:
    """Every file under ``workdir/policy``: bytes, or for the JSON ones their content without
    the wall-clock times (which differ between two runs)."""
    out: dict[str, bytes | dict] = {}
    root = workdir / publish.POLICY_DIR
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        name = str(path.relative_to(root))
        if path.name == publish.INFO_FILE:
            out[name] = {k: v for k, v in json.loads(path.read_text()).items() if k != "created"}
        elif path.name == publish.HISTORY_FILE:
            out[name] = [(e["version"], e["step"]) for e in publish.publication_history(workdir)]
        else:
            out[name] = path.read_bytes()
    return out


def test_background_publisher_writes_the_same_files_as_publish_policy(tmp_path):
    synchronous, background = tmp_path / "sync", tmp_path / "background"
    publisher = publish.BackgroundPublisher(background, keep=2)
    for version in (0, 1, 3):
        publish.publish_policy(_params(version), synchronous, version, keep=2, step=10 + version)
        publisher.submit(_params(version), version, step=10 + version)
    publisher.wait()
    assert not publisher.pending() and publisher.last_write_s is not None
    files = _files(background)
    assert files == _files(synchronous)
    assert sorted(name for name in files if name.endswith(publish.PARAMS_FILE)) == [
        "v00000001/params.safetensors",
        "v00000003/params.safetensors",
    ]  # pruned to keep=2, byte for byte the synchronous publisher's safetensors
    assert files[publish.HISTORY_FILE] == [(0, 10), (1, 11), (3, 13)]
    path = publish.latest_policy(background)[1]
    loaded = publish.load_policy(path, PARAMS)
    np.testing.assert_array_equal(loaded["layer"]["b"], _params(3)["layer"]["b"])
    assert loaded["layer"]["b"].dtype == ml_dtypes.bfloat16


class _SlowWrites:
    """`publish.write_policy` that records each write's start and end in ``events`` and holds
    the writes of ``held`` versions until ``release[version]`` is set."""

    def __init__(self, monkeypatch, held: tuple[int, ...] = ()):
        self.events: list[tuple[str, int]] = []
        self.release = {version: threading.Event() for version in held}
        self.started = {version: threading.Event() for version in held}
        self._write = publish.write_policy
        monkeypatch.setattr(publish, "write_policy", self)

    def __call__(self, policy, workdir, version, **kwargs):
        self.events.append(("write", version))
        if version in self.release:
            self.started[version].set()
            assert self.release[version].wait(timeout=60), "the test never released the write"
        path = self._write(policy, workdir, version, **kwargs)
        self.events.append(("written", version))
        return path


def test_submit_returns_while_its_write_is_still_running(tmp_path, monkeypatch):
    writes = _SlowWrites(monkeypatch, held=(1,))
    publisher = publish.BackgroundPublisher(tmp_path)
    publisher.submit(_params(1), 1)  # returns although the write is held
    assert writes.started[1].wait(timeout=60)
    assert publisher.pending() and publish.latest_policy(tmp_path) is None
    writes.release[1].set()
    publisher.wait()
    assert writes.events == [("write", 1), ("written", 1)]
    assert publish.latest_policy(tmp_path)[0] == 1 and not publisher.pending()


def test_two_quick_submits_stay_ordered_and_the_second_waits_for_the_first(tmp_path, monkeypatch):
    writes = _SlowWrites(monkeypatch, held=(1,))
    gathers = []
    gather = publish.gather_policy
    monkeypatch.setattr(publish, "gather_policy", lambda p: gathers.append(p) or gather(p))
    publisher = publish.BackgroundPublisher(tmp_path)
    waiting = threading.Event()
    wait = publisher.wait

    def recorded_wait() -> None:
        writes.events.append(("wait", len(gathers)))
        waiting.set()
        wait()

    publisher.wait = recorded_wait  # what `submit` calls before gathering
    publisher.submit(_params(1), 1)
    assert writes.started[1].wait(timeout=60)
    waiting.clear()
    second = threading.Thread(target=publisher.submit, args=(_params(2), 2))
    second.start()
    assert waiting.wait(timeout=60)  # the second submit is waiting for the first write...
    assert len(gathers) == 1  # ...before gathering its own parameters (one host copy at most)
    writes.release[1].set()
    second.join(timeout=60)
    assert not second.is_alive()
    wait()
    assert writes.events == [
        ("wait", 0),
        ("write", 1),
        ("wait", 1),
        ("written", 1),
        ("write", 2),
        ("written", 2),
    ]
    assert [e["version"] for e in publish.publication_history(tmp_path)] == [1, 2]
    assert publish.latest_policy(tmp_path)[0] == 2
    with pytest.raises(ValueError, match="version 2 submitted after version 2"):
        publisher.submit(_params(2), 2)  # checked at once, before any gather or write


def test_a_failed_write_is_raised_at_the_next_wait_or_submit_naming_its_version(
    tmp_path, monkeypatch
):
    write = publish.write_policy

    def failing(policy, workdir, version, **kwargs):
        if version in (2, 3):
            raise OSError(f"no space left writing {version}")
        return write(policy, workdir, version, **kwargs)

    monkeypatch.setattr(publish, "write_policy", failing)
    publisher = publish.BackgroundPublisher(tmp_path)
    publisher.submit(_params(1), 1)
    publisher.submit(_params(2), 2)  # fails on the thread; nothing raised here
    with pytest.raises(publish.PublishError, match="policy version 2") as raised:
        publisher.wait()
    assert isinstance(raised.value.__cause__, OSError)
    assert "no space left writing 2" in str(raised.value)
    publisher.wait()  # raised once: the publisher goes on

    publisher.submit(_params(3), 3)
    with pytest.raises(publish.PublishError, match="policy version 3"):
        publisher.submit(_params(4), 4)  # the previous failure, before publishing 4
    publisher.submit(_params(4), 4)
    publisher.wait()
    assert [e["version"] for e in publish.publication_history(tmp_path)] == [1, 4]


def test_without_background_submit_writes_before_returning(tmp_path):
    publisher = publish.BackgroundPublisher(tmp_path, background=False)
    publisher.submit(_params(1), 1, step=5)
    assert publisher._thread is None and publisher.last_write_s is not None
    assert publish.latest_policy(tmp_path)[0] == 1
    (tmp_path / publish.POLICY_DIR / "v00000009").mkdir()  # a newer version on disk
    with pytest.raises(ValueError, match="not newer"):  # as publish_policy raises it: at once
        publisher.submit(_params(2), 2)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        publish.BackgroundPublisher(tmp_path, keep=0)


def test_the_config_turns_background_publishing_on_and_checks_the_flag():
    import sys

    from vimrag_jax import config_checks

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from configs import ggpo

    cfg = ggpo.get_config("tiny")
    assert cfg.publish.background is True
    assert config_checks.find_problems(cfg, 1) == []
    del cfg.publish["background"]  # a config file (not a flag: that is parsed) may say "yes"
    cfg.publish.background = "yes"
    assert config_checks.find_problems(cfg, 1) == [
        "config.publish.background must be True or False, got 'yes'"
    ]
