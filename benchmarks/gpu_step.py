"""The GPU check's measurements, with random weights of the real sizes (`gpu_check.sh` runs it).

Three parts, each printed as one JSON line on stdout (logs go to stderr):

- ``train``: the Qwen3-1.7B RL step in bfloat16 through the project's own learner
  (`vimrag_jax.learner.Learner`, its pjit step of `vimrag_jax.parallel.step`) on a synthetic
  loss batch built like ``tests/learner_cases.py`` (a root -> 1 -> 2 graph, the second half of
  every segment trained), ``--train-rows`` segments of ``--train-len`` tokens, one optimizer
  update per step: tokens/s and MFU against ``--peak-tflops`` (989: an H100 SXM's dense bf16).
- ``vl``: the Qwen3-VL-2B step at the paper's visual budget (SPEC §2: ``memory.total_pixels``
  = 1,310,720 memory pixels as ``memory.top_k`` images, plus the ``rollout.retrieval_top_k``
  = 3 retrieved observations of ``observation_pixels`` each), shapes from
  `vimrag_jax.footprint.loss_batch_shapes` at `footprint.max_patches` patch rows, random
  pixels, one segment row per forward/backward pass (``--vl-micro-batches``): time per step and
  the device's peak memory.
- ``decode``: KV-cache decoding with the project's `Sampler` on the 1.7B at batch 64 (greedy,
  no EOS): tokens/s of the decode loop alone (a ``max_new_tokens`` run minus a 1-token run,
  which differ only in decode steps) and end to end.

FLOPs (stated in each line's ``flops_formula``) are `vimrag_jax.plan.step_flops`, the planner's
analytic count: 2 per multiply-add of every matmul over the batch's tokens (and, for Qwen3-VL,
its vision patch rows) incl. the LM head, causal attention at half its square (``2·layers·
tokens·L·heads·head_dim``), times 3 for forward and backward — i.e. 6·N·T plus attention.
``mfu`` uses that model count; ``hfu`` adds the recomputed forward of remat (4 passes).

Each measurement follows ``--warmup`` untimed calls (the first compiles) and is the median of
``--steps`` timed calls, each ended by `jax.block_until_ready`. A step that runs out of device
memory is retried with twice the micro-batches (``oom_retries`` counts them). ``--smoke``
swaps in the tiny presets and short sequences so that every part runs on a CPU in seconds
(``tests/test_gpu_check.py``); the figures are then meaningless, the fields the same.

    python benchmarks/gpu_step.py --part train [--part vl ...] [--smoke]
    python benchmarks/gpu_step.py --record results.jsonl --doc docs/benchmarks.md \\
        --machine "NVIDIA H100 80GB HBM3" --command "bash benchmarks/gpu_check.sh"

``--record`` (no JAX needed) turns the JSON lines of a run into a Markdown block and appends
it to the ``## GPU check`` section of ``--doc`` (created at the end when absent; the block goes
after the section's last line, before the next ``## `` heading), then prints it.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import inspect
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PARTS = ("train", "vl", "decode")
SECTION = "## GPU check"
PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16 (no sparsity)

#: Real sizes (``full``) and the CPU stand-ins of ``--smoke``. ``vl_pixels`` None: the budget
#: of the run config (SPEC §2); the smoke budget keeps 32×32-pixel images (4 patches each).
SIZES: dict[str, dict[str, Any]] = {
    "full": dict(
        train_model="qwen3-1.7b",
        train_rows=16,
        train_len=4096,
        train_micro_batches=1,
        vl_model="hf",  # configs/ggpo.py:qwen3vl_2b's policy (Qwen3-VL-2B-Instruct)
        vl_rows=4,
        vl_len=8192,  # the qwen3vl presets' data.max_segment_tokens
        vl_micro_batches=4,
        vl_total_pixels=None,
        vl_patch_rows=0,  # 0: footprint.max_patches of the run config
        decode_model="qwen3-1.7b",
        decode_batch=64,
        decode_prompt=512,
        decode_new=256,
    ),
    "smoke": dict(
        train_model="tiny",
        train_rows=4,
        train_len=64,
        train_micro_batches=1,
        vl_model="tiny-vl",
        vl_rows=2,
        vl_len=128,
        vl_micro_batches=1,
        vl_total_pixels=5 * 32 * 32,
        vl_patch_rows=64,
        decode_model="tiny",
        decode_batch=4,
        decode_prompt=16,
        decode_new=32,
    ),
}


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON lines)."""
    print(f"[gpu_step {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_config(preset: str = "qwen3vl_2b") -> Any:
    """``configs/ggpo.py:<preset>`` (the paper's budgets, graph sizes and optimizer)."""
    spec = importlib.util.spec_from_file_location("_ggpo_config", REPO / "configs" / "ggpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def part_config(
    model: str, rows: int, length: int, micro_batches: int, args: argparse.Namespace
) -> Any:
    """The qwen3vl_2b run config resized for one part on one device: ``model`` (a preset of
    `vimrag_jax.models`, or "hf" for the run preset's Qwen3-VL-2B), ``rows`` segments of
    ``length`` tokens, one optimizer update per step (``loss.num_minibatches`` 1, no KL)."""
    cfg = run_config()
    cfg.model.update(name=model, dtype=args.dtype, remat=args.remat)
    cfg.data.update(batch_segments=rows, max_segment_tokens=length)
    cfg.rollout.max_new_tokens = min(int(cfg.rollout.max_new_tokens), length // 2)
    cfg.optim.micro_batches = micro_batches
    cfg.loss.update(num_minibatches=1, kl_coef=0.0)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    return cfg


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """`init_model` keywords beyond dtype and remat that this checkout's `init_model` takes
    (``scan_layers``: one scanned layer body compiles in a fraction of the unrolled time)."""
    from vimrag_jax.models.presets import init_model

    takes = inspect.signature(init_model).parameters
    options: dict[str, Any] = {}
    if "scan_layers" in takes and args.scan_layers != "off":
        options["scan_layers"] = True
    elif args.scan_layers == "on":
        raise ValueError("--scan-layers on: this checkout's init_model has no scan_layers")
    if args.remat_policy and "remat_policy" in takes:
        options["remat_policy"] = args.remat_policy
    return options


def model_builder(hf: dict[str, Any], cfg: Any, options: dict[str, Any]):
    """A seeded builder of the policy as the learner builds it (`footprint.model_fn`), plus
    ``options``."""
    from flax import nnx

    from vimrag_jax.models.presets import init_model

    dtype, remat = str(cfg.model.dtype), bool(cfg.model.remat)
    return lambda: init_model(hf, rngs=nnx.Rngs(0), dtype=dtype, remat=remat, **options)


def loss_batch(cfg: Any, hf: dict[str, Any], *, visual: bool, seed: int = 0) -> dict[str, Any]:
    """A synthetic loss batch of ``cfg``'s shapes (`footprint.loss_batch_shapes`), filled as
    ``tests/learner_cases.batch`` fills its own: random prompt tokens, the second half of each
    segment trained with behaviour log-probs near -5.5, rewards alternating 0 / 1 with
    advantages -1 / +1, every segment on a root -> 1 -> 2 (answer) graph with a dead end 3.

    With ``visual`` each row also shows the paper's visual budget: ``memory.top_k`` square
    images of ``total_pixels / top_k`` pixels and ``retrieval_top_k`` observations of
    ``observation_pixels``, placeholders in the prompt, random pixels, and the vision
    tables and MRoPE positions of `data.vision.segment_model_inputs`.
    """
    from vimrag_jax import footprint

    rows, length = int(cfg.data.batch_segments), int(cfg.data.max_segment_tokens)
    shapes = footprint.loss_batch_shapes(cfg, rows, visual=visual)
    out = {key: np.zeros(s.shape, s.dtype) for key, s in shapes.items()}
    text = hf.get("text_config", hf)
    top = int(text["vocab_size"])
    if visual:
        top = min(top, *(int(hf[k]) for k in ("image_token_id", "vision_start_token_id")))
    rng = np.random.default_rng(seed)
    prompt = length // 2
    out["tokens"] = rng.integers(1, top, (rows, length)).astype(np.int32)
    out["loss_mask"][:, prompt:] = True
    out["behavior_logprobs"] = np.where(
        out["loss_mask"], rng.normal(-5.5, 0.1, (rows, length)), 0.0
    ).astype(np.float32)
    out["segment_valid"][:] = True
    out["reward"] = (np.arange(rows) % 2).astype(np.float32)
    out["advantage"] = np.where(out["reward"] > 0, 1.0, -1.0).astype(np.float32)
    out["adjacency"][:, 0, 1] = out["adjacency"][:, 1, 2] = out["adjacency"][:, 0, 3] = True
    out["node_valid"][:, :4] = True
    out["answer_node"][:] = 2
    out["segment_node"] = (np.arange(rows) % 4).astype(np.int32)
    out["relevant"][:, 1] = True
    if visual:
        _fill_visuals(out, cfg, hf, prompt, rng)
    return out


def visual_budget(cfg: Any) -> list[tuple[int, int, int]]:
    """The ``(t, h, w)`` patch grids of one segment's images at the run config's budget: the
    visual memory (``top_k`` images sharing ``total_pixels``) and one retrieval observation
    (``retrieval_top_k`` images of ``observation_pixels``), each a square whose side is a
    multiple of 32 pixels (two merged 16-pixel patches)."""
    from vimrag_jax.agent.config import RolloutConfig

    rollout = RolloutConfig.from_config(cfg)

    def grid(pixels: int) -> tuple[int, int, int]:
        side = max(32, int(math.isqrt(pixels)) // 32 * 32)
        return (1, side // 16, side // 16)

    memory = [grid(rollout.total_pixels // rollout.top_k)] * rollout.top_k
    return memory + [grid(rollout.observation_pixels)] * rollout.retrieval_top_k


def _fill_visuals(
    out: dict[str, np.ndarray], cfg: Any, hf: dict[str, Any], prompt: int, rng: Any
) -> None:
    from vimrag_jax.data.vision import PATCH_DIM, VisualItem, segment_model_inputs
    from vimrag_jax.models.qwen3_vl import Qwen3VLConfig

    config = Qwen3VLConfig.from_hf(hf)
    rows, length = out["tokens"].shape
    patch_rows = out["pixel_values"].shape[1]
    grids = visual_budget(cfg)
    sizes = [t * h * w for t, h, w in grids]
    if sum(sizes) > patch_rows:
        raise ValueError(f"the budget's {sum(sizes)} patches exceed {patch_rows} patch rows")
    pixels = rng.standard_normal((sum(sizes), PATCH_DIM), dtype=np.float32)
    items, start = [], 0
    for grid, size in zip(grids, sizes, strict=True):
        ref = ((0, 0, 0, 0),)
        items.append(VisualItem("image", ref, pixels[start : start + size], grid))
        start += size
    # Placeholders: after a short text head, each image's merged tokens between its
    # vision start / end tokens; the rest of the prompt is text.
    tokens = out["tokens"][0].copy()
    at = 16
    for size in sizes:
        merged = size // config.vision.merge_unit
        tokens[at] = config.vision_start_token_id
        tokens[at + 1 : at + 1 + merged] = config.image_token_id
        tokens[at + 1 + merged] = int(hf.get("vision_end_token_id", config.vision_start_token_id))
        at += merged + 2
    if at > prompt:
        raise ValueError(f"{at} prompt tokens of placeholders do not fit a {prompt}-token prompt")
    positions, index, tables = segment_model_inputs(config, tokens, prompt, items, patch_rows)
    out["tokens"][:] = tokens
    out["pixel_values"][:, : sum(sizes)] = pixels
    out["position_ids"][:] = positions
    out["visual_token_index"][:] = index
    out["vision_interp_index"][:] = tables.interp_index
    out["vision_interp_weight"][:] = tables.interp_weight
    out["vision_rotary_hw"][:] = tables.rotary_hw
    out["vision_segment"][:] = tables.segment


def device_info() -> dict[str, Any]:
    """The JAX version and the first device, for every line."""
    import jax
    import jaxlib

    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "devices": jax.device_count(),
    }


def peak_bytes() -> int | None:
    """The first local device's peak memory in use (None where the backend keeps no stats,
    e.g. the CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else int(peak)


def _is_oom(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _timed(fn, warmup: int, steps: int) -> tuple[float, list[float]]:
    """(seconds of the first call, seconds of each timed call) of ``fn`` (which blocks)."""
    began = time.perf_counter()
    fn()
    first = time.perf_counter() - began
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return first, times


def learner_step(
    part: str, model: str, rows: int, length: int, micro_batches: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Times the learner's RL step for a part (``train``: text; ``vl``: with images)."""
    import jax

    from vimrag_jax import footprint, plan
    from vimrag_jax.learner import Learner
    from vimrag_jax.optim import make_optimizer
    from vimrag_jax.parallel.mesh import mesh_from_config
    from vimrag_jax.rl.losses import LossConfig

    visual = part == "vl"
    sizes = SIZES["smoke" if args.smoke else "full"]
    retries = 0
    while True:
        cfg = part_config(model, rows, length, micro_batches, args)
        if visual:
            if sizes["vl_total_pixels"]:
                cfg.memory.total_pixels = int(sizes["vl_total_pixels"])
            cfg.data.max_patches = int(args.vl_patch_rows or footprint.max_patches(cfg))
        hf = footprint.model_hf_config(cfg)
        options = model_options(args)
        log(f"{part}: {model} rows={rows} len={length} micro_batches={micro_batches} {options}")
        batch = loss_batch(cfg, hf, visual=visual)
        mesh = mesh_from_config(cfg.mesh, devices=jax.devices()[:1])
        learner = Learner(
            model_builder(hf, cfg, options),
            make_optimizer(cfg.optim),
            LossConfig.from_config(cfg.loss),
            mesh,
            step_kind="pjit",
            micro_batches=micro_batches,
        )
        metrics: dict[str, float] = {}

        def step(learner=learner, batch=batch, metrics=metrics):
            metrics.update(learner.train_step(batch))
            jax.block_until_ready(learner.state)

        try:
            began = time.perf_counter()
            learner.initialize()
            jax.block_until_ready(learner.state)
            init_s = time.perf_counter() - began
            first, times = _timed(step, args.warmup, args.steps)
            break
        except Exception as error:  # noqa: BLE001 - only out-of-memory is retried
            if not _is_oom(error) or micro_batches * 2 > rows:
                raise
        # Out of the except block, whose traceback kept the learner's buffers alive.
        del learner, step
        gc.collect()
        retries += 1
        micro_batches *= 2
        log(f"{part}: out of memory; retrying with micro_batches={micro_batches}")
    seconds = statistics.median(times)
    model_cfg = cfg.copy_and_resolve_references()
    model_cfg.model.remat = False
    model_flops = plan.step_flops(model_cfg, hf)
    hardware_flops = plan.step_flops(cfg, hf)
    peak = args.peak_tflops * 1e12
    tokens = rows * length
    result = {
        "model": hf.get("architectures", ["?"])[0] if model == "hf" else model,
        "dtype": str(cfg.model.dtype),
        "remat": bool(cfg.model.remat),
        "model_options": options,
        "rows": rows,
        "seq_len": length,
        "micro_batches": micro_batches,
        "oom_retries": retries,
        "init_s": round(init_s, 2),
        "first_step_s": round(first, 2),
        "step_s": round(seconds, 6),
        "step_s_all": [round(t, 4) for t in times],
        "tokens_per_s": round(tokens / seconds, 1),
        "flops_per_step": model_flops,
        "flops_formula": (
            "vimrag_jax.plan.step_flops without remat: 3 x (2 x matmul MACs over rows x seq_len "
            "tokens incl. LM head [+ vision patch rows] + 2 x layers x tokens x seq_len x heads x "
            "head_dim causal attention) = 6NT + attention"
        ),
        "tflops_per_s": round(model_flops / seconds / 1e12, 2),
        "mfu": round(model_flops / seconds / peak, 4),
        "hfu": round(hardware_flops / seconds / peak, 4),
        "peak_tflops": args.peak_tflops,
        "peak_bytes": peak_bytes(),
        "loss": metrics.get("loss"),
    }
    if visual:
        grids = visual_budget(cfg)
        result.update(
            patch_rows=int(cfg.data.max_patches),
            patches_real=int(sum(t * h * w for t, h, w in grids)),
            images=len(grids),
            memory_pixels=int(cfg.memory.total_pixels),
        )
    return result


def decode(args: argparse.Namespace) -> dict[str, Any]:
    """KV-cache decode tokens/s of the project's `Sampler` (greedy, no stop token)."""
    import jax
    from flax import nnx

    from vimrag_jax.models.presets import init_model, preset_config
    from vimrag_jax.sampling.sampler import Sampler

    sizes = SIZES["smoke" if args.smoke else "full"]
    name, batch = sizes["decode_model"], args.decode_batch or sizes["decode_batch"]
    prompt, new = sizes["decode_prompt"], args.decode_new or sizes["decode_new"]
    hf = preset_config(name)
    log(f"decode: {name} batch={batch} prompt={prompt} new={new}")

    def build():
        return init_model(hf, rngs=nnx.Rngs(0), dtype=args.dtype)

    # Initialised in one jitted call on the device (eagerly, every parameter's initializer
    # would compile and run on its own).
    graphdef, _ = nnx.split(nnx.eval_shape(build))
    model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(build()))())
    sampler = Sampler(
        model,
        max_prompt_len=prompt,
        max_new_tokens=new,
        eos_token_ids=(),
        pad_token_id=0,
        batch_buckets=(batch,),
        length_buckets=(prompt,),
    )
    vocab = int(hf.get("text_config", hf)["vocab_size"])
    prompts = np.random.default_rng(0).integers(1, vocab, (batch, prompt)).tolist()
    counts: list[int] = []

    def run(max_new: int):
        out = sampler.generate(prompts, greedy=True, max_new_tokens=max_new)
        counts.append(sum(len(c.tokens) for c in out))

    first, full = _timed(lambda: run(new), args.warmup, args.steps)
    if counts[-1] != batch * new:
        raise RuntimeError(f"decode made {counts[-1]} tokens, not {batch} x {new}")
    _, one = _timed(lambda: run(1), 1, args.steps)  # same programs: max_new is an input
    loop_s = statistics.median(full) - statistics.median(one)
    return {
        "model": name,
        "dtype": args.dtype,
        "batch": batch,
        "prompt_len": prompt,
        "new_tokens": new,
        "first_call_s": round(first, 2),
        "generate_s": round(statistics.median(full), 6),
        "generate_s_all": [round(t, 4) for t in full],
        "prefill_and_one_token_s": round(statistics.median(one), 4),
        "tokens_per_s": round(batch * (new - 1) / loop_s, 1) if loop_s > 0 else None,
        "end_to_end_tokens_per_s": round(batch * new / statistics.median(full), 1),
        "peak_bytes": peak_bytes(),
    }


def measure(part: str, args: argparse.Namespace) -> dict[str, Any]:
    """One part's JSON record; ``ok`` False with the error when it raised."""
    sizes = SIZES["smoke" if args.smoke else "full"]
    began = time.perf_counter()
    record: dict[str, Any] = {"part": part, "smoke": bool(args.smoke)}
    try:
        record.update(device_info())
        if part == "decode":
            record.update(decode(args))
        else:
            record.update(
                learner_step(
                    part,
                    sizes[f"{part}_model"],
                    getattr(args, f"{part}_rows") or sizes[f"{part}_rows"],
                    getattr(args, f"{part}_len") or sizes[f"{part}_len"],
                    getattr(args, f"{part}_micro_batches") or sizes[f"{part}_micro_batches"],
                    args,
                )
            )
        record["ok"] = True
    except Exception as error:  # noqa: BLE001 - reported, and the exit status says so
        traceback.print_exc()
        record.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000])
    record["seconds"] = round(time.perf_counter() - began, 1)
    return record


# --- the record in docs/benchmarks.md -------------------------------------------------------


def _gib(count: Any) -> str:
    return "n/a" if count is None else f"{count / (1 << 30):.1f} GiB"


def format_record(records: list[dict[str, Any]], *, machine: str, command: str, date: str) -> str:
    """The Markdown block of one GPU check run."""
    info = next((r for r in records if r.get("jax")), {})
    lines = [
        f"### {date} — {machine or info.get('device', 'unknown device')}",
        "",
        f"`{command}`; jax {info.get('jax', '?')} (jaxlib {info.get('jaxlib', '?')}), "
        f"backend {info.get('backend', '?')}, device {info.get('device', '?')}.",
        "",
        "| part | result |",
        "| --- | --- |",
    ]
    for r in records:
        part = r.get("part", "?")
        if not r.get("ok"):
            text = f"FAILED: {r.get('error', 'no result')}".replace("|", "/").replace("\n", " ")
        elif part == "train":
            text = (
                f"{r['model']} {r['dtype']}, {r['rows']} × {r['seq_len']} tokens, "
                f"micro-batches {r['micro_batches']}, remat {r['remat']}"
                f"{''.join(f', {key}' for key in r['model_options'])}: step {r['step_s']:.3f} s, "
                f"{r['tokens_per_s']:,.0f} tokens/s, {r['tflops_per_s']} TFLOP/s, "
                f"MFU {100 * r['mfu']:.1f} % (HFU {100 * r['hfu']:.1f} %) of "
                f"{r['peak_tflops']:g} TFLOP/s; peak {_gib(r['peak_bytes'])}; first step "
                f"(compile) {r['first_step_s']} s"
            )
        elif part == "vl":
            text = (
                f"{r['model']} {r['dtype']}, {r['rows']} × {r['seq_len']} tokens, "
                f"{r['images']} images = {r['patches_real']:,} patches in {r['patch_rows']:,} "
                f"patch rows per segment ({r['memory_pixels']:,} memory pixels + observations), "
                f"micro-batches {r['micro_batches']}: step {r['step_s']:.3f} s, peak "
                f"{_gib(r['peak_bytes'])}, MFU {100 * r['mfu']:.1f} %; first step (compile) "
                f"{r['first_step_s']} s"
            )
        elif part == "decode":
            rate = r["tokens_per_s"]
            text = (
                f"{r['model']} {r['dtype']}, batch {r['batch']}, prompt {r['prompt_len']}, "
                f"+{r['new_tokens']} greedy: decode {rate:,.0f} tokens/s "
                if rate
                else f"{r['model']}: decode rate n/a "
            )
            text += (
                f"(end to end {r['end_to_end_tokens_per_s']:,.0f}); peak "
                f"{_gib(r['peak_bytes'])}; first call {r['first_call_s']} s"
            )
        else:
            text = str(r.get("note", "ok"))
        if r.get("smoke"):
            text = f"smoke sizes (not a measurement): {text}"
        seconds = r.get("seconds")
        lines.append(f"| {part} | {text}{'' if seconds is None else f' ({seconds} s)'} |")
    return "\n".join(lines) + "\n"


def append_to_section(doc: Path, block: str) -> None:
    """Appends ``block`` to the ``## GPU check`` section of ``doc`` (its heading may go on, as in
    ``## GPU check — ...``; the section is created at the end of the file when absent; the
    block goes before the next ``## `` heading)."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next(
        (
            i
            for i, line in enumerate(lines)
            if line.rstrip() == SECTION or line.startswith(SECTION + " ")
        ),
        None,
    )
    if start is None:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{block}"
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        head = "".join(lines[:end]).rstrip("\n") + "\n\n" + block
        tail = "".join(lines[end:])
        text = head + ("\n" + tail if tail else "")
    doc.write_text(text)


def record(args: argparse.Namespace) -> int:
    """``--record``: the run's JSON lines into the doc; prints the block. The machine, command
    and date come from the flags, else from the run's ``meta`` line (`gpu_check.sh` writes
    one), else now."""
    records = []
    for line in Path(args.record).read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            records.append(json.loads(line))
    meta = next((r for r in records if r.get("part") == "meta"), {})
    records = [r for r in records if r.get("part") != "meta"]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = format_record(
        records,
        machine=args.machine or meta.get("machine", ""),
        command=args.command or meta.get("command", "bash benchmarks/gpu_check.sh"),
        date=args.date or meta.get("date", now),
    )
    append_to_section(Path(args.doc), block)
    print(block, end="")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", action="append", choices=PARTS, help="repeatable; default all")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (runs on a CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls (the first compiles)")
    parser.add_argument("--steps", type=int, default=3, help="timed calls")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--no-remat", dest="remat", action="store_false")
    parser.add_argument("--scan-layers", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--remat-policy", default="", help="init_model's, where it has one")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    for part in ("train", "vl"):
        parser.add_argument(f"--{part}-rows", type=int, default=0)
        parser.add_argument(f"--{part}-len", type=int, default=0)
        parser.add_argument(f"--{part}-micro-batches", type=int, default=0)
    parser.add_argument("--vl-patch-rows", type=int, default=0, help="0: the budget's bound")
    parser.add_argument("--decode-batch", type=int, default=0)
    parser.add_argument("--decode-new", type=int, default=0)
    parser.add_argument("--record", default="", help="JSON lines of a run to record")
    parser.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--machine", default="")
    parser.add_argument("--command", default="")
    parser.add_argument("--date", default="")
    args = parser.parse_args(argv)
    if args.smoke and not args.vl_patch_rows:
        args.vl_patch_rows = SIZES["smoke"]["vl_patch_rows"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.record:
        return record(args)
    ok = True
    for part in args.part or PARTS:
        result = measure(part, args)
        print(json.dumps(result), flush=True)
        ok &= bool(result["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
