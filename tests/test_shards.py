"""Tokenize once, train many times: shards equal the text path, and a mismatched folder is refused."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sae_lens_attn.data import token_rows
from sae_lens_attn.models import token_policy
from sae_lens_attn.shards import MANIFEST, ShardMismatchError, write_shards
from sae_lens_attn.tokens import TokenPolicy
from sae_lens_attn.training.tokenize import TokenizeConfig, tokenize

from .conftest import TEXT, make_tokenizer


@pytest.fixture()
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.txt").write_text(f"Document {i}. " + TEXT * (3 + i))
    return folder


def test_shards_hold_the_rows_the_text_path_makes(tmp_path, corpus, tiny_neox_dir, tiny_neox):
    out = tmp_path / "shards"
    manifest = tokenize(TokenizeConfig(dataset=str(corpus), out=str(out), model=tiny_neox_dir, context_size=24),
                        log=lambda *a: None)
    policy = token_policy(tiny_neox)
    expect = token_rows(corpus, tiny_neox.tokenizer, 24, policy)
    assert manifest["rows"] == expect.shape[0] and manifest["context_size"] == 24
    assert np.load(out / manifest["shards"][0]["file"]).dtype == np.int32
    assert torch.equal(token_rows(out, tiny_neox.tokenizer, 24, policy), expect)
    assert torch.equal(token_rows(out, tiny_neox.tokenizer, 24, policy, max_rows=3), expect[:3])


def test_rows_split_across_shards_in_order(tmp_path, corpus):
    tok = make_tokenizer()
    policy = TokenPolicy("bos", 0, None, 0, None, None, frozenset({0}))
    blocks = [np.arange(i * 160, (i + 1) * 160, dtype=np.int64).reshape(10, 16) for i in range(3)]
    manifest = write_shards(iter(blocks), tmp_path / "s", tok, "tiny", 16, policy, rows_per_shard=7)
    assert [s["rows"] for s in manifest["shards"]] == [7, 7, 7, 7, 2]
    got = token_rows(tmp_path / "s", tok, 16, policy)
    assert torch.equal(got, torch.from_numpy(np.concatenate(blocks)))


def test_a_folder_made_for_another_tokenizer_context_or_start_token_is_refused(tmp_path, corpus, tiny_neox_dir,
                                                                               tiny_neox):
    out = tmp_path / "shards"
    tokenize(TokenizeConfig(dataset=str(corpus), out=str(out), model=tiny_neox_dir, context_size=24), log=lambda *a: None)
    policy = token_policy(tiny_neox)
    with pytest.raises(ShardMismatchError, match=r"has context_size 24 but this run needs 32; re-tokenize with"):
        token_rows(out, tiny_neox.tokenizer, 32, policy)
    none = TokenPolicy("none")
    with pytest.raises(ShardMismatchError, match=r"has start_rule 'bos' but this run needs 'none'"):
        token_rows(out, tiny_neox.tokenizer, 24, none)
    other = make_tokenizer(vocab_size=280)
    with pytest.raises(ShardMismatchError, match=r"tokenized with another tokenizer .* than this model's"):
        token_rows(out, other, 24, policy)
    (out / MANIFEST).unlink()
    with pytest.raises(ShardMismatchError, match=r"no tokens.json: the `sae-lens-attn tokenize` that wrote it did not finish"):
        token_rows(out, tiny_neox.tokenizer, 24, policy)


def test_tokenize_cli_then_train_on_the_shards(tmp_path, corpus, tiny_neox_dir):
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "sae_lens_attn.frontends.cli"]
    r = subprocess.run([*cmd, "tokenize", "--dataset", str(corpus), "--out", str(out), "--model", tiny_neox_dir,
                        "--context-size", "24"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "train on them with --dataset" in r.stdout
    again = subprocess.run([*cmd, "tokenize", "--dataset", str(corpus), "--out", str(out), "--model", tiny_neox_dir],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds token shards" in again.stderr and "Traceback" not in again.stderr
    run = tmp_path / "run"
    r = subprocess.run([*cmd, "train", "--model", tiny_neox_dir, "--dataset", str(out), "--context-size", "32",
                        "--tokens", "256", "--batch-size", "64", "--out-dir", str(run), "--progress", "false"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "has context_size 24 but this run needs 32" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([*cmd, "train", "--model", tiny_neox_dir, "--dataset", str(out), "--context-size", "24",
                        "--tokens", "256", "--batch-size", "64", "--eval-rows", "2", "--out-dir", str(run),
                        "--progress", "false", "--overwrite", "true"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = json.loads((run / "L1.z" / "cfg.json").read_text())["metadata"]
    assert meta["dataset_path"] == str(out) and meta["training_tokens"] == 256 and meta["start_token"] == "bos"
