"""The unified corpus (`vimrag_jax.benchmarks.corpus`) built from the benchmark fixtures.

The nine TFDS datasets are built from ``tests/fixtures/benchmarks/`` (as in
``test_benchmark_builders.py``); the media the fixtures lack are made here: WebQA's
``imgs.tsv``, SlideVQA's slide images, an MMLongBench-Doc PDF (PIL's PDF writer), pre-extracted
video frames whose pixels encode their second, a VideoRAG transcript, and a video file that
cannot be decoded. Some evidence is left without media on purpose, so every unmapped reason the
builder reports is checked against what the test withheld.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vimrag_jax import benchmarks
from vimrag_jax.benchmarks import corpus, media
from vimrag_jax.benchmarks.build import build
from vimrag_jax.benchmarks.corpus_sources import Settings
from vimrag_jax.benchmarks.raw import RawFormatError
from vimrag_jax.envs.dataset import load_questions
from vimrag_jax.retrieval.corpus import CorpusStore
from vimrag_jax.retrieval.embedders import HashingEmbedder

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
DECK = "2012-02-20fy11roadshow-120221022442-phpapp02_95"
PDF = "PH_2016.06.08_Economy-Final.pdf"
PDF_PAGES = 12
SETTINGS = Settings(image_max_side=64, frame_max_side=32)
# Seconds of pre-extracted frames per video (others have none).
FRAMES = {"Cm73ma6Ibcs": 130, "3GsRPpOomE0": 61, "fH7ZK9YAckQ": 150}
WEBQA_IMAGES = (30240126, 30146309, 30348447, 30000001)

EXPECTED = {  # (benchmark, split, id) -> status; every other fixture question is "mapped"
    ("mmlongbench_doc", "test", "1"): "partial",  # pages 13 and 14 of a 12-page PDF
    ("mmlongbench_doc", "test", "3"): "unmapped",  # Independents-Report.pdf is absent
    ("mmlongbench_doc", "test", "4"): "no_evidence",  # "Not answerable"
    ("webqa", "test", "1234567890abcdef1234567890abcdef"): "no_evidence",  # test hides it
    ("lvbench", "test", "56"): "unmapped",  # 01:02:03 is beyond the 130 s of frames
    ("lvbench", "test", "840"): "unmapped",  # its video file cannot be decoded
    ("wikihowqa", "test", "292"): "partial",  # only a transcript of one of its ten videos
    ("syntheticqa", "test", "7HvrG7AZhR8_0"): "unmapped",  # no frames
    ("xvbench", "test", "1"): "partial",  # one of its two clips is of 7HvrG7AZhR8
}


def second_color(second: int) -> tuple[int, int, int]:
    """The flat color of the generated frame for ``second`` (distinct per second)."""
    return (second * 37 % 256, second * 11 % 256, 255 - second % 256)


def write_frames(directory: Path, seconds: int, size: tuple[int, int]) -> None:
    directory.mkdir(parents=True)
    for second in range(seconds):
        Image.new("RGB", size, second_color(second)).save(directory / f"{second}.jpg", quality=95)


def page_color(page: int) -> tuple[int, int, int]:
    return (20 * page, 255 - 20 * page, 128)


def write_pdf(path: Path, pages: int) -> None:
    """A PDF of flat-colored pages (PIL's PDF writer), page ``p`` in `page_color`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.new("RGB", (80, 100), page_color(p)) for p in range(1, pages + 1)]
    images[0].save(path, "PDF", save_all=True, append_images=images[1:], resolution=72)


def write_webqa_images(root: Path) -> None:
    """imgs.tsv / imgs.lineidx holding the fixture's images at the rows the release uses."""
    lines, offsets, position = [], {}, 0
    for image_id in WEBQA_IMAGES:
        png = io.BytesIO()
        Image.new("RGB", (100, 50), (image_id % 256, 0, 0)).save(png, "PNG")
        line = f"{image_id}\t{base64.b64encode(png.getvalue()).decode()}\n".encode()
        offsets[image_id % 10_000_000] = position
        lines.append(line)
        position += len(line)
    (root / "imgs.tsv").write_bytes(b"".join(lines))
    table = [str(offsets.get(row, 0)) for row in range(max(offsets) + 1)]
    (root / "imgs.lineidx").write_text("\n".join(table) + "\n")


def copy_fixture(name: str, target: Path) -> Path:
    import shutil

    shutil.copytree(FIXTURES / name, target / name)
    return target / name


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tfds")
    for name in benchmarks.NAMES:
        build(name, manual_dir=FIXTURES / name, data_dir=out, log=lambda _: None)
    build(
        "mmlongbench_doc",
        manual_dir=FIXTURES / "vrag",
        data_dir=out,
        config="vrag",
        log=lambda _: None,
    )
    return out


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("raw")
    dirs = {name: copy_fixture(name, root) for name in benchmarks.NAMES}
    write_webqa_images(dirs["webqa"])
    slides = dirs["slidevqa"] / "images" / "test" / DECK
    slides.mkdir(parents=True)
    for page in range(1, 21):
        Image.new("RGB", (40, 30), (page * 10, 0, 0)).save(slides / f"slide-{page}-1024.jpg")
    write_pdf(dirs["mmlongbench_doc"] / "data" / "documents" / PDF, PDF_PAGES)
    write_frames(dirs["lvbench"] / "frames" / "Cm73ma6Ibcs", FRAMES["Cm73ma6Ibcs"], (64, 48))
    (dirs["lvbench"] / "videos").mkdir()
    (dirs["lvbench"] / "videos" / "vaL_vSdZKZo.mp4").write_bytes(b"not a video")
    write_frames(dirs["wikihowqa"] / "frames" / "3GsRPpOomE0", FRAMES["3GsRPpOomE0"], (32, 24))
    transcript = dirs["wikihowqa"] / "datasets" / "scripts" / "original" / "XOuNZRCoHkg.txt"
    transcript.parent.mkdir(parents=True)
    transcript.write_text("first wrap the gift\n  then tie the ribbon  \n")
    write_frames(dirs["syntheticqa"] / "frames" / "fH7ZK9YAckQ", FRAMES["fH7ZK9YAckQ"], (32, 24))
    return dirs


@pytest.fixture(scope="module")
def built(data_dir: Path, raw: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("corpus") / "store"
    selection = ",".join([*benchmarks.NAMES, "mmlongbench_doc:vrag"])
    summary = corpus.build_corpus(
        data_dir=data_dir, raw=raw, out=out, selection=selection, settings=SETTINGS, log=print
    )
    return out, summary, CorpusStore.open(str(out))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def keys_of(out: Path) -> dict[str, int]:
    return {row["key"]: row["id"] for row in read_jsonl(out / "item_keys.jsonl")}


def evidence_of(out: Path) -> dict[tuple[str, str, str], dict]:
    return {
        (
            row["benchmark"] + ("" if row["format"] == "raw" else "." + row["format"]),
            row["split"],
            row["id"],
        ): row
        for row in read_jsonl(out / "evidence.jsonl")
    }


def test_every_fixture_question_is_mapped_or_counted(built, data_dir: Path) -> None:
    out, summary, _ = built
    rows = evidence_of(out)
    expected_total = 0
    for name in benchmarks.NAMES:
        for split, info in benchmarks.builder(name, data_dir=data_dir).info.splits.items():
            expected_total += info.num_examples
            for example in benchmarks.load(name, data_dir=data_dir, split=split):
                key = (name, split, example["id"].decode())
                assert rows[key]["status"] == EXPECTED.get(key, "mapped"), key
    assert len(rows) == expected_total + 2  # + MMLongBench-Doc's two VRAG questions
    for row in rows.values():
        assert (row["status"] in ("mapped", "no_evidence")) == (not row["unmapped"]), row
        assert all(u["reason"] for u in row["unmapped"]), row
        assert (row["status"] in ("unmapped", "no_evidence")) == (not row["item_ids"]), row
    # The counts printed and written agree with the rows.
    for label, count in summary["benchmarks"].items():
        statuses = [r["status"] for k, r in rows.items() if k[0] == label]
        assert count["questions"] == len(statuses)
        for status in corpus.STATUSES:
            assert count[status] == statuses.count(status), (label, status)
    on_disk = json.loads((out / "corpus_summary.json").read_text())
    assert on_disk["benchmarks"] == summary["benchmarks"]
    assert summary["benchmarks"]["lvbench"] == {
        "questions": 3, "mapped": 1, "partial": 0, "unmapped": 2, "no_evidence": 0,
        "reasons": {
            "video:Cm73ma6Ibcs:62 is beyond the 3 chunks of its source": 1,
            summary["media_errors"]["video:vaL_vSdZKZo"]: 1,
        },
    }  # fmt: skip


def test_unmapped_reasons_name_what_is_missing(built, raw: dict[str, Path]) -> None:
    out, summary, _ = built
    rows = evidence_of(out)
    pdf = rows[("mmlongbench_doc", "test", "3")]["unmapped"]
    assert {u["ref"] for u in pdf} == {"3", "5"}
    assert all("Independents-Report.pdf not found" in u["reason"] for u in pdf)
    assert [u["ref"] for u in rows[("mmlongbench_doc", "test", "1")]["unmapped"]] == ["13", "14"]
    assert "beyond the 12 pages" in rows[("mmlongbench_doc", "test", "1")]["unmapped"][0]["reason"]
    undecodable = rows[("lvbench", "test", "840")]["unmapped"][0]["reason"]
    assert str(raw["lvbench"] / "videos" / "vaL_vSdZKZo.mp4") in undecodable
    synthetic = rows[("syntheticqa", "test", "7HvrG7AZhR8_0")]["unmapped"][0]["reason"]
    assert "no frames/7HvrG7AZhR8/ or videos/7HvrG7AZhR8.*" in synthetic
    # The two vrag questions: uid 0 is page 5 (rendered), uid 1 pages 19-20 of 12.
    assert rows[("mmlongbench_doc.vrag", "test", "0")]["status"] == "mapped"
    assert rows[("mmlongbench_doc.vrag", "test", "1")]["status"] == "unmapped"


def test_evidence_points_at_the_right_items(built, data_dir: Path) -> None:
    out, _, store = built
    rows, keys = evidence_of(out), keys_of(out)
    for example in benchmarks.load("hotpotqa", data_dir=data_dir, split="validation"):
        ids = rows[("hotpotqa", "validation", example["id"].decode())]["item_ids"]
        titles = {s.decode() for s in example["evidence"]["source"]}
        assert {store.item(i).title for i in ids} == titles
    squad = json.loads((FIXTURES / "squad" / "dev-v1.1.json").read_text())["data"][0]
    for p, paragraph in enumerate(squad["paragraphs"]):
        for qa in paragraph["qas"]:
            (item,) = rows[("squad", "validation", qa["id"])]["item_ids"]
            assert store.item(item).text == paragraph["context"]
            assert item == keys[f"text:squad:Super_Bowl_50:{p}"]
    assert rows[("slidevqa", "test", "1")]["item_ids"] == [
        keys[f"page:slidevqa:{DECK}:5"],
        keys[f"page:slidevqa:{DECK}:7"],
    ]
    assert store.item(keys[f"page:slidevqa:{DECK}:7"]).text == f"{DECK}, slide 7"
    webqa = rows[("webqa", "train", "ffeeddccbbaa99887766554433221100")]["item_ids"]
    assert webqa == [keys["image:webqa:30146309"], keys["image:webqa:30240126"]]
    assert store.load_visual(webqa[1]).shape == (32, 64, 3)  # 100x50 shrunk to 64 wide
    assert rows[("lvbench", "test", "55")]["item_ids"] == [keys["video:Cm73ma6Ibcs:0"]]
    whole = rows[("syntheticqa", "test", "fH7ZK9YAckQ_0")]["item_ids"]
    assert whole == [keys[f"video:fH7ZK9YAckQ:{c}"] for c in range(3)]
    assert rows[("xvbench", "test", "0")]["item_ids"] == [keys["video:fH7ZK9YAckQ:2"]]
    (transcript,) = rows[("wikihowqa", "test", "292")]["item_ids"]
    assert store.item(transcript).text == "first wrap the gift then tie the ribbon"


def test_pdf_pages_are_rendered_to_image_items(built) -> None:
    out, _, store = built
    keys = keys_of(out)
    pages = [keys[f"page:mmlongbench_doc:{PDF}:{p}"] for p in range(1, PDF_PAGES + 1)]
    assert f"page:mmlongbench_doc:{PDF}:{PDF_PAGES + 1}" not in keys
    for page, item in enumerate(pages, 1):
        info = store.item(item)
        assert (info.modality, info.title, info.text) == ("image", PDF, f"{PDF}, page {page}")
        pixels = store.load_visual(item)
        assert pixels.shape == (64, 52, 3)  # 80x100 pt at 0.64 px/pt: 64 x 51.2, rounded up
        center = pixels[16:48, 12:40].reshape(-1, 3).mean(0)
        np.testing.assert_allclose(center, page_color(page), atol=3)


def test_videos_are_cut_into_60_second_chunks_at_1_fps(built) -> None:
    out, _, store = built
    keys = keys_of(out)
    for video, seconds in FRAMES.items():
        chunks = [keys[k] for k in keys if k.startswith(f"video:{video}:")]
        assert len(chunks) == -(-seconds // 60)
        for index, item in enumerate(chunks):
            info = store.item(item)
            frames = min(60, seconds - 60 * index)
            assert info.modality == "video" and info.num_frames == frames
            assert info.timestamps == tuple(float(t) for t in range(frames))
            assert info.shape[1:] == (24, 32, 3)  # 64x48 frames shrunk to 32 wide
            for slot in (0, frames - 1):
                pixel = store.load_visual(item, slot)[12, 16].astype(int)
                np.testing.assert_allclose(pixel, second_color(60 * index + slot), atol=6)
    assert store.item(keys["video:fH7ZK9YAckQ:2"]).text == "video fH7ZK9YAckQ, 02:00-02:30"


def test_question_files_load_with_their_evidence(built) -> None:
    out, _, store = built
    files = sorted(p.name for p in (out / "questions").iterdir())
    assert "webqa.test.jsonl" not in files  # the test split hides its answers
    assert "mmlongbench_doc.vrag.test.jsonl" in files
    rows = evidence_of(out)
    for path in (out / "questions").iterdir():
        label, split = path.name.removesuffix(".jsonl").rsplit(".", 1)
        for question in load_questions(path, store):
            row = rows[(label, split, question.question_id)]
            assert row["status"] != "unmapped"
            assert list(question.evidence_ids) == row["item_ids"]


def count_embedded(inner, fail_after: int | None = None):
    """A hashing embedder that counts the items it embeds and can fail part way."""

    class Counting:
        dim = inner.dim
        items = 0

        def spec(self):
            return inner.spec()

        def embed_texts(self, texts):
            return inner.embed_texts(texts)

        def embed_items(self, items):
            if fail_after is not None and Counting.items + len(items) > fail_after:
                raise KeyboardInterrupt("killed while embedding")
            Counting.items += len(items)
            return inner.embed_items(items)

    return Counting()


def test_resume_after_interruptions(data_dir: Path, raw: dict[str, Path], tmp_path: Path) -> None:
    selection = "squad,mmlongbench_doc,syntheticqa"
    args = dict(data_dir=data_dir, raw=raw, selection=selection, settings=SETTINGS, log=print)
    whole = corpus.build_corpus(out=tmp_path / "whole", workers=3, **args)  # same order
    total = sum(entry["items"] for entry in whole["items"].values())

    out = tmp_path / "resumed" / "store"
    stopped = corpus.build_corpus(out=out, max_items=5, **args)  # a kill after 5 items
    assert stopped == {"finished": False, "items_prepared": 14}  # 2 passages + a 12-page PDF
    work = out.with_name("store.work")
    with open(work / "items.jsonl", "a") as torn:  # and a line torn by the kill
        torn.write('{"id": 14, "modality": "te')
    assert not out.exists()
    with pytest.raises(KeyboardInterrupt):  # then killed again while embedding
        corpus.build_corpus(
            out=out, embed_batch=4, embedder=count_embedded(HashingEmbedder(), 8), **args
        )
    assert not out.exists()

    counting = count_embedded(HashingEmbedder())
    resumed = corpus.build_corpus(out=out, embed_batch=4, embedder=counting, **args)
    assert resumed["finished"] and resumed["items_prepared"] == total
    assert counting.items == total - 8  # the 8 embedded before the kill came from the cache
    assert (
        CorpusStore.open(str(out)).fingerprint
        == CorpusStore.open(str(tmp_path / "whole")).fingerprint
    )
    assert (out / "item_keys.jsonl").read_text() == (
        tmp_path / "whole" / "item_keys.jsonl"
    ).read_text()
    assert resumed["benchmarks"] == whole["benchmarks"]

    again = count_embedded(HashingEmbedder())  # a finished build reruns from its cache
    corpus.build_corpus(out=out, embedder=again, **args)
    assert again.items == 0


def test_command_line_and_its_errors(
    data_dir: Path, raw: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "store"
    argv = [
        f"--data_dir={data_dir}",
        f"--raw=squad={raw['squad']}",
        f"--out={out}",
        "--benchmarks=squad",
    ]
    assert corpus.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["benchmarks"]["squad"]["mapped"] == 8
    assert printed["items"] == {
        "text": {"items": 2, "pixel_bytes": 0, "frames": 0, "embedding_bytes": 2 * 256 * 4}
    }
    assert corpus.main([*argv[:3], "--benchmarks=squad,hotpotqa"]) == 2
    assert "no --raw directory for hotpotqa" in capsys.readouterr().err
    assert corpus.main([*argv[:1], f"--raw=squad={tmp_path / 'nowhere'}", *argv[2:]]) == 2
    assert "does not exist" in capsys.readouterr().err
    # The same work directory with other settings is refused, not mixed.
    assert corpus.main([*argv, "--image_max_side=99"]) == 2
    assert "--restart" in capsys.readouterr().err
    assert corpus.main([*argv, "--image_max_side=99", "--restart"]) == 0
    empty = tmp_path / "tfds-empty"
    assert corpus.main([f"--data_dir={empty}", *argv[1:]]) == 2
    assert "python -m vimrag_jax.benchmarks.build --benchmark=squad" in capsys.readouterr().err


def test_missing_decoders_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_pdf(tmp_path / "doc.pdf", 1)
    monkeypatch.setitem(sys.modules, "pypdfium2", None)
    with pytest.raises(media.MediaError, match=r"pip install pypdfium2"):
        media.render_pdf(tmp_path / "doc.pdf", tmp_path / "pages", 64)
    monkeypatch.setitem(sys.modules, "av", None)
    (tmp_path / "v.mp4").write_bytes(b"")
    with pytest.raises(media.MediaError, match=r"v\.mp4.*pip install av"):
        media.write_chunks(tmp_path / "v.mp4", tmp_path / "chunks", 32)


def test_frame_directories_must_be_1_fps_without_gaps(tmp_path: Path) -> None:
    write_frames(tmp_path / "v", 3, (8, 8))
    (tmp_path / "v" / "1.jpg").unlink()
    with pytest.raises(media.MediaError, match=r"no frame for second\(s\) \[1\]"):
        media.frame_seconds(tmp_path / "v")
    assert list(media.chunks_over(59, 61)) == [0, 1]
    assert list(media.chunks_over(15, 19)) == [0]


def test_a_raw_file_the_corpus_cannot_read_is_named(data_dir: Path, tmp_path: Path) -> None:
    raw = copy_fixture("squad", tmp_path)
    squad = json.loads((raw / "dev-v1.1.json").read_text())
    del squad["data"][0]["paragraphs"][1]["context"]
    (raw / "dev-v1.1.json").write_text(json.dumps(squad))
    with pytest.raises(RawFormatError, match=r"squad.*'context'"):
        corpus.build_corpus(
            data_dir=data_dir, raw={"squad": raw}, out=tmp_path / "store", selection="squad"
        )
