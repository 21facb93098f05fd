"""Plan a run before launching it: compile the train step for N devices on this CPU and read
what XLA says each device needs.

    python -m vimrag_jax.plan --config=configs/ggpo.py:qwen3vl_8b --devices=16 \\
        [--device_memory_gb=80] [--json] [--config.optim.micro_batches=8 ...]

No weights are read: the policy's sizes come from the preset's published config (or
``model.path``'s ``config.json``), the train state and the loss batch are abstract arrays with the
shardings the learner gives them, and the learner's own pjit step (`Learner.lower`) is lowered
and compiled for ``--devices`` fake CPU devices over the config's mesh. Printed per device:
parameters, optimizer state, the batch, activations and temporaries (XLA's memory analysis; they
include the gradients), the peak, FLOPs per step, and whether the peak fits the device memory —
beside the analytic estimate `config_checks` uses (`vimrag_jax.footprint`). With ``--json`` the
last line printed is one JSON object (SPEC §5: ``devices``, ``device_memory_bytes``,
``bytes_per_device``, ``fits``, ``params_bytes``, ``optimizer_bytes``, ``activation_bytes``,
``flops_per_step``, and more).

XLA's CPU backend plans memory as an accelerator's would (buffer assignment over the same
partitioned program), but it fuses differently and may keep bfloat16 arithmetic in float32, so
the figures are close to, not equal to, a GPU's or TPU's; leave a few GiB of headroom. XLA's cost
analysis counts a loop body once, so ``flops_per_step`` is analytic (`step_flops`) and XLA's
figure is reported as ``xla_flops_per_device`` for reference. The embedded sampler's KV cache is
sized analytically per device (`kv_cache_bytes`, split over ``rollout.sampler_tensor``); it
runs on the rollout workers, not beside this step.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from vimrag_jax import footprint

_FLAGS: dict[str, flags.FlagHolder] = {}


def _define_flags() -> None:
    """The command's flags, defined only when it runs (other programs share absl's flags)."""
    _FLAGS.update(
        config=config_flags.DEFINE_config_file(
            "config", None, "Run config, e.g. configs/ggpo.py:qwen3vl_8b.", lock_config=True
        ),
        devices=flags.DEFINE_integer("devices", None, "Devices the run will use (all processes)."),
        memory=flags.DEFINE_float(
            "device_memory_gb",
            None,
            "Memory of one device in GiB (default: config.mesh.device_memory_gb, else 80).",
        ),
        json=flags.DEFINE_bool("json", False, "End with one line of JSON."),
    )


def step_flops(cfg: Any, hf: dict[str, Any]) -> float:
    """Analytic FLOPs of one RL step call (all devices): 2 per multiply-add of every matmul
    over the batch's tokens and patches at the longest segment, times 3 for forward and backward,
    plus one forward per ``model.remat``, for the recomputed old log-probs of minibatched GSPO
    and for the KL reference; causal attention at half its square."""
    text = footprint.text_config(hf)
    d, ff, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text.get("head_dim") or d // heads
    rows, length = int(cfg.data.batch_segments), int(cfg.data.max_segment_tokens)
    tokens = rows * length
    layer_params = d * (heads + 2 * kv) * head_dim + heads * head_dim * d + 3 * d * ff
    forward = 2 * tokens * (layers * layer_params + d * text["vocab_size"])
    forward += 2 * layers * tokens * length * heads * head_dim  # QK^T and PV, causal half
    vision = hf.get("vision_config")
    if vision is not None:
        patches = rows * footprint.max_patches(cfg)
        dv, ffv = vision["hidden_size"], vision["intermediate_size"]
        block = 4 * dv * dv + 2 * dv * ffv
        merger = (4 * dv) ** 2 + 4 * dv * text["hidden_size"]
        mergers = 1 + len(vision.get("deepstack_visual_indexes", ()))
        forward += 2 * patches * vision["depth"] * block + 2 * patches // 4 * merger * mergers
    passes = 3 + bool(cfg.model.remat)
    loss = cfg.loss
    if int(loss.get("num_minibatches", 1)) > 1 and loss.get("old_logprobs") == "recompute":
        passes += 1
    if float(loss.get("kl_coef", 0.0)) > 0:
        passes += 1
    return float(forward * passes)


def kv_cache_bytes(cfg: Any, hf: dict[str, Any]) -> int:
    """The embedded sampler's KV cache per device for one worker batch (``group_size ×
    questions_per_batch`` rows at ``data.max_segment_tokens``) in the compute dtype, split over
    ``rollout.sampler_tensor`` devices (by key/value head)."""
    text = footprint.text_config(hf)
    rows = int(cfg.rollout.group_size) * int(cfg.rollout.questions_per_batch)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    itemsize = 2 if cfg.model.dtype == "bfloat16" else 4
    per_token = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim
    tensor = int(cfg.rollout.get("sampler_tensor", 1))
    return rows * int(cfg.data.max_segment_tokens) * per_token * itemsize // tensor


def compile_step(cfg: Any, num_devices: int) -> dict[str, Any]:
    """Lowers and compiles the learner's RL step for ``cfg`` on the first ``num_devices``
    devices; returns XLA's per-device memory figures, its FLOPs and the compile time."""
    import jax

    from vimrag_jax.learner import Learner
    from vimrag_jax.optim import make_optimizer
    from vimrag_jax.parallel.mesh import mesh_from_config
    from vimrag_jax.rl.losses import LossConfig

    hf = footprint.model_hf_config(cfg)
    mesh = mesh_from_config(cfg.mesh, devices=jax.devices()[:num_devices])
    learner = Learner(
        footprint.model_fn(cfg, hf),
        make_optimizer(cfg.optim, param_dtype=footprint.param_dtype(cfg)),
        LossConfig.from_config(cfg.loss),
        mesh,
        step_kind="pjit",
        micro_batches=int(cfg.optim.micro_batches),
    )
    inputs = footprint.loss_batch_shapes(
        cfg, int(cfg.data.batch_segments), visual=learner.takes_visuals
    )
    began = time.perf_counter()
    compiled = learner.lower(inputs).compile()
    seconds = time.perf_counter() - began
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    return {
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "peak_bytes": int(peak),
        "xla_flops_per_device": float((cost or {}).get("flops", 0.0)),
        "compile_s": round(seconds, 1),
    }


def make_plan(cfg: Any, num_devices: int, device_memory_bytes: int) -> dict[str, Any]:
    """The plan's figures (the ``--json`` object): compiled and estimated, per device."""
    from vimrag_jax.parallel.mesh import resolve_mesh_shape

    hf = footprint.model_hf_config(cfg)
    shape = resolve_mesh_shape((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), num_devices)
    estimate = footprint.estimate(cfg, num_devices)
    compiled = compile_step(cfg, num_devices)
    peak = compiled["peak_bytes"]
    return {
        "config": str(cfg.preset),
        "devices": num_devices,
        "mesh": dict(zip(("data", "fsdp", "tensor"), shape, strict=True)),
        "rows_per_pass": footprint.rows_per_pass(cfg, shape[0] * shape[1]),
        "device_memory_bytes": int(device_memory_bytes),
        "bytes_per_device": peak,
        "fits": bool(peak <= device_memory_bytes),
        "params_bytes": estimate.params_bytes,
        "optimizer_bytes": estimate.optimizer_bytes,
        "gradients_bytes": estimate.gradients_bytes,
        "batch_bytes": estimate.batch_bytes,
        "activation_bytes": compiled["temp_bytes"],
        "estimated_activation_bytes": estimate.activation_bytes,
        "estimated_bytes_per_device": estimate.total_bytes,
        "kv_cache_bytes": kv_cache_bytes(cfg, hf),
        "flops_per_step": step_flops(cfg, hf),
        **{key: compiled[key] for key in ("xla_flops_per_device", "compile_s")},
        **{key: compiled[key] for key in ("argument_bytes", "output_bytes", "alias_bytes")},
    }


def format_plan(plan: dict[str, Any]) -> str:
    """The human table of a plan."""
    b = footprint.format_bytes
    mesh = " ".join(f"{k}={v}" for k, v in plan["mesh"].items())
    lines = [
        f"plan: {plan['config']} on {plan['devices']} devices (mesh {mesh}), "
        f"{b(plan['device_memory_bytes'])} each; {plan['rows_per_pass']} segment rows per "
        f"device per pass; compiled in {plan['compile_s']} s",
        f"  {'per device':32s}{'compiled (XLA)':>16s}{'estimate':>14s}",
        f"  {'parameters':32s}{'':>16s}{b(plan['params_bytes']):>14s}",
        f"  {'optimizer state':32s}{'':>16s}{b(plan['optimizer_bytes']):>14s}",
        f"  {'batch':32s}{'':>16s}{b(plan['batch_bytes']):>14s}",
        f"  {'arguments (state + batch)':32s}{b(plan['argument_bytes']):>16s}"
        f"{b(plan['params_bytes'] + plan['optimizer_bytes'] + plan['batch_bytes']):>14s}",
        f"  {'gradients':32s}{'(in temps)':>16s}{b(plan['gradients_bytes']):>14s}",
        f"  {'activations + temporaries':32s}{b(plan['activation_bytes']):>16s}"
        f"{b(plan['estimated_activation_bytes']):>14s}",
        f"  {'peak':32s}{b(plan['bytes_per_device']):>16s}"
        f"{b(plan['estimated_bytes_per_device']):>14s}",
        f"  FLOPs per step (all devices, analytic): {plan['flops_per_step']:.3e}",
        f"  embedded sampler KV cache per device (one worker batch): {b(plan['kv_cache_bytes'])}",
    ]
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    lines.append(
        f"  {verdict}: peak {b(plan['bytes_per_device'])} of {b(plan['device_memory_bytes'])}"
    )
    if not plan["fits"]:
        lines.append(
            "  raise config.optim.micro_batches (fewer rows per pass), shard wider "
            "(config.mesh.fsdp / tensor) or use more devices"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg, devices = _FLAGS["config"].value, _FLAGS["devices"].value
    if cfg is None or not devices or devices < 1:
        raise app.UsageError("--config and --devices (>= 1) are required")
    import jax

    # Before anything touches a backend: N fake CPU devices stand for the accelerators.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", int(devices))
    gib = _FLAGS["memory"].value
    if gib is None:
        gib = float(cfg.mesh.get("device_memory_gb", 0) or 80)
    plan = make_plan(cfg, int(devices), int(gib * footprint.GIB))
    print(format_plan(plan), flush=True)
    if _FLAGS["json"].value:
        print(json.dumps(plan, sort_keys=True))
    return 0 if plan["fits"] else 1


if __name__ == "__main__":
    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
