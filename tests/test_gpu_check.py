"""The GPU check (`benchmarks/gpu_check.sh`, `benchmarks/gpu_step.py`) without a GPU.

The check itself runs on a lent GPU machine; here: `gpu_step.py --smoke` measures every part on
the CPU with the tiny presets and prints the fields the record needs, the visual batch holds the
paper's budget at the real sizes, ``--record`` appends to its own section only, and the shell
script prints its plan (``--dry-run``, no pip, no network), names the carry path, and records a
timed-out or failed part (a stand-in Python plays the device).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEP = REPO / "benchmarks" / "gpu_step.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_step  # noqa: E402

# Fast compiles on the CPU: the smoke run measures nothing, it checks the parts run.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def smoke() -> dict[str, dict]:
    """The three parts of one ``--smoke`` run, by part (and its wall time)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_XLA)
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(STEP), "--smoke", "--steps", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    seconds = time.perf_counter() - began
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["part"]: r for r in _json_lines(proc.stdout)}
    print(f"gpu_step.py --smoke took {seconds:.1f} s")
    return records


def _matmul_params(hf: dict) -> int:
    """Weights that multiply activations in one token's forward: every kernel of the model
    (norm scales excluded), with the embedding counted once as the LM head."""
    import jax
    from flax import nnx

    from vimrag_jax.models.presets import init_model

    model = nnx.eval_shape(lambda: init_model(hf, rngs=nnx.Rngs(0)))
    shapes = [x.shape for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    total = sum(math.prod(shape) for shape in shapes if len(shape) >= 2)
    if not hf.get("tie_word_embeddings", False):  # the lookup table is no matmul
        total -= hf["vocab_size"] * hf["hidden_size"]
    return total


def test_smoke_prints_every_part_with_its_fields(smoke):
    assert sorted(smoke) == ["decode", "train", "vl"]
    for record in smoke.values():
        assert record["ok"], record.get("error")
        assert record["smoke"] is True and record["backend"] == "cpu" and record["jax"]
    train, vl, decode = smoke["train"], smoke["vl"], smoke["decode"]
    for record in (train, vl):
        tokens = record["rows"] * record["seq_len"]
        assert record["tokens_per_s"] == pytest.approx(tokens / record["step_s"], rel=1e-3)
        assert record["mfu"] == pytest.approx(
            record["flops_per_step"] / record["step_s"] / 989e12, abs=1e-4
        )
        assert record["hfu"] >= record["mfu"]  # remat adds a forward
        assert record["loss"] is not None and "peak_bytes" in record  # None on the CPU
    assert (train["rows"], train["seq_len"], train["remat"]) == (4, 64, True)
    assert (vl["images"], vl["patches_real"], vl["patch_rows"]) == (8, 32, 64)
    assert decode["batch"] == 4 and decode["new_tokens"] == 32
    assert decode["tokens_per_s"] > 0 and decode["end_to_end_tokens_per_s"] > 0


def test_train_flops_are_six_n_t_plus_attention(smoke):
    from vimrag_jax.models.presets import preset_config

    train = smoke["train"]
    hf = preset_config(train["model"])
    tokens, length = train["rows"] * train["seq_len"], train["seq_len"]
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    attention = 2 * hf["num_hidden_layers"] * tokens * length * heads * head_dim
    expected = 3 * (2 * _matmul_params(hf) * tokens + attention)
    assert train["flops_per_step"] == pytest.approx(expected, rel=1e-9)


def test_visual_batch_holds_the_paper_budget_at_the_real_sizes():
    """Host arrays only (no compile): Qwen3-VL-2B's segment at SPEC §2's budget."""
    from vimrag_jax import footprint

    args = gpu_step.parse_args([])
    cfg = gpu_step.part_config("hf", 1, 8192, 1, args)
    assert cfg.memory.total_pixels == 1_310_720 and cfg.rollout.retrieval_top_k == 3
    grids = gpu_step.visual_budget(cfg)
    assert grids == [(1, 32, 32)] * 8  # 5 memory images of 512², 3 observations
    cfg.data.max_patches = footprint.max_patches(cfg)
    hf = footprint.model_hf_config(cfg)
    batch = gpu_step.loss_batch(cfg, hf, visual=True)
    rows = cfg.data.max_patches
    assert 8192 < rows < 10_000 and batch["pixel_values"].shape == (1, rows, 1536)
    index = batch["visual_token_index"][0]
    assert sorted(index[index >= 0].tolist()) == list(range(2048))  # 8 × 256 merged tokens
    assert (batch["vision_segment"][0, :8192] >= 0).all()
    assert (batch["vision_segment"][0, 8192:] == -1).all()
    prompt = batch["loss_mask"][0].argmax()
    assert prompt == 4096 and (index[prompt:] == -1).all()
    assert batch["segment_valid"].all() and batch["node_valid"][0, :4].all()


class _OutOfMemoryLearner:
    """A stand-in `Learner` whose step runs out of device memory below two micro-batches."""

    def __init__(self, model_fn, optimizer, loss_config, mesh, *, step_kind, micro_batches):
        self.micro_batches = micro_batches
        self.state = None

    def initialize(self):
        self.state = np.zeros(())

    def train_step(self, batch):
        if self.micro_batches < 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return {"loss": 0.5}


def test_a_step_out_of_memory_is_retried_with_more_micro_batches(monkeypatch):
    import vimrag_jax.learner

    monkeypatch.setattr(vimrag_jax.learner, "Learner", _OutOfMemoryLearner)
    args = gpu_step.parse_args(["--smoke", "--steps", "2"])
    out = gpu_step.learner_step("train", "tiny", 4, 64, 1, args)
    assert (out["micro_batches"], out["oom_retries"], out["loss"]) == (2, 1, 0.5)
    assert len(out["step_s_all"]) == 2
    # Another error, or no rows left to split, is raised as it came.
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        gpu_step.learner_step("train", "tiny", 1, 64, 1, args)


def _result(part: str, **fields) -> str:
    return json.dumps({"part": part, "ok": True, "seconds": 1.0, **fields})


VL_RESULT = dict(
    model="Qwen3VLForConditionalGeneration",
    dtype="bfloat16",
    rows=4,
    seq_len=8192,
    images=8,
    patches_real=8192,
    patch_rows=9536,
    memory_pixels=1310720,
    micro_batches=4,
    step_s=1.5,
    peak_bytes=40 << 30,
    mfu=0.3,
    first_step_s=60.0,
)


def test_record_appends_to_its_own_section_only(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\n## GPU check — `gpu_check.sh`\n\nHow to run.\n\n## Later\n\nOther text.\n"
    )
    results = tmp_path / "gpu_check.jsonl"
    meta = {"part": "meta", "machine": "NVIDIA H100 80GB HBM3", "date": "2026-12-07 01:00 UTC"}
    failed = {"part": "train", "ok": False, "error": "timed out after 135 s"}
    results.write_text(
        "\n".join([json.dumps(meta), json.dumps(failed), _result("vl", **VL_RESULT)]) + "\n"
    )
    assert gpu_step.main(["--record", str(results), "--doc", str(doc)]) == 0
    text = doc.read_text()
    head, later = text.split("## Later")
    assert later == "\n\nOther text.\n"  # untouched, still after the section
    assert "How to run." in head and "### 2026-12-07 01:00 UTC — NVIDIA H100 80GB HBM3" in head
    assert "| train | FAILED: timed out after 135 s" in head
    assert "step 1.500 s, peak 40.0 GiB" in head
    # A second run goes after the first, still before the next section.
    assert gpu_step.main(["--record", str(results), "--doc", str(doc), "--date", "later"]) == 0
    text = doc.read_text()
    assert text.index("### later") < text.index("## Later")
    assert text.index("### 2026-12-07") < text.index("### later")
    # A doc without the section gets it at its end.
    bare = tmp_path / "bare.md"
    bare.write_text("# Benchmarks\n\n## Other\n")
    gpu_step.main(["--record", str(results), "--doc", str(bare)])
    assert bare.read_text().index("## Other") < bare.read_text().index("## GPU check\n\n### ")


def _fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for the device's python3 that logs its calls: pip and pytest succeed
    without doing anything, the train part hangs, the vl part prints a result, the decode
    part crashes; anything else (the script's JSON helper, --record) runs the real Python."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "python3"
    fake.write_text(
        textwrap.dedent(
            f"""\
            #!/usr/bin/env bash
            echo "$*" >>{log}
            case "$1 ${{2:-}}" in
              "-m pip") exit 0 ;;
              "-m pytest") echo "3 passed in 0.1s"; exit 0 ;;
              "-c "*) exit 0 ;;
            esac
            if [[ "$1" == *gpu_step.py && "${{2:-}}" == --part ]]; then
              case "$3" in
                train) sleep 60 ;;
                vl) echo {shlex.quote(_result("vl", **VL_RESULT))}; exit 0 ;;
                decode) echo "decode broke" >&2; exit 3 ;;
              esac
            fi
            exec {sys.executable} "$@"
            """
        )
    )
    fake.chmod(0o755)
    return fake, log


def _env(tmp_path: Path, fake: Path, **extra: str) -> dict[str, str]:
    return dict(
        os.environ,
        GPU_CHECK_PYTHON=str(fake),
        GPU_CHECK_WHEELS=str(tmp_path / "wheels"),
        GPU_CHECK_DOC=str(tmp_path / "benchmarks.md"),
        OUT=str(tmp_path / "out"),
        **extra,
    )


def test_dry_run_prints_the_commands_and_the_carry_path_without_pip(tmp_path):
    fake, log = _fake_python(tmp_path)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        capture_output=True,
        text=True,
        env=_env(tmp_path, fake),
        timeout=60,
        check=True,
    )
    out = proc.stdout
    assert 'carry path: benchmarks/wheels (run(command="bash benchmarks/gpu_check.sh"' in out
    assert f"-m pip install --no-index --find-links {tmp_path / 'wheels'} --no-deps" in out
    assert "-m pip install --no-index --no-deps --no-build-isolation -e" in out
    assert "-m pytest -p no:cacheprovider -x -q tests/test_qwen3.py::" in out
    for part, limit in (("train", 140), ("vl", 150), ("decode", 65)):
        assert f"timeout {limit} {fake} {STEP} --part {part}" in out
    assert "--record" in out
    assert not log.exists()  # nothing ran: no pip, no Python
    # The carry path is what git ignores (it must travel as a carry, never be committed).
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "benchmarks/wheels/grain.whl"], cwd=REPO, check=False
    )
    assert ignored.returncode == 0


def test_fetch_wheels_dry_run_names_the_pinned_312_wheels(tmp_path):
    fake, log = _fake_python(tmp_path)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--fetch-wheels", "--dry-run"],
        capture_output=True,
        text=True,
        env=_env(tmp_path, fake),
        timeout=60,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 14 and all("pip download" in line for line in lines)
    assert all("--python-version 3.12" in line and "--no-deps" in line for line in lines)
    pins = (REPO / "constraints.txt").read_text()
    for spec in ("grain==0.2.18", "array_record==0.8.6", "ml_collections==1.1.0"):
        assert spec in pins and any(line.endswith(spec) for line in lines)
    assert any("tensorflow-datasets==" in line for line in lines)
    assert not log.exists() and not (tmp_path / "wheels").exists()


def test_a_timed_out_and_a_failed_part_are_recorded_and_fail_the_check(tmp_path):
    fake, log = _fake_python(tmp_path)
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n")
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        capture_output=True,
        text=True,
        env=_env(tmp_path, fake, GPU_CHECK_TIMEOUT_TRAIN="2"),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED: train decode" in proc.stderr
    assert "=== train TIMED OUT after 2 s" in proc.stdout
    records = {r["part"]: r for r in _json_lines((tmp_path / "out/gpu_check.jsonl").read_text())}
    assert records["install"]["ok"] and records["tests"]["ok"]
    assert records["tests"]["note"] == "3 passed in 0.1s"
    assert records["train"] == {
        "part": "train",
        "ok": False,
        "error": "timed out after 2 s",
        "seconds": records["train"]["seconds"],
    }
    assert records["vl"]["ok"] and records["vl"]["step_s"] == 1.5
    assert records["decode"]["error"] == "exit status 3: decode broke"
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "## GPU check" in doc and "| train | FAILED: timed out after 2 s" in doc
    assert "| vl | Qwen3VLForConditionalGeneration" in doc
    assert (tmp_path / "out/gpu_check.md").read_text() in doc
    assert (tmp_path / "out/decode.log").read_text() == "decode broke\n"
    calls = log.read_text()
    assert "-m pip install" in calls and "--no-build-isolation -e" in calls
    assert "-m pytest -p no:cacheprovider -x -q" in calls
