"""Experiment bootstrap shared by the rollout worker and the learner: world, tokenizer, policy.

``Experiment.from_config(cfg, workdir)`` gives every process of a run the same:

- **corpus and questions**: with ``data.corpus == ""`` the synthetic world
  (``envs.synthetic.build``, deterministic in ``env.*`` and ``seed``) and its ``CorpusStore``
  under ``WORKDIR/corpus/``; the last ``env.eval_questions`` questions are the eval split,
  the first ``env.sft_questions`` the warm start's (scripted-expert) split, the rest the RL split
  (with ``env.sft_questions == 0`` the warm start draws from the RL split); with ``data.corpus``
  set, a real corpus: the store in that directory (``python -m
  vimrag_jax.retrieval.import_corpus`` writes it; opened, never copied or rebuilt) and the
  questions of ``data.questions`` (``envs.dataset``), split the same way (``env_name`` is
  ``"dataset"``, no entity kinds; the warm start's trajectories then come from ``sft.data``);
- **tokenizer**: for the tiny model a byte-level BPE trained on the world's texts plus the
  agent's prompt templates (so the system prompt costs ~1k tokens, not ~3k), saved under
  ``WORKDIR/tokenizer/``; for ``model.name == "hf"`` the tokenizer of ``model.path``;
- **initial policy**: a seeded random preset model (vocab sized to the tokenizer) or the
  Hugging Face checkpoint, and the newest published weights on top (``publish``).

Building happens once per workdir under a lock file (``WORKDIR/.experiment.lock``), so two
processes starting together do not race; later starts reuse what is on disk (the store checks its
fingerprint, the tokenizer directory is published by an atomic rename).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from vimrag_jax.agent import prompts
from vimrag_jax.agent.config import RolloutConfig
from vimrag_jax.envs import synthetic
from vimrag_jax.retrieval.corpus import CorpusStore

CORPUS_DIR = "corpus"
TOKENIZER_DIR = "tokenizer"
LOCK_FILE = ".experiment.lock"
#: ``rollout.backend`` values whose rollouts a server generates (the worker builds no model).
SERVER_BACKENDS = ("sglang", "vllm")
#: A Qwen3-VL config's special-token fields and the prompt tokens they name.
VISION_TOKEN_KEYS = {
    "image_token_id": prompts.IMAGE_PAD,
    "video_token_id": prompts.VIDEO_PAD,
    "vision_start_token_id": prompts.VISION_START,
    "vision_end_token_id": prompts.VISION_END,
}


def synthetic_config(cfg: Any) -> synthetic.SyntheticConfig:
    """``SyntheticConfig`` from the ``env`` block, which holds every field but the seed (the
    config's ``seed``); a missing field is a KeyError naming it."""
    names = [f.name for f in dataclasses.fields(synthetic.SyntheticConfig) if f.name != "seed"]
    missing = [name for name in names if name not in cfg.env]
    if missing:
        raise KeyError(f"config.env lacks {missing} (see configs/ggpo.py)")
    fields = {name: cfg.env[name] for name in names}
    if "answer_modalities" in fields:
        fields["answer_modalities"] = tuple(fields["answer_modalities"])
    return synthetic.SyntheticConfig(**fields, seed=int(cfg.seed))


# Prompt templates are repeated so BPE learns their words (it merges only pairs seen twice).
TEMPLATE_REPEATS = 4


def template_texts() -> list[str]:
    """The prompt templates the tiny tokenizer learns: the system prompt with the tool schemas
    and the observation cues."""
    return [
        prompts.system_prompt(),
        prompts.error_observation("the tool call is not valid JSON"),
        prompts.retrieval_observation([]).text,
        prompts.graph_prompt("", []).text,
    ]


def tokenizer_texts(items, questions) -> list[str]:
    """What the tiny tokenizer is trained on: the world's texts and the prompt templates."""
    return synthetic.corpus_texts(items, questions) + template_texts() * TEMPLATE_REPEATS


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``flock`` on ``WORKDIR/.experiment.lock`` (released on exit or death)."""
    path = Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


#: Written beside the cached tiny tokenizer: what it was built from (``_tokenizer_source``).
TOKENIZER_SOURCE = "vimrag_tokenizer_source.json"
_LOG = logging.getLogger(__name__)


def _tokenizer_source(texts: Sequence[str], vocab_size: int) -> dict[str, Any]:
    """What a tiny tokenizer is built from: the vocab size and a sha256 of the training texts.

    The texts are hashed in order, each length-prefixed (so ``["ab", "c"]`` and ``["a", "bc"]``
    differ), because BPE training depends on both the texts and their order.
    """
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return {
        "vocab_size": int(vocab_size),
        "num_texts": len(texts),
        "texts_sha256": digest.hexdigest(),
    }


def _check_tokenizer_source(directory: Path, source: dict[str, Any]) -> None:
    """Refuses a cached tokenizer built from other texts or another vocab size (ValueError).

    It is never rebuilt in place: the checkpoints and published policies of the workdir hold
    embeddings indexed by its token ids. A cache written before sources were recorded (no
    ``TOKENIZER_SOURCE`` file) cannot be checked and is used as is, with a warning.
    """
    path = directory / TOKENIZER_SOURCE
    if not path.is_file():
        _LOG.warning(
            "the tokenizer cached in %s records no source (%s; written by an older version): "
            "using it as is, unchecked against this run's corpus and vocab size",
            directory,
            TOKENIZER_SOURCE,
        )
        return
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        differs = [key for key in source if cached[key] != source[key]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read the tokenizer source record {path}: {error}") from None
    if not differs:
        return
    what = []
    if "vocab_size" in differs:
        what.append(f"vocab size {cached['vocab_size']} then, {source['vocab_size']} now")
    if "texts_sha256" in differs or "num_texts" in differs:
        what.append(
            f"other training texts: {cached['num_texts']} then, {source['num_texts']} now, "
            "with another sha256 (the corpus or the questions changed)"
        )
    raise ValueError(
        f"workdir {directory.parent}: the cached tokenizer in {directory} was built from a "
        f"different corpus/vocab ({'; '.join(what)}). The checkpoints in this workdir use its "
        "token ids, so it is not rebuilt: start this run in a new --workdir (or run with the "
        "corpus and env.tokenizer_vocab_size the workdir was made with)"
    )


def _load_or_build_tokenizer(
    directory: Path, texts_fn: Callable[[], Sequence[str]], vocab_size: int
):
    """The tiny BPE cached in ``directory``: built from the world's texts ``texts_fn()`` and the
    prompt templates on first start (published by an atomic rename, with its
    ``TOKENIZER_SOURCE`` record), else loaded after checking that it was built from the same
    world texts and vocab size (``_check_tokenizer_source``). The templates are left out of the
    record: a change of prompt wording in the code must not lock a run out of its workdir (the
    cached tokenizer still encodes any text)."""
    from transformers import PreTrainedTokenizerFast

    from vimrag_jax.agent.tokenizer import build_tokenizer

    texts = list(texts_fn())
    source = _tokenizer_source(texts, vocab_size)
    if not directory.is_dir():
        tokenizer = build_tokenizer(
            texts + template_texts() * TEMPLATE_REPEATS, vocab_size=vocab_size
        )
        staging = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex}")
        tokenizer.save_pretrained(str(staging))
        (staging / TOKENIZER_SOURCE).write_text(json.dumps(source, indent=1), encoding="utf-8")
        try:
            os.rename(staging, directory)
        except OSError:  # someone else published it first (shared filesystem without flock)
            shutil.rmtree(staging, ignore_errors=True)
    _check_tokenizer_source(directory, source)  # also checks one published by someone else
    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


def _split_questions(
    cfg: Any, questions: list[synthetic.Question]
) -> tuple[list[synthetic.Question], list[synthetic.Question], list[synthetic.Question]]:
    """(RL, eval, warm start) splits: the last ``env.eval_questions`` are the eval split, the
    first ``env.sft_questions`` the warm start's, the rest the RL split (the warm start's too
    when ``env.sft_questions == 0``). ValueError when a split would leave no RL questions."""
    n_eval = int(cfg.env.eval_questions)
    if not 0 <= n_eval < len(questions):
        raise ValueError(
            f"env.eval_questions={n_eval} must leave training questions out of {len(questions)}"
        )
    n_sft = int(cfg.env.sft_questions)
    if not 0 <= n_sft < len(questions) - n_eval:
        raise ValueError(
            f"env.sft_questions={n_sft} must leave RL questions out of "
            f"{len(questions) - n_eval} training questions"
        )
    split = len(questions) - n_eval
    train = questions[n_sft:split]
    return train, questions[split:], questions[:n_sft] or train


def _open_dataset(cfg: Any) -> tuple[CorpusStore, list[synthetic.Question]]:
    """The store at ``data.corpus`` (opened, not rebuilt) and the questions of
    ``data.questions``, whose evidence ids are checked against the store."""
    from vimrag_jax.envs import dataset

    corpus, path = str(cfg.data.corpus), str(cfg.data.questions or "")
    if not path:
        raise ValueError(
            f"data.corpus={corpus!r} is set, so data.questions must name its question file "
            "(JSON lines: id, question, answer, evidence_ids)"
        )
    store = CorpusStore.open(corpus)
    return store, dataset.load_questions(path, store)


def _tokenizer(
    cfg: Any, workdir: Path, texts_fn: Callable[[], Sequence[str]], vocab: int
) -> tuple[Any, int]:
    """(tokenizer, vocab size): ``model.path``'s for ``model.name == "hf"``, else the tiny BPE
    under ``WORKDIR/tokenizer/`` (built from ``texts_fn()`` on first start; a later start with
    other texts or another vocab size is refused, see ``_check_tokenizer_source``). Call under
    the lock."""
    model = cfg.model
    if model.name == "hf":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.path, local_files_only=True)
        return tokenizer, len(tokenizer)
    return _load_or_build_tokenizer(workdir / TOKENIZER_DIR, texts_fn, vocab), vocab


@dataclasses.dataclass
class Experiment:
    """Everything a worker or learner builds from the config before its loop starts."""

    cfg: Any
    workdir: Path
    store: CorpusStore
    tokenizer: Any
    train_questions: list[synthetic.Question]  # the RL workers' questions
    eval_questions: list[synthetic.Question]
    sft_questions: list[synthetic.Question]  # the scripted expert's (may be train_questions)
    entities: dict[str, str]
    vocab_size: int
    env_name: str = "synthetic"

    @classmethod
    def from_config(cls, cfg: Any, workdir: str | os.PathLike) -> Experiment:
        """Builds (first start) or reopens (later starts) the world and tokenizer in
        ``workdir``; safe when several processes start at once.

        With ``data.corpus`` set, the store there is opened as it is (never copied or rebuilt)
        and the questions come from ``data.questions`` (``envs.dataset``); the splits are the
        synthetic world's (``_split_questions``)."""
        workdir = Path(workdir)
        corpus = cfg.data.corpus
        vocab = int(cfg.env.tokenizer_vocab_size)
        if corpus:
            store, questions = _open_dataset(cfg)
            train, evaluation, sft = _split_questions(cfg, questions)
            with workdir_lock(workdir):  # only the tokenizer is built in the workdir
                tokenizer, vocab = _tokenizer(
                    cfg, workdir, lambda: synthetic.corpus_texts(list(store), questions), vocab
                )
            entities: dict[str, str] = {}  # a real corpus names no entity kinds
            env_name = "dataset"
        else:
            items, questions = synthetic.build(synthetic_config(cfg))
            train, evaluation, sft = _split_questions(cfg, questions)
            with workdir_lock(workdir):
                # The tokenizer first: a workdir made with another world is refused before its
                # corpus store is rebuilt.
                tokenizer, vocab = _tokenizer(
                    cfg, workdir, lambda: synthetic.corpus_texts(items, questions), vocab
                )
                store = CorpusStore.build(items, str(workdir / CORPUS_DIR))
            entities = synthetic.entity_kinds(items)
            env_name = "synthetic"
        return cls(
            cfg=cfg,
            workdir=workdir,
            store=store,
            tokenizer=tokenizer,
            train_questions=train,
            eval_questions=evaluation,
            sft_questions=sft,
            entities=entities,
            vocab_size=vocab,
            env_name=env_name,
        )

    def rollout_config(self, *, evaluation: bool = False) -> RolloutConfig:
        return RolloutConfig.from_config(self.cfg, evaluation=evaluation)

    def initial_model(self, **options):
        """The version-0 policy: ``model.path`` for ``model.name == "hf"``, else a randomly
        initialised preset (seeded by ``seed``) with its vocabulary sized to the tokenizer.
        ``options`` are the learner's build options (``remat``, ``scan_layers``,
        ``remat_policy``: `footprint.model_options`); the compute dtype is ``model.dtype``."""
        from flax import nnx

        model_cfg = self.cfg.model
        dtype = options.pop("dtype", model_cfg.dtype)
        if model_cfg.name == "hf":
            from vimrag_jax.models.hf import from_pretrained

            return from_pretrained(model_cfg.path, dtype=dtype, **options)
        from vimrag_jax.models.presets import init_model, preset_config

        hf = preset_config(model_cfg.name)
        target = hf["text_config"] if "text_config" in hf else hf
        target["vocab_size"] = self.vocab_size
        if "vision_config" in hf:  # a Qwen3-VL preset reads the tokenizer's vision placeholders
            for key, token in VISION_TOKEN_KEYS.items():
                hf[key] = int(self.tokenizer.convert_tokens_to_ids(token))
        return init_model(hf, rngs=nnx.Rngs(int(self.cfg.seed)), dtype=dtype, **options)

    def learner_model_fn(self):
        """A builder of the learner's policy: shapes and seeded initial values (jit-able), with
        the config's build options (`footprint.model_options`). For ``model.name == "hf"`` the
        shapes are those of ``model.path``'s config.json; `initial_params` reads its weights."""
        from flax import nnx

        from vimrag_jax.footprint import model_options, param_dtype, with_param_dtype
        from vimrag_jax.models.hf import read_config
        from vimrag_jax.models.presets import init_model

        options, dtype = model_options(self.cfg), param_dtype(self.cfg)
        if self.cfg.model.name != "hf":
            return lambda: with_param_dtype(self.initial_model(**options), dtype)
        hf = read_config(Path(self.cfg.model.path))
        return lambda: with_param_dtype(init_model(hf, rngs=nnx.Rngs(0), **options), dtype)

    def initial_params(self, mesh):
        """None (initialise from `learner_model_fn`) or the Hugging Face checkpoint's
        parameters, read straight into their shards over ``mesh`` (each process reads only the
        blocks its devices hold from the memory-mapped safetensors; no device or host holds
        the whole model)."""
        cfg = self.cfg
        if cfg.model.name != "hf":
            return None
        from flax import nnx

        from vimrag_jax.models.hf import from_pretrained

        model = from_pretrained(cfg.model.path, dtype=cfg.model.dtype, mesh=mesh)
        return nnx.state(model, nnx.Param)

    def load_latest(self, model, *, newer_than: int = -1) -> int | None:
        """Loads the newest published weights into ``model`` if newer than ``newer_than``;
        returns their version, or None when there is nothing newer.

        Published parameters are ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` trees.
        """
        from flax import nnx

        from vimrag_jax import publish

        found = publish.latest_policy(self.workdir)
        if found is None or found[0] <= newer_than:
            return None
        version, path = found
        state = nnx.state(model, nnx.Param)
        params = publish.load_policy(path, nnx.to_pure_dict(state))
        nnx.replace_by_pure_dict(state, params)
        nnx.update(model, state)
        return version

    def stop_token_ids(self) -> list[int]:
        """End-of-turn ids: the tokenizer's eos (``<|im_end|>``)."""
        return [int(self.tokenizer.eos_token_id)]

    def abstract_model(self):
        """The policy's structure without weights (``nnx.eval_shape``): the preset or the
        ``model.path`` config with the vocabulary and vision ids `initial_model` gives it, for
        writing published weights in Hugging Face layout without building the model."""
        from flax import nnx

        model_cfg = self.cfg.model
        if model_cfg.name != "hf":
            return nnx.eval_shape(self.initial_model)
        from vimrag_jax.models.hf import read_config
        from vimrag_jax.models.presets import init_model

        hf = read_config(Path(model_cfg.path))
        return nnx.eval_shape(lambda: init_model(hf, rngs=nnx.Rngs(0), dtype=model_cfg.dtype))

    def hf_source_dir(self) -> str | None:
        """The initial Hugging Face checkpoint (``model.path`` for ``model.name == "hf"``)."""
        return str(self.cfg.model.path) if self.cfg.model.name == "hf" else None

    def serving_path(self) -> Path:
        """The path a vLLM server is launched on (``rollout.serving_path``; default
        ``WORKDIR/policy/serving``), a link the worker points at each new version."""
        from vimrag_jax import publish

        configured = str(self.cfg.rollout.get("serving_path", "") or "")
        return Path(configured) if configured else self.workdir / publish.POLICY_DIR / "serving"

    def make_backend(self, model=None):
        """The generation backend of ``rollout.backend``: the embedded KV-cache sampler over
        ``model``, SGLang or vLLM servers (``rollout.server_url``, ``rollout.max_inflight``
        requests at once; no model), or the text-only OpenAI-compatible client. Server modules
        are imported only when selected."""
        rollout = self.cfg.rollout
        backend = rollout.backend
        rc = self.rollout_config()
        if backend != "embedded":  # the transport settings are read for servers only
            transport = dict(
                timeout_s=float(rollout.request_timeout_s),
                max_retries=int(rollout.max_retries),
                backoff_s=float(rollout.get("retry_backoff_s", 1.0)),
            )
        if backend == "openai":
            from vimrag_jax.sampling.openai_api import OpenAICompletionsSampler

            return OpenAICompletionsSampler(
                rollout.server_url, rollout.server_model or "default", **transport
            )
        inflight = int(rollout.get("max_inflight", 8))
        if backend == "sglang":
            from vimrag_jax.sampling.sglang import SGLangSampler

            return SGLangSampler(rollout.server_url, max_inflight=inflight, **transport)
        if backend == "vllm":
            from vimrag_jax.sampling.vllm import VLLMSampler, point_link

            link = self.serving_path()
            if not link.is_symlink() and not link.exists() and self.hf_source_dir():
                point_link(link, self.hf_source_dir())  # the initial policy, until v0 arrives
            return VLLMSampler(
                rollout.server_url,
                tokenizer=self.tokenizer,
                model=rollout.server_model or "default",
                serving_link=self.serving_path(),
                max_inflight=inflight,
                **transport,
            )
        if backend != "embedded":
            raise ValueError(
                f"rollout.backend must be one of embedded, {', '.join(SERVER_BACKENDS)}, openai; "
                f"got {backend!r}"
            )
        from vimrag_jax.sampling.sampler import Sampler

        if model is None:
            raise ValueError("the embedded backend needs the policy model")
        rows = rc.group_size * rc.questions_per_batch
        buckets = sorted({1 << i for i in range(rows.bit_length() + 1) if 1 << i <= rows} | {rows})
        pad = self.tokenizer.pad_token_id
        mesh = None
        tensor = int(rollout.get("sampler_tensor", 1))
        if tensor > 1:  # tensor parallel over this process's first `tensor` devices
            import jax

            from vimrag_jax.parallel.mesh import make_mesh

            devices = jax.local_devices()
            if len(devices) < tensor:
                raise ValueError(
                    f"config.rollout.sampler_tensor={tensor} but this process has "
                    f"{len(devices)} devices"
                )
            mesh = make_mesh(1, 1, tensor, devices=devices[:tensor])
        return Sampler(
            model,
            max_prompt_len=rc.max_prompt_tokens,
            max_new_tokens=rc.max_new_tokens,
            eos_token_ids=self.stop_token_ids(),
            pad_token_id=int(0 if pad is None else pad),
            batch_buckets=tuple(buckets),
            mesh=mesh,
            param_dtype=str(rollout.get("sampler_dtype", "")) or None,
        )


__all__ = [
    "CORPUS_DIR",
    "SERVER_BACKENDS",
    "TOKENIZER_DIR",
    "Experiment",
    "synthetic_config",
    "tokenizer_texts",
    "workdir_lock",
]
