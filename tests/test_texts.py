"""The lazy, linear data path: bounded pieces, token identity across cuts, lazy reads, text-type checks."""

import json
import random

import numpy as np
import pytest
import torch

from sae_lens_attn import data, texts
from sae_lens_attn.data import iter_row_blocks, token_rows
from sae_lens_attn.models import SAMPLE_TEXT
from sae_lens_attn.texts import NotTextError, Piece, check_text_source, cut_pieces, iter_pieces

from .conftest import TEXT, make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _words(n: int, seed: int = 0, long_words: bool = False) -> str:
    """Words, punctuation, runs of spaces and newlines (and, with ``long_words``, 40-letter words, which
    leave a short piece no safe cut point)."""
    rng = random.Random(seed)
    vocab = ["the", "king", "Hamlet", "'tis", "lord,", "what", "say", "you?", "  indented", "\n", "\n\n"]
    vocab += ["x" * 40] if long_words else []
    return " ".join(rng.choice(vocab) for _ in range(n))


def test_pieces_join_back_and_stay_bounded():
    text = _words(3000, long_words=True)
    pieces = list(cut_pieces(text, 100))
    assert "".join(pieces) == text
    assert max(len(p) for p in pieces) <= 100 and len(pieces) > 20


def test_a_document_tokenizes_the_same_whole_or_in_pieces(tok, default_model):
    """Byte-level BPE splits at the cut points anyway, so cutting changes no token id."""
    for tokenizer, text in ((tok, _words(4000, seed=1)), (default_model.tokenizer, SAMPLE_TEXT.read_text()[:200_000])):
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = list(cut_pieces(text, 257))
        cut = [i for p in pieces for i in tokenizer(p, add_special_tokens=False)["input_ids"]]
        assert cut == whole


def _reference_rows(docs: list[str], tokenizer, n_ctx: int, bos: int) -> list[list[int]]:
    """Packing written out: documents joined by BOS, cut into bodies of n_ctx - 1, BOS first."""
    stream = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [bos]
    body = n_ctx - 1
    return [[bos, *stream[i : i + body]] for i in range(0, len(stream) - body + 1, body)]


def test_file_read_in_small_blocks_packs_like_the_reference(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(texts, "BLOCK_BYTES", 97)  # many blocks, pieces cut across block edges
    monkeypatch.setattr(texts, "PIECE_CHARS", 256)
    monkeypatch.setattr(data, "BATCH_CHARS", 300)  # many tokenizer calls, rows spanning calls
    docs = [_words(400, seed=s) for s in range(3)]
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_text(d)
    pieces = list(iter_pieces(folder))
    assert max(len(p.text) for p in pieces) <= 256 and sum(p.last for p in pieces) == 3
    rows = token_rows(folder, tok, 16, 0)
    assert rows.tolist() == _reference_rows(docs, tok, 16, 0)


def test_only_the_rows_asked_for_are_tokenized(tok):
    pulled = []

    def docs():
        for i in range(10_000):
            pulled.append(i)
            yield Piece(TEXT, True)

    blocks = iter_row_blocks(docs(), tok, 32, 0)
    first = next(blocks)
    assert first.shape[1] == 32 and len(pulled) <= data.BATCH_PIECES  # one tokenizer call, not 10,000 documents


def test_max_rows_stops_reading(tmp_path, tok, monkeypatch):
    big = tmp_path / "big.txt"
    big.write_text(_words(200_000))
    seen = []
    real = texts._decoded_blocks

    def counting(path, encoding):
        for block in real(path, encoding):
            seen.append(len(block))
            yield block

    monkeypatch.setattr(texts, "_decoded_blocks", counting)
    monkeypatch.setattr(texts, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(data, "BATCH_CHARS", 8192)
    rows = token_rows(big, tok, 32, 0, max_rows=3)
    assert rows.shape == (3, 32)
    assert sum(seen) < 64 * 4096 < big.stat().st_size  # read a few blocks of a ~1.3 MB file


@pytest.mark.parametrize("value", [5, None, ["a", "b"], {"x": 1}, True])
def test_non_string_text_fields_are_refused_with_file_and_line(tmp_path, tok, value):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(NotTextError, match=rf"d.jsonl:2: the 'text' field is {type(value).__name__} .*not a string"):
        token_rows(f, tok, 8, 0)


def test_a_binary_file_in_a_folder_is_named_before_any_work(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT * 10)
    (folder / "b.txt").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(NotTextError, match=r"b.txt is not a text file: it holds 8 NUL byte\(s\)"):
        check_text_source(folder)
    (folder / "b.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(NotTextError, match=r"b.txt is not utf-8 text: .*--encoding"):
        check_text_source(folder)
    check_text_source(folder, encoding="latin-1")


def test_a_single_line_file_becomes_bounded_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(texts, "BLOCK_BYTES", 1000)
    line = _words(50_000).replace("\n", " ")
    f = tmp_path / "line.txt"
    f.write_text(line)
    pieces = list(iter_pieces(f))
    assert "".join(p.text for p in pieces) == line
    assert max(len(p.text) for p in pieces) <= texts.PIECE_CHARS and [p.last for p in pieces][-1]


def test_rows_block_reader_matches_row_reader(tmp_path, tok):
    f = tmp_path / "a.txt"
    f.write_text(TEXT * 50)
    blocks = np.concatenate(list(data.text_row_blocks(f, tok, 16, 0)))
    assert torch.equal(torch.from_numpy(blocks), token_rows(f, tok, 16, 0))
