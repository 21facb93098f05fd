"""The tiny tokenizer cached in a workdir records what it was built from (training texts and vocab
size); a later start with another corpus or vocab size is refused with an error that names the
workdir instead of silently reusing (or rebuilding) it; a cache from before the record exists is
used as is, with a warning."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import ml_collections
import pytest

from vimrag_jax.experiment import (
    TOKENIZER_DIR,
    TOKENIZER_SOURCE,
    _load_or_build_tokenizer,
    _tokenizer,
    _tokenizer_source,
)

TEXTS = ["the red fox jumps over the lazy dog", "a lazy dog sleeps", "the fox runs"] * 3
VOCAB = 300  # bytes (256) + specials (13) + a few merges


def _snapshot(directory):
    return {name: os.stat(directory / name).st_mtime_ns for name in sorted(os.listdir(directory))}


def _tiny_cfg():
    return ml_collections.ConfigDict({"model": {"name": "tiny"}})


def test_the_source_record_hashes_texts_in_order_and_the_vocab_size():
    base = _tokenizer_source(["ab", "c"], VOCAB)
    assert base == _tokenizer_source(("ab", "c"), VOCAB)
    assert base["num_texts"] == 2 and base["vocab_size"] == VOCAB
    for other in [_tokenizer_source(["a", "bc"], VOCAB), _tokenizer_source(["c", "ab"], VOCAB)]:
        assert other["texts_sha256"] != base["texts_sha256"]
    assert _tokenizer_source(["ab", "c"], VOCAB + 1)["texts_sha256"] == base["texts_sha256"]


def test_a_cached_tokenizer_is_reused_only_for_the_same_texts_and_vocab(tmp_path, caplog):
    tokenizer, vocab = _tokenizer(_tiny_cfg(), tmp_path, lambda: TEXTS, VOCAB)
    directory = tmp_path / TOKENIZER_DIR
    assert vocab == VOCAB and (directory / TOKENIZER_SOURCE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [TOKENIZER_DIR]  # no staging left
    before = _snapshot(directory)
    with caplog.at_level(logging.WARNING):
        again, _ = _tokenizer(_tiny_cfg(), tmp_path, lambda: list(TEXTS), VOCAB)
    assert again.get_vocab() == tokenizer.get_vocab() and not caplog.records
    cases = [
        (TEXTS + ["a new passage"], VOCAB, "other training texts: 9 then, 10 now"),
        (TEXTS[::-1], VOCAB, "other training texts: 9 then, 9 now"),
        (TEXTS, VOCAB + 20, "vocab size 300 then, 320 now"),
    ]
    for texts, vocab_size, problem in cases:
        with pytest.raises(ValueError) as caught:
            _load_or_build_tokenizer(directory, lambda t=texts: t, vocab_size)
        message = str(caught.value)
        assert message.startswith(f"workdir {tmp_path}: the cached tokenizer in {directory}")
        assert "built from a different corpus/vocab" in message and problem in message
        assert "start this run in a new --workdir" in message
    assert _snapshot(directory) == before  # refused, never rebuilt


def test_a_cache_without_a_source_record_is_used_with_a_warning(tmp_path, caplog):
    directory = tmp_path / TOKENIZER_DIR
    built = _load_or_build_tokenizer(directory, lambda: TEXTS, VOCAB)
    (directory / TOKENIZER_SOURCE).unlink()  # as written before the record existed
    with caplog.at_level(logging.WARNING, logger="vimrag_jax.experiment"):
        loaded = _load_or_build_tokenizer(directory, lambda: ["another corpus"], VOCAB)
    assert loaded.get_vocab() == built.get_vocab()  # the old one, as it is
    assert not (directory / TOKENIZER_SOURCE).exists()
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "records no source" in record.getMessage()
    (directory / TOKENIZER_SOURCE).write_text("{broken")
    with pytest.raises(ValueError, match="cannot read the tokenizer source record"):
        _load_or_build_tokenizer(directory, lambda: TEXTS, VOCAB)


def test_a_workdir_made_with_another_world_is_refused_before_its_corpus_changes(tmp_path):
    from vimrag_jax.experiment import CORPUS_DIR, Experiment
    from vimrag_jax.retrieval.corpus import MANIFEST

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from configs import ggpo

    def config(seed):
        cfg = ggpo.get_config()
        cfg.seed = seed
        cfg.env.num_entities, cfg.env.num_questions, cfg.env.eval_questions = 8, 8, 2
        cfg.env.tokenizer_vocab_size = 400
        return cfg

    Experiment.from_config(config(0), tmp_path)
    manifest = tmp_path / CORPUS_DIR / MANIFEST
    before = manifest.read_text()
    Experiment.from_config(config(0), tmp_path)  # the same world: reopened
    with pytest.raises(ValueError, match="built from a different corpus/vocab"):
        Experiment.from_config(config(1), tmp_path)
    assert manifest.read_text() == before  # the old corpus store is untouched
