"""The learner's state machine: train state on the mesh, the pjit or pmap step, checkpoints.

`Learner` owns everything one training phase needs: the policy's graphdef and `TrainState`
(created sharded, or restored from the newest orbax checkpoint), the jitted update of
`vimrag_jax.parallel.step` (pjit over the config's mesh, or pmap over the local devices; both
wrap the same pure `update`), batch placement, and conversion of a host batch from the grain
pipeline into the arrays the loss reads. `vimrag_jax.train` drives phases with it.

A Qwen3-VL policy (a model with `prepare_prefill`) trains on its segments' images and videos:
its batches must carry the vision inputs of `sampling.logprobs.VISUAL_KEYS` (the pipeline's
`data.vision.VisualInputs` stage adds them), which the update and the frozen reference policy
read. A text-only policy ignores them.

Checkpoints always hold the mesh-layout state (a pmap learner saves device 0's copy and
replicates on restore), so a run may switch between `step = "pjit"` and `"pmap"` on resume.

On several processes (pjit only) each process feeds its own slice of the global batch, as its
input pipeline read it: the slices become one global array per key
(`jax.make_array_from_process_local_data`), the token length and (for a vision-language policy)
the visual patch bucket are agreed across processes (`pad_patches`), and the frozen reference
policy's log-probs are computed on the devices, in the batch's layout, so no process ever
needs another's rows on its host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from vimrag_jax import distributed
from vimrag_jax.checkpointing import Checkpointer, Restored, abstract_train_state
from vimrag_jax.parallel import step as step_lib
from vimrag_jax.parallel.sharding import batch_shardings
from vimrag_jax.rl.losses import LossConfig
from vimrag_jax.sampling.logprobs import VISUAL_KEYS, VISUAL_TOKEN_KEYS
from vimrag_jax.schema import LOSS_KEYS, SegmentBatch


def loss_inputs(batch: Mapping[str, np.ndarray], *, visual: bool = False) -> SegmentBatch:
    """The arrays of a pipeline batch the loss reads (`schema.LOSS_KEYS`; a KeyError names a
    missing one; the pipeline's other keys stay on the host); with
    ``visual`` (a Qwen3-VL policy) also the segments' vision inputs (`VISUAL_KEYS`)."""
    keys = LOSS_KEYS + (VISUAL_KEYS if visual else ())
    missing = [key for key in keys if key not in batch]
    if missing:
        hint = ""
        if visual and set(missing) & set(VISUAL_KEYS):
            hint = (
                " (a vision-language policy needs the pipeline's visual stage: "
                "data.vision.visual_stage / VisualInputs with the model config)"
            )
        raise KeyError(f"the input batch lacks {missing}{hint}; it has {sorted(batch)}")
    return {key: np.asarray(batch[key]) for key in keys}


# Loss inputs with a token axis, the last one (trimmed together by `trim_tokens`).
TOKEN_AXIS_KEYS = ("tokens", "loss_mask", "behavior_logprobs", *VISUAL_TOKEN_KEYS)


def trimmed_length(inputs: Mapping[str, np.ndarray], bucket: int) -> int:
    """The token length ``trim_tokens`` cuts ``inputs`` to: just past the last trained token,
    rounded up to a multiple of ``bucket`` (0: the full length)."""
    if bucket < 0:
        raise ValueError(f"bucket must be >= 0, got {bucket}")
    full = int(np.shape(inputs["tokens"])[-1])
    if bucket == 0:
        return full
    used = np.flatnonzero(np.any(np.asarray(inputs["loss_mask"], bool), axis=0))
    needed = int(used[-1]) + 1 if used.size else 1
    return min(full, -(-needed // bucket) * bucket)


def trim_tokens(
    inputs: Mapping[str, np.ndarray], bucket: int, *, length: int | None = None
) -> dict[str, np.ndarray]:
    """``inputs`` with the token axis cut to ``length`` (default: ``trimmed_length``, i.e.
    after the last trained token, rounded up to a multiple of ``bucket``; 0 keeps the full
    length).

    Exact for every loss: the policy is causal, so the log-prob of a token never depends on
    the tokens after it, and no term reads a position past the last one in ``loss_mask``.
    Records are padded to ``data.max_segment_tokens`` while most segments are much shorter;
    a few bucket lengths (one compile each) save the rest of the work. On several processes
    the learner passes the longest of their lengths, so every process's slice of the global
    batch has one shape.
    """
    if length is None:
        length = trimmed_length(inputs, bucket)
    return {
        key: (value[..., :length] if key in TOKEN_AXIS_KEYS else value)
        for key, value in inputs.items()
    }


# Loss inputs with a patch axis (axis 1: ``[B, P, ...]``) and the value of their padding rows:
# no pixels, zero interpolation weights and tables, and segment -1 (a padding patch attends
# only to itself and no placeholder token reads its merged row).
PATCH_AXIS_PADDING: dict[str, int | float] = {
    "pixel_values": 0.0,
    "vision_interp_index": 0,
    "vision_interp_weight": 0.0,
    "vision_rotary_hw": 0,
    "vision_segment": -1,
}


def patch_rows(inputs: Mapping[str, np.ndarray]) -> int:
    """The patch rows ``P`` of loss inputs' vision arrays (0 without them: a text-only
    policy). Raises ValueError when the vision arrays disagree on ``P``."""
    rows = {int(np.shape(inputs[key])[1]) for key in PATCH_AXIS_PADDING if key in inputs}
    if len(rows) > 1:
        raise ValueError(f"the vision inputs disagree on their patch rows: {sorted(rows)}")
    return rows.pop() if rows else 0


def pad_patches(inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """``inputs`` with the vision arrays' patch axis padded to ``rows`` (`PATCH_AXIS_PADDING`).

    Each process's pipeline picks its own patch bucket (`data.vision.VisualInputs.patch_rows`:
    the smallest power of two holding its own largest row), so on several processes the
    learner pads every slice to the largest bucket of any process: the global batch needs
    one shape. Exact: padding patches attend only to themselves in the vision tower (segment
    -1), form whole merged rows after the real ones (``rows`` and ``P`` are multiples of the
    merge unit), and no placeholder token reads them (``visual_token_index`` only names real
    rows). Text-only inputs and inputs already ``rows`` long come back unchanged. Raises
    ValueError when ``rows`` is smaller than the current ``P``.
    """
    current = patch_rows(inputs)
    if current == rows or current == 0:
        return dict(inputs)
    if rows < current:
        raise ValueError(f"cannot pad {current} patch rows down to {rows}")
    out = dict(inputs)
    for key, fill in PATCH_AXIS_PADDING.items():
        value = np.asarray(inputs[key])
        widths = [(0, 0)] * value.ndim
        widths[1] = (0, rows - current)
        out[key] = np.pad(value, widths, constant_values=np.asarray(fill, value.dtype))
    return out


def batch_token_counts(batch: Mapping[str, np.ndarray], pad_token_id: int) -> tuple[int, int]:
    """(tokens of valid segments that are not padding, policy tokens trained on)."""
    valid = np.asarray(batch["segment_valid"], bool)[:, None]
    tokens = int(np.sum((np.asarray(batch["tokens"]) != pad_token_id) & valid))
    trained = int(np.sum(np.asarray(batch["loss_mask"], bool) & valid))
    return tokens, trained


class Learner:
    """One phase's train state and step (see the module docstring).

    Args:
      model_fn: builds the policy with seeded Rngs; traced abstractly for shapes and, for a
        fresh start, jitted into the mesh shards (never materialised on one device).
      optimizer: the phase's optax transformation.
      loss_config: the phase's objective (static in the step).
      mesh: the device mesh (pjit layout; pmap uses its devices along one axis).
      step_kind: ``"pjit"`` or ``"pmap"``.
      length_bucket: trim each batch's token axis to a multiple of this many tokens past its
        last trained token (`trim_tokens`; one compile per length met); 0 never trims.
      micro_batches: sequential forward/backward passes per optimizer step, the gradient
        accumulated over them (`parallel.step.update`); bounds activation memory.
    """

    def __init__(
        self,
        model_fn: Callable[[], nnx.Module],
        optimizer: optax.GradientTransformation,
        loss_config: LossConfig,
        mesh: Mesh,
        *,
        step_kind: str = "pjit",
        length_bucket: int = 0,
        micro_batches: int = 1,
    ):
        if step_kind not in ("pjit", "pmap"):
            raise ValueError(f"step must be 'pjit' or 'pmap', got {step_kind!r}")
        if length_bucket < 0:
            raise ValueError(f"length_bucket must be >= 0, got {length_bucket}")
        if step_kind == "pmap" and jax.process_count() > 1:
            raise ValueError(
                "the pmap step runs on one process; use step='pjit' on several processes"
            )
        if type(micro_batches) is not int or micro_batches < 1:
            raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
        self.length_bucket = int(length_bucket)
        self.micro_batches = micro_batches
        self.model_fn = model_fn
        self.optimizer = optimizer
        self.loss_config = loss_config
        self.mesh = mesh
        self.step_kind = step_kind
        self.abstract = abstract_train_state(model_fn, optimizer, mesh)
        self.shardings = jax.tree.map(lambda x: x.sharding, self.abstract)
        with nnx.use_eager_sharding(False):
            abstract_model = nnx.eval_shape(model_fn)
            self.graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
        # A vision-language policy reads each segment's images and videos.
        self.takes_visuals = hasattr(abstract_model, "prepare_prefill")
        self.state: step_lib.TrainState | None = None
        self._step_fn: Callable | None = None
        self._batch_shardings: Any = None
        # The frozen reference policy of the k3 KL term (loss.kl_coef > 0): the parameters
        # this phase started from, kept in the mesh layout.
        self.ref_params: nnx.State | None = None
        self._ref_fn = jax.jit(self._policy_logprobs)
        # The same forward with its output in the batch's layout (pjit; set by `_compile`).
        self._logprob_fn: Callable | None = None

    def _policy_logprobs(self, params, tokens, visual=None):
        return step_lib.policy_logprobs(nnx.merge(self.graphdef, params), tokens, visual)

    # --- state ----------------------------------------------------------------------

    def initialize(self, params: Any | None = None) -> None:
        """A fresh state: new parameters from `model_fn`, or `params` (e.g. the previous
        phase's) with a new optimizer state."""
        if params is None:
            _, state, _ = step_lib.create_train_state(self.model_fn, self.optimizer, self.mesh)
        else:  # in the stored dtype (model.param_dtype) and layout of this learner's state
            params = jax.tree.map(lambda x, a: x.astype(a.dtype), params, self.abstract.params)
            params = jax.device_put(params, self.shardings.params)
            opt_state = jax.jit(self.optimizer.init, out_shardings=self.shardings.opt_state)(params)
            step = jax.device_put(np.zeros((), np.int32), self.shardings.step)
            state = step_lib.TrainState(step=step, params=params, opt_state=opt_state)
        self._set_state(state)
        self._keep_reference()

    def restore(self, checkpointer: Checkpointer) -> Restored | None:
        """Loads the newest checkpoint into the learner; returns what it held (its
        ``data_state`` through `checkpointing.this_process_data`) or None."""
        restored = checkpointer.restore_latest(self.abstract)
        if restored is None:
            return None
        self._set_state(restored.state)
        self._keep_reference()
        return restored

    def save(
        self,
        checkpointer: Checkpointer,
        step: int,
        *,
        data_state: Mapping[str, Any],
        metadata: Mapping[str, Any],
        force: bool = False,
    ) -> bool:
        """Saves the mesh-layout state at checkpoint `step` (when the interval says so)."""
        return checkpointer.save(
            step, self.mesh_state(), data_state=data_state, metadata=metadata, force=force
        )

    def mesh_state(self) -> step_lib.TrainState:
        """The state in the mesh layout (device 0's copy for a pmap learner)."""
        if self.state is None:
            raise RuntimeError("the learner has no state yet: call initialize() or restore()")
        if self.step_kind == "pjit":
            return self.state
        return jax.device_put(step_lib.unreplicate(self.state), self.shardings)

    def params(self) -> nnx.State:
        """The policy parameters in the mesh layout."""
        return self.mesh_state().params

    def model(self) -> nnx.Module:
        """The policy as an NNX module over the current parameters (for evaluation, export).

        On several processes its parameters are whole NumPy arrays gathered onto this host
        (collective: every process must call it), so that one process can run or save the
        policy alone; on one process they stay on the devices.
        """
        params = self.params()
        if jax.process_count() > 1:
            params = jax.tree.map(distributed.to_host, params)
        return nnx.merge(self.graphdef, params)

    @property
    def step(self) -> int:
        """Update calls applied in this phase (`TrainState.step`)."""
        step = self.state.step if self.step_kind == "pjit" else self.state.step[0]
        return int(jax.device_get(step))

    def _keep_reference(self) -> None:
        # A copy, not an alias: the train state's buffers are donated to each step. A resumed
        # run uses the restored parameters (the original start is not in the checkpoint).
        if self.loss_config.kl_coef > 0:
            self.ref_params = jax.tree.map(lambda x: x.copy(), self.params())

    def reference_logprobs(
        self, tokens: np.ndarray, visual: Mapping[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """`float32[B, L]` log-probs of `tokens` under the frozen reference policy (with the
        segments' vision inputs `visual` for a vision-language policy)."""
        if self.ref_params is None:
            raise RuntimeError("no reference policy: loss.kl_coef is 0")
        return np.asarray(jax.device_get(self._ref_fn(self.ref_params, tokens, visual)))

    def _visual(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The vision inputs of loss inputs (None for a text-only policy)."""
        if not self.takes_visuals:
            return None
        return {key: inputs[key] for key in VISUAL_KEYS}

    def _set_state(self, state: step_lib.TrainState) -> None:
        if self.step_kind == "pmap":
            devices = self.mesh.devices.reshape(-1).tolist()
            state = step_lib.replicate_for_pmap(jax.device_get(state), devices)
        self.state = state

    # --- the update -----------------------------------------------------------------

    def _compile(self, inputs: Mapping[str, np.ndarray]) -> None:
        kwargs = dict(
            graphdef=self.graphdef,
            optimizer=self.optimizer,
            loss_config=self.loss_config,
            micro_batches=self.micro_batches,
        )
        if self.step_kind == "pjit":
            # Shardings follow the global batch: every process holds 1/process_count of it.
            count = jax.process_count()
            abstract = {
                key: jax.ShapeDtypeStruct((value.shape[0] * count, *value.shape[1:]), value.dtype)
                for key, value in inputs.items()
            }
            if self.ref_params is not None:  # added on the devices before each update
                shape = abstract["tokens"].shape
                abstract["ref_logprobs"] = jax.ShapeDtypeStruct(shape, np.float32)
            self._batch_shardings = batch_shardings(abstract, self.mesh)
            self._step_fn = step_lib.make_pjit_step(
                **kwargs,
                mesh=self.mesh,
                state_shardings=self.shardings,
                batch_shardings=self._batch_shardings,
            )
            self._logprob_fn = jax.jit(
                self._policy_logprobs, out_shardings=self._batch_shardings["tokens"]
            )
        else:
            devices = self.mesh.devices.reshape(-1).tolist()
            self._devices = devices
            self._step_fn = step_lib.make_pmap_step(**kwargs, devices=devices)

    def lower(self, inputs: Mapping[str, Any]) -> jax.stages.Lowered:
        """The pjit step lowered for this process's loss inputs ``inputs`` (arrays or
        `jax.ShapeDtypeStruct`s: only shapes and dtypes are read) and the abstract train state:
        what `vimrag_jax.plan` compiles to read XLA's memory and cost analyses."""
        if self.step_kind != "pjit":
            raise ValueError("only the pjit step can be lowered for planning; set step='pjit'")
        inputs = dict(inputs)
        if self.loss_config.kl_coef > 0 and self.ref_params is None:  # the reference's input
            inputs["ref_logprobs"] = jax.ShapeDtypeStruct(inputs["tokens"].shape, np.float32)
        self._compile(inputs)
        count = jax.process_count()
        batch = {
            key: jax.ShapeDtypeStruct(
                (value.shape[0] * count, *value.shape[1:]),
                value.dtype,
                sharding=self._batch_shardings[key],
            )
            for key, value in inputs.items()
        }
        return self._step_fn.lower(self.abstract, batch)

    def _place(self, inputs: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of the batch, as global arrays over the mesh (pjit)."""
        count = jax.process_count()
        return {
            key: jax.make_array_from_process_local_data(
                self._batch_shardings[key],
                value,
                (value.shape[0] * count, *value.shape[1:]),
            )
            for key, value in inputs.items()
        }

    def train_step(self, batch: SegmentBatch) -> dict[str, float]:
        """One update on this process's host batch; returns host float metrics incl.
        `step_time_s` (placement, the reference policy's forward and the update)."""
        if self.state is None:
            raise RuntimeError("the learner has no state yet: call initialize() or restore()")
        inputs = loss_inputs(batch, visual=self.takes_visuals)
        length = distributed.max_over_processes(trimmed_length(inputs, self.length_bucket))
        inputs = trim_tokens(inputs, self.length_bucket, length=length)
        if self.takes_visuals:  # one patch bucket too: each pipeline picked its own
            inputs = pad_patches(inputs, distributed.max_over_processes(patch_rows(inputs)))
        if self._step_fn is None:
            self._compile(inputs)
        began = time.perf_counter()
        if self.step_kind == "pjit":
            placed = self._place(inputs)
            visual = self._visual(placed)
            if self.ref_params is not None:
                placed["ref_logprobs"] = self._logprob_fn(self.ref_params, placed["tokens"], visual)
            self.state, metrics = self._step_fn(self.state, placed)
        else:
            visual = self._visual(inputs)
            if self.ref_params is not None:
                inputs["ref_logprobs"] = self.reference_logprobs(inputs["tokens"], visual)
            placed = step_lib.shard_batch_for_pmap(inputs, self._devices)
            self.state, metrics = self._step_fn(self.state, placed)
            metrics = step_lib.unreplicate(metrics)
        metrics = {key: float(value) for key, value in jax.device_get(metrics).items()}
        metrics["step_time_s"] = time.perf_counter() - began
        return metrics
