"""Batched KV-cache sampler: prefill + `lax.while_loop` decode on static, bucketed shapes.

The sampler drives any model with the decoding protocol of `Qwen3ForCausalLM`:

- `model.prefill(input_ids, attention_mask, *, cache_size) -> (logits_last float32[B, V], cache)`
  for left-padded prompts `int32[B, P]` (mask 1 on real tokens, last column real);
- `model.decode_step(tokens int32[B], cache) -> (logits float32[B, V], cache)`, the cache a
  pytree of fixed shapes.

A model may also take extra prefill inputs (images, videos): it then has
`model.prefill(input_ids, attention_mask, *, cache_size, **arrays)` and a host-side
`model.prepare_prefill(input_ids, attention_mask, row_inputs) -> arrays` that turns one mapping
per prompt (processor-style `pixel_values`, `image_grid_thw`, ...) into the batch's jit-able
arrays, padded to fixed buckets (`Qwen3VLForConditionalGeneration` does both; its decode steps
continue from each row's MRoPE text position).

Prompts are left-padded to a length bucket and the batch to a batch bucket, so a new shape
compiles once. The jitted functions take the model's state as an argument: `set_weights` swaps in
a new policy version without recompiling.

On an accelerator node the sampler can hold the policy tensor-parallel (`mesh`, a
``(1, 1, tensor)`` mesh from `parallel.mesh.make_mesh`): attention heads, key/value heads, MLP
units and the vocabulary are split over ``tensor`` (`SAMPLER_RULES`), so the KV cache, which
the attention writes per key/value head, is split the same way; ``param_dtype="bfloat16"``
stores the weights in bfloat16. An 8B policy (16 GB of bfloat16 weights, 36 GB of KV cache for
16 rows of 8,192 tokens) then takes a share per device of one 8-GPU node or TPU host.

Log-probs returned with each token are those of the model's distribution (raw softmax of the
logits), not of the temperature / top-p distribution it was drawn from: the learner computes the
same quantity (`vimrag_jax.sampling.logprobs`), so their difference is the off-policy gap only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from vimrag_jax.models.params import cast_floats
from vimrag_jax.parallel.sharding import DEFAULT_RULES, param_shardings, under_mesh
from vimrag_jax.sampling.logprobs import picked_logprobs

#: Tensor parallelism for generation: the learner's rules with nothing split over ``fsdp``
#: (a sampler's mesh is ``(1, 1, tensor)``; weights gathered per step would cost more than
#: they save at decode batch sizes).
SAMPLER_RULES = tuple((name, None if axes == "fsdp" else axes) for name, axes in DEFAULT_RULES)

FinishReason = Literal["stop", "length"]


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated continuation.

    `tokens` are the sampled ids, including the stop token or the tokens that complete the stop
    string (they were sampled, so the learner trains on them); `logprobs[i]` is the model's
    log-prob of `tokens[i]`. `finish_reason` is "stop" (a stop/EOS token or stop string) or
    "length"; `stop_text` is the stop string that ended it, else None.
    """

    tokens: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    stop_text: str | None = None


@struct.dataclass
class _Loop:
    """Decode-loop carry: the last logits, the cache and the output buffers."""

    logits_bv: jax.Array
    cache: Any
    tokens_bn: jax.Array  # int32[B, N] sampled tokens (row b's first count_b are real)
    logprobs_bn: jax.Array  # float32[B, N]
    count_b: jax.Array  # int32[B] tokens generated so far
    done_b: jax.Array  # bool[B] finished (stop token, length, or stopped by the host)
    step: jax.Array  # int32[] decode steps taken


@struct.dataclass
class _Settings:
    """Per-call sampling settings, passed as arrays so changing them does not recompile."""

    temperature: jax.Array  # float32[]
    top_p: jax.Array  # float32[]
    greedy: jax.Array  # bool[]
    stop_ids: jax.Array  # int32[S] (padded with -1)
    max_new: jax.Array  # int32[] <= N
    key: jax.Array  # PRNG key


def sample_tokens(
    logits_bv: jax.Array,
    key: jax.Array,
    *,
    temperature: jax.Array | float,
    top_p: jax.Array | float,
    greedy: jax.Array | bool,
) -> jax.Array:
    """`int32[B]`: argmax when `greedy`, else a draw from softmax(logits / temperature) cut to
    the smallest set of top tokens whose probability reaches `top_p` (the top token always
    stays, so a tiny `top_p` is greedy). Row b uses `fold_in(key, b)`.
    """
    logits_bv = logits_bv.astype(jnp.float32)
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    scaled_bv = logits_bv / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)

    def nucleus(scaled_bv):
        sorted_bv = jnp.sort(scaled_bv, axis=-1)[:, ::-1]
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
        keep_bv = mass_before_bv < top_p
        keep_bv = keep_bv.at[:, 0].set(True)
        num_kept_b = jnp.sum(keep_bv, axis=-1)
        threshold_b = jnp.take_along_axis(sorted_bv, num_kept_b[:, None] - 1, axis=-1)
        return jnp.where(scaled_bv >= threshold_b, scaled_bv, -jnp.inf)

    scaled_bv = jax.lax.cond(jnp.asarray(top_p) < 1.0, nucleus, lambda x: x, scaled_bv)
    keys_b = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(logits_bv.shape[0]))
    drawn_b = jax.vmap(jax.random.categorical)(keys_b, scaled_bv).astype(jnp.int32)
    return jnp.where(greedy, greedy_b, drawn_b)


def _decode_loop(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    loop: _Loop,
    settings: _Settings,
    until_step: jax.Array,
    pad_token_id: int,
) -> _Loop:
    """Samples until every row is done, `max_new` tokens, or `until_step` steps."""
    model = nnx.merge(graphdef, state)

    def cond(loop: _Loop):
        return (loop.step < until_step) & (loop.step < settings.max_new) & ~jnp.all(loop.done_b)

    def body(loop: _Loop) -> _Loop:
        key = jax.random.fold_in(settings.key, loop.step)
        token_b = sample_tokens(
            loop.logits_bv,
            key,
            temperature=settings.temperature,
            top_p=settings.top_p,
            greedy=settings.greedy,
        )
        token_b = jnp.where(loop.done_b, pad_token_id, token_b)
        logp_b = picked_logprobs(loop.logits_bv, token_b)
        live_b = ~loop.done_b
        tokens_bn = loop.tokens_bn.at[:, loop.step].set(token_b)
        logprobs_bn = loop.logprobs_bn.at[:, loop.step].set(jnp.where(live_b, logp_b, 0.0))
        count_b = loop.count_b + live_b.astype(jnp.int32)
        stopped_b = jnp.any(token_b[:, None] == settings.stop_ids[None, :], axis=-1)
        done_b = loop.done_b | stopped_b | (count_b >= settings.max_new)
        # Rows already done keep feeding padding; their cache slots are never read by live rows.
        logits_bv, cache = model.decode_step(token_b, loop.cache)
        return _Loop(logits_bv, cache, tokens_bn, logprobs_bn, count_b, done_b, loop.step + 1)

    return jax.lax.while_loop(cond, body, loop)


def _prefill(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    ids_bp: jax.Array,
    mask_bp: jax.Array,
    extra: dict[str, Any],
    cache_size: int,
    max_new_tokens: int,
) -> _Loop:
    model = nnx.merge(graphdef, state)
    logits_bv, cache = model.prefill(ids_bp, mask_bp, cache_size=cache_size, **extra)
    b = ids_bp.shape[0]
    return _Loop(
        logits_bv=logits_bv,
        cache=cache,
        tokens_bn=jnp.zeros((b, max_new_tokens), jnp.int32),
        logprobs_bn=jnp.zeros((b, max_new_tokens), jnp.float32),
        count_b=jnp.zeros((b,), jnp.int32),
        done_b=jnp.zeros((b,), bool),
        step=jnp.zeros((), jnp.int32),
    )


def _default_length_buckets(max_prompt_len: int) -> tuple[int, ...]:
    buckets, size = [], 16
    while size < max_prompt_len:
        buckets.append(size)
        size *= 2
    return (*buckets, max_prompt_len)


class Sampler:
    """Generates completions of token prompts with a KV cache on static, bucketed shapes.

    Args:
      model: an NNX model with `prefill` / `decode_step` (see the module docstring).
      max_prompt_len: longest prompt accepted (tokens).
      max_new_tokens: most tokens generated per prompt; the cache holds
        `prompt bucket + max_new_tokens` slots.
      eos_token_ids: tokens that always end a row ("stop").
      pad_token_id: id fed for padding (any valid id; it is masked out).
      batch_buckets: batch sizes compiled for; a call with more prompts is split into groups
        of the largest bucket.
      length_buckets: prompt lengths compiled for (default 16, 32, ... up to max_prompt_len).
      chunk_size: decode steps per device call when stop strings must be checked on the host.
      patch_bucket: for a model with prefill inputs, the patch rows its vision tower is
        compiled for given a batch group's patch count (default: the model's, the next power
        of two of at least 64).
      mesh: hold the weights (and so the KV cache) tensor-parallel over this mesh's
        ``tensor`` axis (`SAMPLER_RULES`); None keeps them where they are.
      param_dtype: store floating-point weights in this dtype (e.g. ``"bfloat16"``); None
        keeps the model's.
    """

    def __init__(
        self,
        model: nnx.Module,
        *,
        max_prompt_len: int,
        max_new_tokens: int,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        batch_buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
        length_buckets: Sequence[int] | None = None,
        chunk_size: int = 16,
        patch_bucket: Callable[[int], int] | None = None,
        mesh: jax.sharding.Mesh | None = None,
        param_dtype: str | None = None,
    ):
        if max_prompt_len < 1 or max_new_tokens < 1 or chunk_size < 1:
            raise ValueError(
                "max_prompt_len, max_new_tokens and chunk_size must be >= 1, got "
                f"{max_prompt_len}, {max_new_tokens}, {chunk_size}."
            )
        lengths = sorted(set(length_buckets or _default_length_buckets(max_prompt_len)))
        if lengths[0] < 1 or lengths[-1] < max_prompt_len:
            raise ValueError(
                f"length_buckets {lengths} must be >= 1 and reach max_prompt_len={max_prompt_len}."
            )
        batches = sorted(set(batch_buckets))
        if not batches or batches[0] < 1:
            raise ValueError(f"batch_buckets must be non-empty and >= 1, got {batch_buckets}.")
        self.max_prompt_len = max_prompt_len
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.pad_token_id = int(pad_token_id)
        self.batch_buckets = tuple(batches)
        self.length_buckets = tuple(length for length in lengths if length <= max_prompt_len)
        if self.length_buckets[-1] < max_prompt_len:
            self.length_buckets += (max_prompt_len,)
        self.chunk_size = chunk_size
        self._takes_prefill_inputs = hasattr(model, "prepare_prefill")
        self.patch_bucket = patch_bucket
        self.mesh = mesh
        self.param_dtype = None if param_dtype is None else jnp.dtype(param_dtype)
        self._graphdef, state = nnx.split(model)
        self._shardings = None if mesh is None else param_shardings(state, mesh, SAMPLER_RULES)
        self._state = self._place(state)
        prefill = functools.partial(_prefill, self._graphdef)
        decode = functools.partial(_decode_loop, self._graphdef, pad_token_id=self.pad_token_id)
        if mesh is not None:  # traced under the mesh, as the learner's step
            prefill, decode = under_mesh(prefill, mesh), under_mesh(decode, mesh)
        self._prefill_fn = jax.jit(prefill, static_argnames=("cache_size", "max_new_tokens"))
        self._decode_fn = jax.jit(decode, donate_argnums=(1,))

    def _place(self, state: nnx.State) -> nnx.State:
        """``state`` in ``param_dtype`` and over the mesh, as the jitted steps take it."""
        if self.param_dtype is not None:
            state = cast_floats(state, self.param_dtype)
        if self._shardings is not None:
            state = jax.device_put(state, self._shardings)
        return state

    @property
    def takes_prefill_inputs(self) -> bool:
        """Whether `generate` accepts `prefill_inputs` (the model has a vision tower): the
        agent loop then hands it every prompt's images and videos."""
        return self._takes_prefill_inputs

    def set_weights(self, model_or_state: nnx.Module | nnx.State) -> None:
        """Swaps in new weights of the same architecture (no recompilation)."""
        if isinstance(model_or_state, nnx.Module):
            graphdef, state = nnx.split(model_or_state)
            if graphdef != self._graphdef:
                raise ValueError("set_weights got a model of a different structure.")
        else:
            state = model_or_state
        if jax.tree.structure(state) != jax.tree.structure(self._state):
            raise ValueError("set_weights got a state of a different structure.")
        self._state = self._place(state)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        max_new_tokens: int | None = None,
        stop_token_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        decode_fn: Callable[[list[int]], str] | None = None,
        seed: int = 0,
        prefill_inputs: Sequence[Mapping[str, np.ndarray] | None] | None = None,
    ) -> list[Completion]:
        """Completes each prompt (a list of token ids); returns one `Completion` per prompt.

        `prefill_inputs` gives each prompt's visual inputs (None or an empty mapping for a
        text-only one), for a model with `prepare_prefill` (Qwen3-VL): the processor's arrays
        for that prompt alone, e.g. `pixel_values[n, patch_dim]` and `image_grid_thw[k, 3]`,
        `pixel_values_videos` and `video_grid_thw`, optionally `mm_token_type_ids`. The
        prompt's token ids must hold the matching placeholder tokens. Per batch group the
        prompts are left-padded as usual, then `model.prepare_prefill` builds the group's
        MRoPE positions and the patch rows padded to a bucket (one compilation per bucket).

        Sampling: greedy (argmax) when `greedy`, else softmax(logits / temperature) restricted
        to the top-p nucleus. A row ends at the first sampled token in `eos_token_ids` or
        `stop_token_ids` (that token is kept), or after `max_new_tokens` (default: the
        constructor's) with finish_reason "length".

        Stop strings need `decode_fn(tokens) -> str`. The host checks each unfinished row's
        decoded completion every `chunk_size` steps; a row whose text contains a stop string
        is cut to the shortest token prefix whose decoded text contains one (the tokens that
        complete it are kept, later ones dropped), finish_reason "stop", `stop_text` = the stop
        string found earliest in that prefix's text. Stop strings are searched in the
        completion only, not the prompt.

        Results depend on `seed` (and on the batch bucket a prompt lands in), not on timing.
        """
        max_new = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= max_new <= self.max_new_tokens:
            raise ValueError(
                f"max_new_tokens must be in [1, {self.max_new_tokens}], got {max_new_tokens}."
            )
        if stop_strings and decode_fn is None:
            raise ValueError("stop_strings need decode_fn (token ids -> text).")
        if not temperature > 0 and not greedy:
            raise ValueError(f"temperature must be > 0 (or greedy=True), got {temperature}.")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
        prompts = [list(map(int, p)) for p in prompts]
        if prefill_inputs is not None:
            if len(prefill_inputs) != len(prompts):
                raise ValueError(
                    f"prefill_inputs has {len(prefill_inputs)} entries for {len(prompts)} prompts."
                )
            if not self._takes_prefill_inputs:
                raise ValueError(
                    "prefill_inputs need a model with `prepare_prefill` (e.g. Qwen3-VL); this "
                    "model takes token prompts only."
                )
        for i, prompt in enumerate(prompts):
            if not 1 <= len(prompt) <= self.max_prompt_len:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens; allowed 1..{self.max_prompt_len}."
                )
        stop_ids = sorted(set(self.eos_token_ids) | {int(t) for t in stop_token_ids})
        stop_size = max(8, 1 << (len(stop_ids) - 1).bit_length()) if stop_ids else 8
        stop_ids_arr = np.full((stop_size,), -1, np.int32)
        stop_ids_arr[: len(stop_ids)] = stop_ids
        group = self.batch_buckets[-1]
        results: list[Completion] = []
        for start in range(0, len(prompts), group):
            settings = _Settings(
                temperature=jnp.asarray(temperature, jnp.float32),
                top_p=jnp.asarray(top_p, jnp.float32),
                greedy=jnp.asarray(greedy),
                stop_ids=jnp.asarray(stop_ids_arr),
                max_new=jnp.asarray(max_new, jnp.int32),
                key=jax.random.fold_in(jax.random.key(seed), start // group),
            )
            results += self._generate_group(
                prompts[start : start + group],
                None if prefill_inputs is None else list(prefill_inputs[start : start + group]),
                settings,
                max_new,
                set(stop_ids),
                tuple(stop_strings),
                decode_fn,
            )
        return results

    def _generate_group(
        self,
        prompts: list[list[int]],
        row_inputs: list[Mapping[str, np.ndarray] | None] | None,
        settings: _Settings,
        max_new: int,
        stop_ids: set[int],
        stop_strings: tuple[str, ...],
        decode_fn: Callable[[list[int]], str] | None,
    ) -> list[Completion]:
        rows = len(prompts)
        batch = next(b for b in self.batch_buckets if b >= rows)
        longest = max(len(p) for p in prompts)
        length = next(n for n in self.length_buckets if n >= longest)
        ids = np.full((batch, length), self.pad_token_id, np.int32)
        mask = np.zeros((batch, length), np.int32)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt) :] = prompt
            mask[row, length - len(prompt) :] = 1
        # Padding rows of the batch bucket get one real token so their positions are sane.
        mask[rows:, -1] = 1
        extra = {}
        if row_inputs is not None:
            # Host-side work (grids -> tables, MRoPE positions); merging holds no copy of the
            # weights, and keeps no reference to an old policy's arrays after `set_weights`.
            model = nnx.merge(self._graphdef, self._state)
            extra = model.prepare_prefill(ids, mask, row_inputs, patch_bucket=self.patch_bucket)
        loop = self._prefill_fn(
            self._state,
            ids,
            mask,
            extra,
            cache_size=length + self.max_new_tokens,
            max_new_tokens=self.max_new_tokens,
        )
        done = np.zeros((batch,), bool)
        done[rows:] = True
        loop = loop.replace(done_b=jnp.asarray(done))
        stop_text: list[str | None] = [None] * rows
        cut: list[int | None] = [None] * rows
        step = 0
        while True:
            until = step + self.chunk_size if stop_strings else max_new
            loop = self._decode_fn(self._state, loop, settings, jnp.asarray(until, jnp.int32))
            step = int(loop.step)
            finished = done  # rows already done before this chunk need no new check
            done = np.array(loop.done_b)
            if stop_strings:
                tokens, counts = np.asarray(loop.tokens_bn), np.asarray(loop.count_b)
                for row in range(rows):
                    if cut[row] is None and not finished[row]:
                        found = _find_stop(
                            tokens[row, : counts[row]].tolist(), stop_strings, decode_fn
                        )
                        if found is not None:
                            cut[row], stop_text[row] = found
                            done[row] = True
                loop = loop.replace(done_b=jnp.asarray(done))
            if done.all() or step >= max_new:
                break
        tokens, logprobs = np.asarray(loop.tokens_bn), np.asarray(loop.logprobs_bn)
        counts = np.asarray(loop.count_b)
        out = []
        for row in range(rows):
            n = int(counts[row]) if cut[row] is None else cut[row]
            row_tokens = tokens[row, :n].tolist()
            if stop_text[row] is not None or (row_tokens and row_tokens[-1] in stop_ids):
                reason: FinishReason = "stop"
            else:
                reason = "length"
            out.append(Completion(row_tokens, logprobs[row, :n].tolist(), reason, stop_text[row]))
        return out


def _find_stop(
    tokens: list[int], stop_strings: tuple[str, ...], decode_fn: Callable[[list[int]], str]
) -> tuple[int, str] | None:
    """(shortest prefix length whose text holds a stop string, that string) or None."""

    def first_stop(n: int) -> str | None:
        text = decode_fn(tokens[:n])
        hits = [(text.find(s), s) for s in stop_strings if s in text]
        return min(hits)[1] if hits else None

    if not tokens or first_stop(len(tokens)) is None:
        return None
    low, high = 1, len(tokens)  # the text of tokens[:high] holds a stop string
    while low < high:
        mid = (low + high) // 2
        if first_stop(mid) is None:
            low = mid + 1
        else:
            high = mid
    return high, first_stop(high)
