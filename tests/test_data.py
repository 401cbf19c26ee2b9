import json

import numpy as np
import pytest
import torch

from sae_lens_attn.data import EmptyDatasetError, iter_texts, token_rows

from .conftest import TEXT, make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_rows_start_with_bos_and_pack_documents(tmp_path, tok):
    f = tmp_path / "a.txt"
    f.write_text(TEXT * 5)
    rows = token_rows(f, tok, n_ctx=16, bos_id=0)
    assert rows.shape[1] == 16 and (rows[:, 0] == 0).all()
    ids = tok(TEXT * 5, add_special_tokens=False)["input_ids"]
    # the rows, BOS removed, are the document's tokens in order
    assert rows[:, 1:].reshape(-1).tolist() == ids[: rows.shape[0] * 15]


def test_folder_jsonl_and_saved_hf_dataset_agree(tmp_path, tok):
    docs = [TEXT, TEXT.upper(), TEXT[::-1]]
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_text(d)
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    import datasets

    hf = tmp_path / "hf"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(hf))
    assert list(iter_texts(folder)) == docs
    assert list(iter_texts(jl)) == docs
    assert list(iter_texts(hf)) == docs
    a = token_rows(folder, tok, 32, 0)
    assert torch.equal(a, token_rows(jl, tok, 32, 0))
    assert torch.equal(a, token_rows(hf, tok, 32, 0))


def test_token_arrays(tmp_path, tok):
    ids = np.arange(1, 100)
    np.save(tmp_path / "t.npy", ids)
    rows = token_rows(tmp_path / "t.npy", tok, 10, 0)
    assert rows.shape == (11, 10) and rows[0].tolist() == [0, *range(1, 10)]


def test_empty_dataset_is_a_clear_error(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(EmptyDatasetError, match="empty.txt gave no rows"):
        token_rows(tmp_path / "empty.txt", tok, 16, 0)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(EmptyDatasetError, match="holds no .txt"):
        token_rows(tmp_path / "nothing", tok, 16, 0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        token_rows(tmp_path / "missing.txt", tok, 16, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: no 'text' field"):
        token_rows(bad, tok, 16, 0)
