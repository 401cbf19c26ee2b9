"""The embedded default model: a real LM with a learned induction circuit, loaded like a hub model."""

import json

import pytest
import torch

from sae_lens_attn.data import token_rows
from sae_lens_attn.models import DEFAULT_MODEL_DIR, SAMPLE_TEXT, bos_token_id

CARD = json.loads((DEFAULT_MODEL_DIR / "model_card.json").read_text())


def test_shipped_files_and_size():
    names = {p.name for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "model_card.json"} <= names
    assert sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()) <= 12 * 1024**2
    assert SAMPLE_TEXT.stat().st_size <= 2 * 1024**2


def test_card_reports_a_real_language_model():
    for key in ("build_command", "tokens_seen", "wall_time_minutes", "held_out_ce", "held_out_unigram_entropy",
                "head_scores_by_repeat_length"):
        assert key in CARD
    assert CARD["held_out_ce"] <= CARD["held_out_unigram_entropy"] - 1.5


def test_loads_through_transformer_bridge(default_model):
    from transformer_lens.model_bridge import TransformerBridge

    assert isinstance(default_model, TransformerBridge)
    assert default_model.cfg.n_layers == 2 and default_model.cfg.n_heads == 8 and default_model.cfg.d_head == 32


def test_held_out_ce_measured_again_matches_card(default_model):
    rows = token_rows(SAMPLE_TEXT, default_model.tokenizer, 256, bos_token_id(default_model), max_rows=24)
    with torch.no_grad():
        ce = float(default_model(rows, return_type="loss"))
    # 24 rows are a sample of the card's full held-out set: same ballpark, and far below the unigram entropy
    assert abs(ce - CARD["held_out_ce"]) < 0.35
    assert ce <= CARD["held_out_unigram_entropy"] - 1.4


def test_previous_token_head_in_layer_0(default_model):
    _, prev_l0 = head_scores(default_model, 50)[0]
    assert prev_l0.max() >= 0.5


def head_scores(model, length, n_seq=16, seed=7):
    g = torch.Generator().manual_seed(seed)
    bos = bos_token_id(model)
    r = torch.randint(1, model.cfg.d_vocab, (n_seq, length), generator=g)
    toks = torch.cat([torch.full((n_seq, 1), bos), r, r], dim=1)
    _, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_pattern"))
    second = torch.arange(length + 1, 2 * length + 1)
    q = torch.arange(1, toks.shape[1])
    out = {}
    for layer in range(model.cfg.n_layers):
        p = cache[f"blocks.{layer}.attn.hook_pattern"]
        out[layer] = (p[:, :, second, second - length + 1].mean((0, 2)), p[:, :, q, q - 1].mean((0, 2)))
    return out


@pytest.mark.parametrize("length", [30, 50])
def test_learned_induction_head_at_unseen_repeat_lengths(default_model, length):
    # training never used repeat lengths that are multiples of 10
    scores = head_scores(default_model, length)
    induction_l1, _ = scores[1]
    _, prev_l0 = scores[0]
    assert induction_l1.max() >= 0.5
    assert prev_l0.max() >= 0.5
    # the card's numbers come from the same definition
    card_best = max(CARD["head_scores_by_repeat_length"][str(length)]["induction"][1])
    assert abs(card_best - float(induction_l1.max())) < 0.1
