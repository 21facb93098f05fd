"""One process of a two-process learner job on CPU (run by `test_multiprocess.py`).

    python tests/multiprocess_learner.py PROCESS_ID PORT OUT_DIR

Each process has four CPU devices; `jax.distributed` joins them into one eight-device mesh
that splits the parameters over both processes (fsdp = 8). Process i feeds rows
[4i, 4i + 4) of each global batch of `learner_cases.batch`, as its own input pipeline would:
the rows of process 0 are trained up to token 13 and those of process 1 up to token 23, so
the learner must agree on one token length. The run checks the cross-process helpers, takes
two GGPO updates with a KL reference and recomputed old log-probs, saves a checkpoint with a
different pipeline position per process and restores it into a new learner. Then a tiny
Qwen3-VL learner takes two updates on segments with images, process i feeding its own rows
after its own visual stage: process 0's rows fit the 64-patch bucket, process 1's need 128,
so the learner must agree on the patch bucket as on the token length. It writes
`OUT_DIR/process-{i}.json` (metrics, restored positions, the VL metrics, local patch buckets
and the global shapes placed) and, on process 0, `OUT_DIR/params.npz` and
`OUT_DIR/vl_params.npz` (the whole parameters after the updates).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

PROCESSES = 2
ROWS = 8  # global batch
LAST_TRAINED = (13, 23)  # per process
LENGTH_BUCKET = 8

# The vision-language job: two segments per process, each showing one image; process 0's
# images need 8 patches (its pipeline pads them to the 64-patch bucket), process 1's need 80
# (128-patch bucket), and their sampled tokens end at different lengths.
VL_ROWS_PER_PROCESS = 2
VL_IMAGES = ((32, 64), (128, 160))  # resized height, width per process
VL_TOKENS = 48
VL_MAX_PATCHES = 256
VL_LEARNING_RATE = 0.1


def loss_config():
    from vimrag_jax.rl.losses import LossConfig

    return dataclasses.replace(
        LossConfig.for_algorithm("ggpo"), kl_coef=0.1, old_logprobs="recompute"
    )


def global_batch(seed: int) -> dict[str, np.ndarray]:
    """The batch both processes' rows make up (the test trains on it in one process)."""
    import learner_cases

    batch = learner_cases.batch(seed, ROWS)
    half = ROWS // PROCESSES
    for process, last in enumerate(LAST_TRAINED):
        batch["loss_mask"][process * half : (process + 1) * half, last + 1 :] = False
    return batch


def local_rows(batch: dict[str, np.ndarray], process: int) -> dict[str, np.ndarray]:
    half = ROWS // PROCESSES
    return {key: value[process * half : (process + 1) * half] for key, value in batch.items()}


# --- the vision-language job ------------------------------------------------------------


def vl_model_fn():
    """The tiny random Qwen3-VL policy (float32)."""
    from flax import nnx

    from vimrag_jax.models.presets import init_model, preset_config

    return init_model(preset_config("tiny-vl"), rngs=nnx.Rngs(0))


def vl_model() -> Any:
    """`vl_model_fn`'s policy with random weights from NumPy (host arrays, the same on every
    process): an initialisation compile of the VL model would cost as much as its step."""
    from flax import nnx

    model = nnx.eval_shape(vl_model_fn)
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        center = 1.0 if path[-1] == "scale" else 0.0  # norm scales near 1
        var.set_value((center + 0.08 * rng.standard_normal(shape)).astype(np.float32))
    return model


def vl_params() -> Any:
    """The parameters of `vl_model` (an ``nnx.State`` of host arrays)."""
    from flax import nnx

    return nnx.state(vl_model(), nnx.Param)


def vl_stage():
    """The learner pipeline's `VisualInputs` stage over a world of random pictures (item i is
    a 160x160 picture; a reference resizes it), bucketing patches per batch as each
    process's own pipeline does."""
    from vimrag_jax.data.vision import VisualInputs, VisualPatches
    from vimrag_jax.models.presets import preset_config
    from vimrag_jax.models.qwen3_vl import Qwen3VLConfig

    def load_visual(item: int, frame: int) -> np.ndarray:
        return np.random.default_rng([item, frame]).integers(0, 256, (160, 160, 3), np.uint8)

    patches = VisualPatches(load_visual, lambda item: "image")
    config = Qwen3VLConfig.from_hf(preset_config("tiny-vl"))
    return VisualInputs(patches, max_patches=VL_MAX_PATCHES, model_config=config)


def vl_global_batch(seed: int) -> dict[str, np.ndarray]:
    """The records both processes' rows make up, before the visual stage: process p's rows
    show a ``VL_IMAGES[p]`` picture in their prompt, then eight sampled tokens."""
    from learner_cases import DIMS

    from vimrag_jax.data.segments import batch_spec
    from vimrag_jax.models.presets import preset_config
    from vimrag_jax.rollout.records import RecordDims

    hf = preset_config("tiny-vl")
    rows = VL_ROWS_PER_PROCESS * PROCESSES
    dims = RecordDims(nodes=DIMS.nodes, items=DIMS.items, segments=3, tokens=VL_TOKENS, visuals=1)
    out = {key: np.zeros(shape, dtype) for key, (shape, dtype) in batch_spec(rows, dims).items()}
    rng = np.random.default_rng(seed)
    for row in range(rows):
        height, width = VL_IMAGES[row // VL_ROWS_PER_PROCESS]
        placeholders = [hf["image_token_id"]] * (height * width // 32**2)
        image = [hf["vision_start_token_id"], *placeholders, hf["vision_end_token_id"]]
        prompt = [*rng.integers(1, 1000, 3), *image, *rng.integers(1, 1000, 2)]
        sampled = rng.integers(1, 1000, 8).tolist()
        out["tokens"][row, : len(prompt) + len(sampled)] = prompt + sampled
        out["loss_mask"][row, len(prompt) : len(prompt) + len(sampled)] = True
        out["segment_visuals"][row, 0] = (row, 0, height, width)
        out["segment_visual_valid"][row, 0] = True
    out["behavior_logprobs"] = np.where(
        out["loss_mask"], rng.normal(-7.5, 0.1, out["loss_mask"].shape), 0.0
    ).astype(np.float32)
    out["segment_valid"][:] = True
    out["reward"] = (np.arange(rows) % 2).astype(np.float32)
    out["advantage"] = np.where(out["reward"] > 0, 1.0, -1.0).astype(np.float32)
    out["adjacency"][:, 0, 1] = out["adjacency"][:, 1, 2] = True
    out["node_valid"][:] = True
    out["answer_node"][:] = 2
    out["segment_node"] = (np.arange(rows) % 3).astype(np.int32)
    out["relevant"][:, 1] = True
    return out


def vl_local_rows(batch: dict[str, np.ndarray], process: int) -> dict[str, np.ndarray]:
    """Process ``process``'s rows of a VL global batch."""
    rows = slice(process * VL_ROWS_PER_PROCESS, (process + 1) * VL_ROWS_PER_PROCESS)
    return {key: value[rows] for key, value in batch.items()}


def vl_learner():
    """A learner of the tiny Qwen3-VL policy on a two-device data-parallel mesh: one device
    of each process (in one process, its first two devices: the same layout), at a fraction
    of an eight-device compile's cost."""
    import jax
    import optax

    from vimrag_jax.learner import Learner
    from vimrag_jax.parallel.mesh import make_mesh

    if jax.process_count() > 1:
        devices = [jax.local_devices(process_index=p)[0] for p in range(PROCESSES)]
    else:
        devices = jax.devices()[:PROCESSES]
    return Learner(
        vl_model_fn,
        optax.sgd(VL_LEARNING_RATE),
        loss_config(),
        make_mesh(PROCESSES, 1, 1, devices=devices),
        length_bucket=LENGTH_BUCKET,
    )


def main(process: int, port: int, out: Path) -> None:
    import jax

    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=PROCESSES,
        process_id=process,
        initialization_timeout=120,
    )
    import learner_cases

    from vimrag_jax import distributed
    from vimrag_jax.checkpointing import Checkpointer, this_process_data
    from vimrag_jax.learner import Learner
    from vimrag_jax.parallel.mesh import make_mesh

    assert (jax.process_count(), jax.device_count()) == (PROCESSES, 8)
    report: dict = {
        "max": distributed.max_over_processes(7 * process),
        "broadcast": distributed.broadcast_from_main(5 + process),
        # Lengths differ across processes (the padding must not leak into the values).
        "gathered": distributed.gather_json({"process": process, "text": "é" * (40 * process)}),
    }

    mesh = make_mesh(1, 8, 1)
    learner = Learner(
        learner_cases.model_fn,
        learner_cases.optimizer(),
        loss_config(),
        mesh,
        length_bucket=LENGTH_BUCKET,
    )
    learner.initialize()
    report["metrics"] = [
        learner.train_step(local_rows(global_batch(seed), process)) for seed in range(2)
    ]
    # Parameters split over both processes: gathered whole for the one that saves them.
    params = jax.tree.leaves(learner.model())
    if process == 0:
        np.savez(out / "params.npz", *[np.asarray(leaf) for leaf in params])

    position = {"process": process, "cursor": [process] * (3 + process)}
    with Checkpointer(out / "checkpoints", every_steps=1, keep=1, async_save=False) as ckpt:
        learner.save(ckpt, 2, data_state=position, metadata={"phase": "rl"}, force=True)
    resumed = Learner(learner_cases.model_fn, learner_cases.optimizer(), loss_config(), mesh)
    with Checkpointer(out / "checkpoints", every_steps=1, keep=1, async_save=False) as ckpt:
        restored = resumed.restore(ckpt)
    report["restored_position"] = this_process_data(restored)
    report["restored_step"] = resumed.step
    same = [
        bool(np.array_equal(distributed.to_host(a), distributed.to_host(b)))
        for a, b in zip(
            jax.tree.leaves(learner.params()), jax.tree.leaves(resumed.params()), strict=True
        )
    ]
    report["restored_params_equal"] = all(same)

    # Images on both processes, in different patch buckets: one global batch all the same.
    vl = vl_learner()
    vl.initialize(vl_params())
    stage = vl_stage()
    local = [stage(vl_local_rows(vl_global_batch(seed), process)) for seed in range(2)]
    report["vl_patch_rows"] = [int(batch["pixel_values"].shape[1]) for batch in local]
    # The global shapes this process placed: every process must build the same global batch
    # (the same program on every process; JAX does not check it).
    placed: set[tuple[int, ...]] = set()
    make_array = jax.make_array_from_process_local_data

    def recording(sharding, data, global_shape):
        placed.add(tuple(int(n) for n in global_shape))
        return make_array(sharding, data, global_shape)

    jax.make_array_from_process_local_data = recording
    try:
        report["vl_metrics"] = [vl.train_step(batch) for batch in local]
    finally:
        jax.make_array_from_process_local_data = make_array
    report["vl_global_shapes"] = sorted(placed)
    if process == 0:  # the parameters are replicated: this process's copy is all of them
        leaves = jax.tree.leaves(vl.params())
        assert all(leaf.sharding.is_fully_replicated for leaf in leaves)
        vl_saved = [np.asarray(leaf.addressable_shards[0].data) for leaf in leaves]
        np.savez(out / "vl_params.npz", *vl_saved)
    (out / f"process-{process}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    # Before JAX starts: four CPU devices per process.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
