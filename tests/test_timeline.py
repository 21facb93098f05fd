"""Resuming after a kill, piece by piece: the policy timeline, kill points, the publication log,
expert data, workers that die with their trainer, and checkpoints or versions half written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vimrag_jax import faults, publish, resume
from vimrag_jax.timeline import (
    NO_LOSS,
    Timeline,
    load_timeline,
    record_loss,
    resume_version,
    timeline_path,
)

PARAMS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}


def _reference_lag(sampled: int, trained: int, lost: list[tuple[int, int]]) -> int:
    """Versions after ``sampled`` up to ``trained`` that no restart lost, one by one."""
    return sum(
        1
        for version in range(sampled + 1, trained + 1)
        if not any(first <= version <= last for first, last in lost)
    )


ranges = st.lists(
    st.tuples(st.integers(0, 30), st.integers(0, 6)).map(lambda p: (p[0], p[0] + p[1])),
    max_size=4,
)


@given(ranges, st.integers(0, 40), st.integers(0, 40))
def test_surviving_lag_counts_the_versions_no_restart_lost(lost, sampled, trained):
    timeline = Timeline(tuple(lost))
    sampled = min(sampled, trained)
    assert timeline.surviving_lag(sampled, trained) == _reference_lag(sampled, trained, lost)
    many = np.arange(trained + 1)
    want = [_reference_lag(int(v), trained, lost) for v in many]
    np.testing.assert_array_equal(timeline.surviving_lag(many, trained), want)
    flags = timeline.is_lost(many)
    assert flags.tolist() == [any(a <= v <= b for a, b in lost) for v in many]


def test_lost_versions_and_lag_by_hand():
    timeline = Timeline(((3, 5),))
    assert timeline.is_lost(4) and not timeline.is_lost(6) and not timeline.is_lost(2)
    # Trained at 6 (the restored checkpoint's version 2, re-published as 6): a rollout of v2 is
    # one version old on the surviving timeline, not four.
    assert timeline.surviving_lag(2, 6) == 1 and timeline.surviving_lag(6, 6) == 0
    assert NO_LOSS.surviving_lag(2, 6) == 4 and not NO_LOSS.is_lost(0)


def test_resume_version():
    assert resume_version(4, None) == (4, None)  # nothing published yet
    assert resume_version(4, 4) == (4, None)  # the checkpoint saw its last publication
    assert resume_version(4, 2) == (4, None)  # a publication was cut short: republish 4
    assert resume_version(4, 9) == (10, (5, 9))  # 5..9 came from updates the kill undid


def test_record_loss_appends_and_refuses_a_damaged_file(tmp_path):
    assert load_timeline(tmp_path) is NO_LOSS
    record_loss(tmp_path, restored_step=7, checkpoint_version=2, lost=(3, 5), resumed_as=6)
    timeline = record_loss(
        tmp_path, restored_step=9, checkpoint_version=7, lost=(8, 8), resumed_as=9
    )
    assert load_timeline(tmp_path) == timeline
    assert timeline.lost == ((3, 5), (8, 8))
    assert [r["restored_step"] for r in timeline.restores] == [7, 9]
    timeline_path(tmp_path).write_text("{not json")
    with pytest.raises(ValueError, match="not a policy timeline"):
        load_timeline(tmp_path)


def test_continue_timeline_publishes_above_every_lost_version(tmp_path):
    published = []

    def publish_as(version):
        published.append(version)
        publish.publish_policy(PARAMS, tmp_path, version, step=100 + version)

    # A fresh start publishes version 0; a restart that lost nothing publishes nothing.
    assert resume.continue_timeline(tmp_path, 0, 1, publish_as) == (0, NO_LOSS)
    assert resume.continue_timeline(tmp_path, 0, 1, publish_as)[0] == 0
    for version in (1, 2, 3):
        publish.publish_policy(PARAMS, tmp_path, version, step=version)
    # Restored at a checkpoint that had published version 1: 2 and 3 are lost, 4 continues.
    version, timeline = resume.continue_timeline(tmp_path, 1, 5, publish_as)
    assert (version, timeline.lost, published) == (4, ((2, 3),), [0, 4])
    assert timeline.restores[0]["restored_step"] == 5
    history = [entry["version"] for entry in publish.publication_history(tmp_path)]
    assert history == [0, 1, 2, 3, 4]  # never down, never reused
    assert publish.latest_policy(tmp_path)[0] == 4


def test_publication_history_skips_a_torn_line(tmp_path):
    publish.publish_policy(PARAMS, tmp_path, 0, step=3)
    with open(tmp_path / publish.POLICY_DIR / publish.HISTORY_FILE, "a") as history:
        history.write('{"version": 1, "st')  # a kill mid-append
    publish.publish_policy(PARAMS, tmp_path, 1, step=4)
    entries = publish.publication_history(tmp_path)
    assert [(e["version"], e["step"]) for e in entries] == [(0, 3)]
    # The torn line swallowed the next one's start: a later append is whole again.
    publish.publish_policy(PARAMS, tmp_path, 2, step=5)
    assert [e["version"] for e in publish.publication_history(tmp_path)] == [0, 2]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("point", ["publish", "published"])
def test_a_kill_while_publishing_never_exposes_a_partial_version(tmp_path, point):
    code = f"""
        import numpy as np
        from vimrag_jax import publish
        params = {{"w": np.ones((2, 3), np.float32)}}
        publish.publish_policy(params, {str(tmp_path)!r}, 0)
        publish.publish_policy(params, {str(tmp_path)!r}, 1)
    """
    result = _python(code, **{faults.ENV: f"{point}:1"})
    assert result.returncode == -signal.SIGKILL, result.stderr
    root = tmp_path / publish.POLICY_DIR
    if point == "publish":  # written to a hidden temporary directory only
        assert publish.published_versions(tmp_path) == [0]
        assert list(root.glob(".tmp-v00000001-*"))
    else:  # renamed into place, LATEST not yet moved: readers still get a whole version
        assert publish.published_versions(tmp_path) == [0, 1]
    version, path = publish.latest_policy(tmp_path)
    assert version == 0 and publish.load_policy(path, PARAMS)["w"].shape == (2, 3)
    # The restarted learner continues above everything on disk; leftovers are removed.
    publish.publish_policy(PARAMS, tmp_path, 2)
    assert publish.latest_policy(tmp_path)[0] == 2 and not list(root.glob(".tmp-*"))


@pytest.mark.parametrize("point", ["publish", "published"])
def test_a_kill_in_the_background_writer_kills_the_learner_and_resumes_on_one_timeline(
    tmp_path, point
):
    # The learner's thread is elsewhere (not waiting for the write, as it does while a kill
    # point is armed) when the writer thread reaches the kill point: the whole process dies.
    code = f"""
        import threading
        import numpy as np
        from vimrag_jax import publish
        publish.armed = lambda: False  # the learner goes on: version 1's write is in flight
        params = {{"w": np.ones((2, 3), np.float32)}}
        publisher = publish.BackgroundPublisher({str(tmp_path)!r})
        publisher.submit(params, 0)
        publisher.submit(params, 1)
        threading.Event().wait(100)  # "training", until the writer's SIGKILL
        print("survived")
    """
    result = _python(code, **{faults.ENV: f"{point}:1"})
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    assert publish.latest_policy(tmp_path)[0] == 0  # LATEST never named the version cut short
    published = []

    def publish_as(version):
        published.append(version)
        publish.publish_policy(PARAMS, tmp_path, version)

    # Without the train loop's wait before a checkpoint, a checkpoint could name version 1
    # while it was still being written: cut short before its rename, it is republished as 1
    # (the restored policy, nothing lost); renamed but LATEST not moved, nothing is published
    # and workers stay on version 0: why the learner waits for the version a checkpoint names.
    ahead = tmp_path / "ahead"
    shutil.copytree(tmp_path / publish.POLICY_DIR, ahead / publish.POLICY_DIR)
    republished = []
    version, _ = resume.continue_timeline(ahead, 1, 7, republished.append)
    assert (version, republished) == (1, [1] if point == "publish" else [])

    # The learner's checkpoints name only versions on disk (here 0): version 1 is either never
    # seen (cut short before its rename: the retrained update publishes 1 again) or lost.
    version, timeline = resume.continue_timeline(tmp_path, 0, 7, publish_as)
    if point == "publish":
        assert (version, timeline, published) == (0, NO_LOSS, [])
        publish.publish_policy(PARAMS, tmp_path, 1)
    else:
        assert (version, timeline.lost, published) == (2, ((1, 1),), [2])
    root = tmp_path / publish.POLICY_DIR
    assert not list(root.glob(".tmp-*"))  # removed by the next write
    history = [entry["version"] for entry in publish.publication_history(tmp_path)]
    assert history == sorted(set(history)) and publish.latest_policy(tmp_path)[0] == history[-1]


def test_kill_points_are_named_and_inert_unless_asked(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.kill_point("rl_step", 3)  # nothing set: nothing happens
    monkeypatch.setenv(faults.ENV, "rl_step:4")
    faults.kill_point("rl_step", 3)  # another step
    faults.kill_point("eval", 4)  # another point
    with pytest.raises(ValueError, match="unknown kill point"):
        faults.kill_point("nowhere")
    monkeypatch.setenv(faults.ENV, "rl_stpe:4")
    with pytest.raises(ValueError, match="unknown kill point 'rl_stpe'"):
        faults.kill_point("rl_step", 4)
    monkeypatch.setenv(faults.ENV, "rl_step:four")
    with pytest.raises(ValueError, match="must be an integer"):
        faults.kill_point("rl_step", 4)


def test_expert_data_missing_after_a_kill(tmp_path):
    from test_records import random_record

    from vimrag_jax.rollout.records import ShardWriter, shard_name

    rng = np.random.default_rng(0)
    assert resume.expert_trajectories_missing(tmp_path / "none", 8) == 8
    for sequence in range(2):  # a killed expert leaves whole shards of 3 records
        with ShardWriter(tmp_path, name=shard_name("expert", sequence)) as writer:
            for _ in range(3):
                writer.write(random_record(rng))
    assert resume.expert_trajectories_missing(tmp_path, 8) == 2
    assert resume.expert_trajectories_missing(tmp_path, 5) == 0
    resume.mark_expert_data_done(tmp_path)
    assert resume.expert_trajectories_missing(tmp_path, 100) == 0


def test_embedded_workers_die_with_a_killed_trainer(tmp_path):
    # A "trainer" starts a child that arms die_with_parent, then is SIGKILLed: the child must
    # not outlive it (a restarted trainer reuses the worker ids).
    child = tmp_path / "child.pid"
    parent = f"""
        import subprocess, sys, time
        code = (
            "import os, sys, time\\n"
            "from vimrag_jax.rollout.local_workers import die_with_parent\\n"
            f"die_with_parent({{__import__('os').getpid()}})\\n"
            "open({str(child)!r}, 'w').write(str(os.getpid()))\\n"
            "time.sleep(60)\\n"
        )
        subprocess.Popen([sys.executable, "-c", code])
        time.sleep(60)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(parent)])
    deadline = time.monotonic() + 60
    while not child.is_file() or not child.read_text():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.1)
    pid = int(child.read_text())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the worker outlived its killed trainer"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by init) counts as gone.
    status = f"/proc/{pid}/status"
    if os.path.exists(status):
        with open(status) as handle:
            return "zombie" not in handle.read()
    return True


def test_a_checkpoint_half_written_is_never_restored(tmp_path):
    import jax
    from learner_cases import optim_config

    from vimrag_jax import checkpointing, optim
    from vimrag_jax.models.standin import StandinConfig, StandinPolicy
    from vimrag_jax.parallel import mesh as mesh_lib
    from vimrag_jax.parallel import step

    mesh = mesh_lib.make_mesh(-1, 1, 1)
    optimizer = optim.make_optimizer(optim_config())

    def model_fn():
        from flax import nnx

        return StandinPolicy(StandinConfig(), rngs=nnx.Rngs(0))

    _, state, _ = step.create_train_state(model_fn, optimizer, mesh)
    with checkpointing.Checkpointer(tmp_path, every_steps=1, keep=3) as checkpointer:
        checkpointer.save(2, state, data_state={"at": 2}, metadata={"policy_version": 1})
    # What a kill during an async save leaves: orbax's temporary directory of a later step.
    partial = tmp_path / checkpointing.CHECKPOINT_DIR / "4.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 64)
    with checkpointing.Checkpointer(tmp_path, every_steps=1, keep=3) as checkpointer:
        abstract = checkpointing.abstract_train_state(model_fn, optimizer, mesh)
        restored = checkpointer.restore_latest(abstract)
    assert restored.data_state == {"at": 2} and restored.metadata["policy_version"] == 1
    assert int(jax.device_get(restored.state.step)) == int(jax.device_get(state.step))
    json.dumps(restored.metadata)


def test_evaluations_of_lost_versions_are_set_aside(tmp_path):
    evals = tmp_path / "eval"
    evals.mkdir()
    names = [f"eval-v{v:08d}.json" for v in (1, 2, 3, 4)] + ["episodes-v00000003.array_record"]
    for name in names:
        (evals / name).write_text("{}")
    moved = resume.set_aside_lost_evaluations(tmp_path, (2, 3))
    assert sorted(p.name for p in moved) == sorted(names[1:3] + names[4:])
    assert sorted(p.name for p in evals.glob("*-v*")) == [names[0], names[3]]
    assert all(p.parent == evals / "lost" and p.is_file() for p in moved)


def test_compile_cache_under_the_workdir_by_default(tmp_path):
    import jax
    import ml_collections

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in names}
    try:
        block = ml_collections.ConfigDict({"dir": "", "min_compile_time_s": 0.5})
        directory = resume.use_compile_cache(block, tmp_path)
        assert directory == tmp_path / resume.COMPILE_CACHE_DIR and directory.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(directory)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.5
        block.dir = "off"
        assert resume.use_compile_cache(block, tmp_path) is None
    finally:  # other tests in this process compile without a cache
        for name, value in before.items():
            jax.config.update(name, value)
