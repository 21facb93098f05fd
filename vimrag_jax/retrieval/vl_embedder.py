"""Qwen3-VL-Embedding-style retrieval: text, images and videos embedded by our JAX Qwen3-VL.

``Qwen3VLEmbedder`` loads a local Hugging Face Qwen3-VL checkpoint (``models.from_pretrained``;
a Qwen3-VL-Embedding checkpoint has the Qwen3-VL layout) and its tokenizer, and turns queries and
corpus items (text passages, images, videos) into L2-normalised float32 vectors of one space. It
offers the ``retrieval.embedders.Embedder`` interface (``dim``, ``spec``, ``embed_texts`` for
queries, ``embed_items`` for corpus items), so ``CorpusStore`` / ``StoreBuilder`` /
``import_corpus`` take it where they take the text embedders, and the exact inner-product index
(``retrieval.index``) searches its vectors unchanged.

**Input format and pooling** (what the sources below say):

- every input is one chat: a system turn holding an instruction, a user turn holding the content,
  then the generation prompt: ``<|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n
  {content}<|im_end|>\\n<|im_start|>assistant\\n`` (the prompt strings of vLLM's Qwen3-VL-Embedding
  example; the embedder script applies the chat template with ``add_generation_prompt=True``);
- the instruction defaults to ``"Represent the user's input."``; the README's example gives the
  query a task instruction (``"Retrieve images or text relevant to the user's query."``) and the
  documents none, i.e. the default. An instruction not ending in punctuation gets a ``.``;
- the user content lists videos, then images, then text; an input with none of them is the
  text ``NULL``. Images and videos are written as Qwen3-VL's processor expands them
  (``<|vision_start|>`` + one ``<|image_pad|>`` per merged token + ``<|vision_end|>``; a video as
  one ``<t seconds>`` block per temporal pair of frames, ``agent.prompts.video_placeholder``);
- the vector is the last layer's hidden state (after the final norm) at the last real token of
  the right-padded sequence (here the ``\\n`` that ends the generation prompt), L2-normalised.

Sources: the QwenLM/Qwen3-VL-Embedding README (github.com/QwenLM/Qwen3-VL-Embedding, commit
7f13038: "extracts the hidden state vector corresponding to the [EOS] token from the base model's
last layer", the default instruction, the input keys, the query/document example); vLLM's offline
multimodal-embedding example for ``Qwen/Qwen3-VL-Embedding-2B`` (vllm-project/vllm, its
``run_qwen3_vl``: the exact prompt strings, pooling runner); adaptations of the repository's
``src/models/qwen3_vl_embedding.py`` in other public repositories (system-turn instruction,
punctuation rule, video/image/text order, ``NULL``, right padding, pooling at the last position
of the attention mask, ``F.normalize``). Not confirmed: the upstream script itself (only
adaptations of it could be read); the README says "[EOS] token" while the script pools the last
token of the generation prompt, which is what is done here; the timestamps the official
processor writes for a video given as a frame list (here: seconds from the item's first frame);
the official pixel budgets for a corpus (the script's defaults are larger than ours, see
``Qwen3VLEmbedder``); whether the 8B checkpoint stores ``lm_head.weight`` (our loader needs it
for an untied model); Matryoshka truncation is not offered (the dimension is the hidden size).

**Computation.** Host side, each input becomes token ids plus its images' / videos' patches
(``data.vision.image_patches`` / ``video_patches`` at a ``memory.energy.smart_resize`` size).
Inputs are sorted by size and cut into batches of ``batch_size`` rows, right-padded to a length
bucket (``length_buckets``: powers of two and their halfway points up to ``max_length``) and a
patch bucket (``models.qwen3_vl.default_patch_bucket``), so each (length, patches) bucket
compiles once. A text-only batch runs
the decoder alone; a batch with visuals builds each row's MRoPE positions and vision tables
(``data.vision.segment_model_inputs``) and runs ``sampling.logprobs.visual_hidden_states`` (the
tower per row, features and DeepStack at the placeholders). Right padding and a causal mask keep
a row's vector independent of its batch. With a ``mesh``, parameters are sharded by the default
rules and the batch axis is split over the mesh's batch axes (``parallel.sharding``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimrag_jax.agent import prompts
from vimrag_jax.data.vision import (
    PATCH_DIM,
    VisualItem,
    image_patches,
    segment_model_inputs,
    video_patches,
)
from vimrag_jax.memory.energy import smart_resize
from vimrag_jax.models.qwen3_vl import default_patch_bucket
from vimrag_jax.sampling.logprobs import visual_hidden_states

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from vimrag_jax.retrieval.store_format import CorpusItem

log = logging.getLogger(__name__)

#: The default instruction of the model card: documents are embedded with it.
DOCUMENT_INSTRUCTION = "Represent the user's input."
#: The model card's example instruction for a query in image/text retrieval.
QUERY_INSTRUCTION = "Retrieve images or text relevant to the user's query."
#: Content of an input with no text, image or video.
EMPTY_CONTENT = "NULL"
MIN_PIXELS = 4 * 32 * 32  # the script's smallest image: 4 merged tokens
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def format_instruction(instruction: str | None, default: str = DOCUMENT_INSTRUCTION) -> str:
    """The instruction as the model card writes it: stripped, ``default`` when empty, and a
    ``.`` appended unless it already ends in punctuation (Unicode category P*)."""
    text = (instruction or "").strip()
    if not text:
        return default
    return text if unicodedata.category(text[-1]).startswith("P") else text + "."


def _prompt_head(instruction: str) -> str:
    return f"{prompts.IM_START}system\n{instruction}{prompts.IM_END}\n{prompts.IM_START}user\n"


#: What follows the user content: the end of the user turn and the generation prompt.
PROMPT_TAIL = f"{prompts.IM_END}\n{prompts.IM_START}assistant\n"


def embedding_prompt(instruction: str, content: str) -> str:
    """The chat an input is embedded as: system turn = instruction, user turn = content (the
    model card's ``NULL`` when empty), then the assistant generation prompt, whose final
    ``\\n`` is the pooled token."""
    return _prompt_head(instruction) + (content or EMPTY_CONTENT) + PROMPT_TAIL


@dataclasses.dataclass(frozen=True)
class EmbeddingInput:
    """One input, ready for the model: ``ids int32[n]`` (the whole chat, placeholders expanded)
    and its images / videos in placeholder order (``VisualItem``: patches and grid)."""

    ids: np.ndarray
    visuals: tuple[VisualItem, ...] = ()

    @property
    def num_patches(self) -> int:
        return sum(len(v.patches) for v in self.visuals)


def length_buckets(max_length: int, smallest: int = 32) -> tuple[int, ...]:
    """Sequence lengths batches are padded to: powers of two and their halfway points (32, 48,
    64, 96, ...) up to ``max_length`` (always the last), so padding wastes at most a third of a
    row while few lengths compile."""
    sizes = {max_length}
    size = smallest
    while size < max_length:
        sizes.update({size, min(size * 3 // 2, max_length)})
        size *= 2
    return tuple(sorted(sizes))


def _pool(hidden_bld: jax.Array, last_b: jax.Array) -> jax.Array:
    """L2-normalised float32 hidden state of each row at column ``last_b``."""
    pooled_bd = jnp.take_along_axis(hidden_bld, last_b[:, None, None], axis=1)[:, 0]
    pooled_bd = pooled_bd.astype(jnp.float32)
    return pooled_bd / jnp.maximum(jnp.linalg.norm(pooled_bd, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnums=0)
def _text_vectors(graphdef: Any, state: Any, ids_bl: jax.Array, last_b: jax.Array) -> jax.Array:
    """Vectors of right-padded text-only rows: the decoder on token embeddings, text positions
    (equal on the three MRoPE sections), causal mask; pooled at ``last_b``."""
    model = nnx.merge(graphdef, state)
    b, length = ids_bl.shape
    positions_3bl = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (3, b, length))
    allowed_bqm = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (b, length, length))
    hidden_bld = model.decode_hidden(model.embed(ids_bl), positions_3bl, allowed_bqm)
    return _pool(hidden_bld, last_b)


@functools.partial(jax.jit, static_argnums=0)
def _visual_vectors(
    graphdef: Any, state: Any, ids_bl: jax.Array, last_b: jax.Array, visual: dict[str, jax.Array]
) -> jax.Array:
    """Vectors of right-padded rows with images / videos (``visual_hidden_states`` inputs)."""
    model = nnx.merge(graphdef, state)
    return _pool(visual_hidden_states(model, ids_bl, visual), last_b)


def batch_shards(mesh: Mesh) -> int:
    """How many ways the default sharding rules split a batch over ``mesh``."""
    from vimrag_jax.parallel.sharding import logical_to_mesh_spec

    (axes,) = logical_to_mesh_spec(("batch",), mesh=mesh)
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[axis] for axis in axes)


def _file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


class Qwen3VLEmbedder:
    """Qwen3-VL-Embedding-style embedder over a local Qwen3-VL checkpoint, run in JAX.

    ``path`` is the checkpoint directory (config.json, safetensors, tokenizer files).
    ``query_instruction`` goes with ``embed_texts`` (queries), ``document_instruction`` with
    ``embed_items`` (corpus items). Images are resized to at most ``image_max_pixels`` (at least
    ``min_pixels``), each video frame to at most ``video_max_pixels``; a video shows at most
    ``max_frames`` of its frames (evenly spread, first and last kept; at most
    ``prompts.MAX_VIDEO_FRAMES``). The official script's defaults are larger (images up to
    1843200 px, 8192 tokens); ours keep a corpus of ~200k items affordable, and keep an image
    at the budget (480 tokens + the chat) under the 512 length bucket and a 32-frame video
    (16 pairs x 112 tokens + timestamps) under 2048. ``with_caption`` also writes an image's /
    video's caption after its pixels (a mixed input); by default a visual item is embedded from
    its pixels alone. Inputs longer than ``max_length`` tokens lose the end of their text; an
    input whose visuals alone exceed it is refused.

    ``batch_size`` rows run at a time (a multiple of the mesh's batch shards when ``mesh`` is
    given); ``dtype`` is the compute dtype (vectors are float32 either way). Progress is logged
    at INFO every ``log_every_s`` seconds during ``embed_items``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        query_instruction: str = QUERY_INSTRUCTION,
        document_instruction: str = DOCUMENT_INSTRUCTION,
        max_length: int = 4096,
        batch_size: int = 8,
        image_max_pixels: int = 480 * 32 * 32,
        video_max_pixels: int = 112 * 32 * 32,
        min_pixels: int = MIN_PIXELS,
        max_frames: int = prompts.MAX_VIDEO_FRAMES,
        with_caption: bool = False,
        dtype: str = "float32",
        mesh: Mesh | None = None,
        log_every_s: float = 30.0,
    ):
        if max_length < 32:
            raise ValueError(f"Qwen3VLEmbedder: max_length must be >= 32, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"Qwen3VLEmbedder: batch_size must be >= 1, got {batch_size}")
        if not 1 <= max_frames <= prompts.MAX_VIDEO_FRAMES:
            raise ValueError(
                f"Qwen3VLEmbedder: max_frames must be in [1, {prompts.MAX_VIDEO_FRAMES}], "
                f"got {max_frames}"
            )
        if not 0 < min_pixels <= min(image_max_pixels, video_max_pixels):
            raise ValueError(
                "Qwen3VLEmbedder: need 0 < min_pixels <= image_max_pixels, video_max_pixels; got "
                f"{min_pixels}, {image_max_pixels}, {video_max_pixels}"
            )
        self.path = Path(path).resolve()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"Qwen3VLEmbedder: no config.json in {str(self.path)!r}")
        from transformers import AutoTokenizer

        from vimrag_jax.models import from_pretrained

        self.query_instruction = format_instruction(query_instruction)
        self.document_instruction = format_instruction(document_instruction)
        self.max_length, self.batch_size = int(max_length), int(batch_size)
        self.image_max_pixels, self.video_max_pixels = int(image_max_pixels), int(video_max_pixels)
        self.min_pixels, self.max_frames = int(min_pixels), int(max_frames)
        self.with_caption, self.dtype, self.mesh = bool(with_caption), dtype, mesh
        self.log_every_s = float(log_every_s)
        if mesh is not None:
            shards = batch_shards(mesh)
            if batch_size % shards:
                raise ValueError(
                    f"Qwen3VLEmbedder: batch_size={batch_size} must be a multiple of the "
                    f"{shards} batch shards of the mesh {dict(mesh.shape)}"
                )
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        model = from_pretrained(self.path, dtype=dtype, mesh=mesh)
        if not hasattr(model, "visual"):
            raise ValueError(f"Qwen3VLEmbedder: {str(self.path)!r} is not a Qwen3-VL checkpoint")
        self.config = model.config
        if self.config.vision.patch_dim != PATCH_DIM:
            raise ValueError(
                f"Qwen3VLEmbedder: the vision tower takes {self.config.vision.patch_dim}-wide "
                f"patches, the pixel pipeline makes {PATCH_DIM} (16 px, temporal 2)"
            )
        self._check_tokens()
        # Padding is never attended to (right padding, causal mask); any id off the placeholders.
        pad = next(
            (
                i
                for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
                if i is not None
            ),
            0,
        )
        if pad in (self.config.image_token_id, self.config.video_token_id):
            raise ValueError(f"Qwen3VLEmbedder: the padding id {pad} is an image/video placeholder")
        self.pad_id = int(pad)
        self.dim = int(self.config.text.hidden_size)
        self._graphdef, self._state = nnx.split(model)
        self.length_buckets = length_buckets(self.max_length)
        #: (length, patch rows) shapes run so far (0 patch rows: the text-only function).
        self.shapes: set[tuple[int, int]] = set()
        self.items_embedded = 0  # corpus items over the embedder's life, for the progress log

    def _check_tokens(self) -> None:
        c = self.config
        expected = {
            prompts.IMAGE_PAD: c.image_token_id,
            prompts.VIDEO_PAD: c.video_token_id,
            prompts.VISION_START: c.vision_start_token_id,
            prompts.VISION_END: c.vision_end_token_id,
        }
        for token, model_id in expected.items():
            ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
            if ids != [model_id]:
                raise ValueError(
                    f"Qwen3VLEmbedder: the tokenizer encodes {token} as {ids}, the model's "
                    f"config expects [{model_id}]"
                )

    # -- identity ---------------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        """Checkpoint identity (config and tokenizer file hashes; weights are not hashed) and
        every setting that changes the vectors (not ``batch_size`` or the mesh)."""
        return {
            "kind": "qwen3_vl",
            "path": str(self.path),
            "config_sha256": _file_sha256(self.path / "config.json"),
            "tokenizer_sha256": {
                name: digest
                for name in _TOKENIZER_FILES
                if (digest := _file_sha256(self.path / name)) is not None
            },
            "query_instruction": self.query_instruction,
            "document_instruction": self.document_instruction,
            "max_length": self.max_length,
            "image_max_pixels": self.image_max_pixels,
            "video_max_pixels": self.video_max_pixels,
            "min_pixels": self.min_pixels,
            "max_frames": self.max_frames,
            "with_caption": self.with_caption,
            "dtype": self.dtype,
            "dim": self.dim,
        }

    _SPEC_ARGS = (
        "query_instruction",
        "document_instruction",
        "max_length",
        "image_max_pixels",
        "video_max_pixels",
        "min_pixels",
        "max_frames",
        "with_caption",
        "dtype",
    )

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **runtime: Any) -> Qwen3VLEmbedder:
        """The embedder a ``spec()`` describes (``runtime``: ``batch_size``, ``mesh``,
        ``log_every_s``); ValueError when the checkpoint's config or tokenizer changed."""
        embedder = cls(spec["path"], **{k: spec[k] for k in cls._SPEC_ARGS}, **runtime)
        if embedder.spec() != spec:
            raise ValueError(
                f"the checkpoint at {spec['path']!r} changed since the spec was recorded: "
                f"{embedder.spec()} != {spec}"
            )
        return embedder

    # -- host side: inputs ----------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(
        self,
        text: str | None = None,
        *,
        instruction: str | None = None,
        image: np.ndarray | None = None,
        video: np.ndarray | None = None,
        timestamps: Sequence[float] | None = None,
    ) -> EmbeddingInput:
        """One input: optional ``text``, ``image`` (uint8[H, W, 3]) and ``video``
        (uint8[F, H, W, 3] with ``timestamps`` in seconds; default 1 fps) under ``instruction``
        (default: the document instruction), as ids and patches (see the module docstring)."""
        instruction = format_instruction(instruction, self.document_instruction)
        visual_text, visuals = "", []
        if video is not None:
            frames = np.asarray(video)
            times = np.arange(len(frames), dtype=np.float64) if timestamps is None else timestamps
            times = np.asarray(times, np.float64)
            if frames.ndim != 4 or len(frames) == 0 or times.shape != (len(frames),):
                raise ValueError(
                    f"a video must be uint8[F, H, W, 3] with F timestamps, got {frames.shape} "
                    f"and {times.shape[0] if times.ndim else 0} timestamps"
                )
            order = np.argsort(times, kind="stable")
            if len(order) > self.max_frames:  # evenly spread, first and last kept
                last, n = len(order) - 1, self.max_frames
                order = order[[i * last // max(n - 1, 1) for i in range(n)]]
            frames, times = frames[order], times[order] - times[order[0]]
            h, w = smart_resize(
                *frames.shape[1:3], self.video_max_pixels, min_pixels=self.min_pixels
            )
            patches, grid = video_patches(frames, int(h), int(w))
            visual_text += prompts.video_placeholder(0, times.tolist(), int(h), int(w)).text
            visuals.append(VisualItem("video", (), patches, tuple(int(g) for g in grid)))
        if image is not None:
            image = np.asarray(image)
            if image.ndim != 3:
                raise ValueError(f"an image must be uint8[H, W, 3], got {image.shape}")
            h, w = smart_resize(*image.shape[:2], self.image_max_pixels, min_pixels=self.min_pixels)
            patches, grid = image_patches(image, int(h), int(w))
            visual_text += prompts.image_placeholder(0, int(h), int(w)).text
            visuals.append(VisualItem("image", (), patches, tuple(int(g) for g in grid)))
        text = text or ""
        ids = self._ids(embedding_prompt(instruction, visual_text + text))
        if len(ids) > self.max_length:
            head = self._ids(_prompt_head(instruction) + visual_text)
            tail = self._ids(PROMPT_TAIL)
            keep = self.max_length - len(head) - len(tail)
            if keep < 0 or (keep == 0 and not visual_text):
                raise ValueError(
                    f"an input's instruction and images/videos take {len(head) + len(tail)} "
                    f"tokens, more than max_length = {self.max_length}; lower the pixel budgets "
                    "or raise max_length"
                )
            ids = head + self._ids(text)[:keep] + tail
        return EmbeddingInput(np.asarray(ids, np.int32), tuple(visuals))

    def encode_item(self, item: CorpusItem) -> EmbeddingInput:
        """A corpus item as a document: a passage by its text, an image or video by its pixels
        (and caption with ``with_caption``), under the document instruction."""
        if item.modality == "text":
            return self.encode(item.text)
        caption = item.text if self.with_caption else None
        if item.modality == "image":
            return self.encode(caption, image=item.pixels)
        return self.encode(caption, video=item.pixels, timestamps=item.timestamps)

    # -- device side ----------------------------------------------------------------------------

    def place(self, tree: Any) -> Any:
        """Host arrays as the jitted functions take them: with a mesh, each leaf's leading
        (batch) axis split over the mesh's batch axes; without one, unchanged."""
        if self.mesh is None:
            return tree
        from vimrag_jax.parallel.sharding import batch_shardings

        return jax.device_put(tree, batch_shardings(tree, self.mesh))

    def _dispatch(self, rows: Sequence[EmbeddingInput]) -> jax.Array:
        """Starts the device computation of at most ``batch_size`` inputs padded to the buckets;
        returns float32[batch_size, dim] (rows past ``len(rows)`` are padding) without waiting."""
        longest = max(len(r.ids) for r in rows)
        length = next(b for b in self.length_buckets if b >= longest)
        ids = np.full((self.batch_size, length), self.pad_id, np.int32)
        last = np.zeros((self.batch_size,), np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row.ids)] = row.ids
            last[i] = len(row.ids) - 1
        patches = max(r.num_patches for r in rows)
        if patches == 0:
            self.shapes.add((length, 0))
            return _text_vectors(self._graphdef, self._state, *self.place((ids, last)))
        size = default_patch_bucket(patches)
        self.shapes.add((length, size))
        visual = {
            "pixel_values": np.zeros((self.batch_size, size, PATCH_DIM), np.float32),
            "vision_interp_index": np.zeros((self.batch_size, size, 4), np.int32),
            "vision_interp_weight": np.zeros((self.batch_size, size, 4), np.float32),
            "vision_rotary_hw": np.zeros((self.batch_size, size, 2), np.int32),
            "vision_segment": np.full((self.batch_size, size), -1, np.int32),
            "position_ids": np.broadcast_to(
                np.arange(length, dtype=np.int32), (self.batch_size, 3, length)
            ).copy(),
            "visual_token_index": np.full((self.batch_size, length), -1, np.int32),
        }
        for i, row in enumerate(rows):
            positions, index, tables = segment_model_inputs(
                self.config, ids[i], length, list(row.visuals), size
            )
            visual["position_ids"][i], visual["visual_token_index"][i] = positions, index
            if tables is not None:
                visual["pixel_values"][i, : row.num_patches] = np.concatenate(
                    [v.patches for v in row.visuals]
                )
                visual["vision_interp_index"][i] = tables.interp_index
                visual["vision_interp_weight"][i] = tables.interp_weight
                visual["vision_rotary_hw"][i] = tables.rotary_hw
                visual["vision_segment"][i] = tables.segment
        return _visual_vectors(self._graphdef, self._state, *self.place((ids, last, visual)))

    def embed_inputs(self, inputs: Sequence[EmbeddingInput], *, what: str = "") -> np.ndarray:
        """float32[n, dim]: one L2-normalised row per prepared input, in input order.

        Inputs are sorted by (patches, length) so a batch holds similar sizes; ``what`` names
        them in the progress log (none when empty)."""
        out = np.zeros((len(inputs), self.dim), np.float32)
        order = sorted(
            range(len(inputs)), key=lambda i: (inputs[i].num_patches, len(inputs[i].ids))
        )
        start_time = last_log = time.monotonic()
        pending: tuple[list[int], jax.Array] | None = None
        # One batch in flight: the host builds batch k + 1 while the device computes batch k.
        for start in range(0, len(order) + self.batch_size, self.batch_size):
            chosen = order[start : start + self.batch_size]
            running = (chosen, self._dispatch([inputs[i] for i in chosen])) if chosen else None
            if pending is not None:
                rows, vectors = pending
                out[rows] = np.asarray(vectors)[: len(rows)]
                done = min(start, len(order))
                now = time.monotonic()
                if what and (now - last_log >= self.log_every_s or done == len(order)):
                    last_log = now
                    log.info(
                        "embedded %d/%d %s (%.1f/s; %d shapes run)",
                        done,
                        len(order),
                        what,
                        done / max(now - start_time, 1e-9),
                        len(self.shapes),
                    )
            pending = running
        return out

    # -- the Embedder interface -----------------------------------------------------------------

    def embed_texts(self, texts: Sequence[str], *, instruction: str | None = None) -> np.ndarray:
        """float32[n, dim]: queries, each under ``instruction`` (default: the query
        instruction); an empty query is the model card's ``NULL`` input."""
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of strings, got a single string")
        instruction = format_instruction(instruction, self.query_instruction)
        return self.embed_inputs([self.encode(t, instruction=instruction) for t in texts])

    def embed_items(self, items: Sequence[CorpusItem]) -> np.ndarray:
        """float32[n, dim]: corpus items as documents (``encode_item``), progress logged."""
        vectors = self.embed_inputs([self.encode_item(item) for item in items], what="items")
        self.items_embedded += len(items)
        if items:
            log.info("%d corpus items embedded so far", self.items_embedded)
        return vectors


__all__ = [
    "DOCUMENT_INSTRUCTION",
    "EMPTY_CONTENT",
    "QUERY_INSTRUCTION",
    "PROMPT_TAIL",
    "EmbeddingInput",
    "Qwen3VLEmbedder",
    "batch_shards",
    "embedding_prompt",
    "format_instruction",
    "length_buckets",
]
