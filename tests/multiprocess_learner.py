"""One process of a two-process learner job on CPU (run by `test_multiprocess.py`).

    python tests/multiprocess_learner.py PROCESS_ID PORT OUT_DIR

Each process has four CPU devices; `jax.distributed` joins them into one eight-device mesh
that splits the parameters over both processes (fsdp = 8). Process i feeds rows
[4i, 4i + 4) of each global batch of `learner_cases.batch`, as its own input pipeline would:
the rows of process 0 are trained up to token 13 and those of process 1 up to token 23, so
the learner must agree on one token length. The run checks the cross-process helpers, takes
two GGPO updates with a KL reference and recomputed old log-probs, saves a checkpoint with a
different pipeline position per process, restores it into a new learner, and writes
`OUT_DIR/process-{i}.json` (metrics, restored positions) and, on process 0,
`OUT_DIR/params.npz` (the whole parameters after the updates).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

PROCESSES = 2
ROWS = 8  # global batch
LAST_TRAINED = (13, 23)  # per process
LENGTH_BUCKET = 8


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
    (out / f"process-{process}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    # Before JAX starts: four CPU devices per process.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
