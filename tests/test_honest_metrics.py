"""Honest evaluation: unreliable CE-recovered ratios are flagged with the reason, dead says what it counted
over, evaluation memory follows the chunk, and the start token is a recorded choice."""

import dataclasses
import json
import types

import pytest
import torch

from sae_lens_attn import evals
from sae_lens_attn.evals import (
    MIN_ABLATION_GAP,
    SAEMetrics,
    eval_chunk_rows,
    format_metrics_table,
    recovered_note,
)
from sae_lens_attn.models import load_model, token_policy
from sae_lens_attn.objective import kl_per_position, token_losses
from sae_lens_attn.tokens import check_start_token, with_start_token

from .conftest import make_tokenizer


def _metrics(**kw) -> SAEMetrics:
    base = dict(site="L15.z", l0=32.0, fvu=0.2, explained_variance=0.8, ce_clean=2.91, ce_spliced=2.90,
                ce_zero_ablated=2.98, ce_mean_ablated=2.89, ce_recovered_zero=1.181, ce_recovered_mean=-0.612,
                kl_spliced=0.01, dead_fraction=0.0, mean_density=0.003, dead_tokens=2032)
    base.update(kw)
    return SAEMetrics(**base)


def test_notes_name_a_small_or_negative_ablation_gap():
    assert recovered_note(3.5, 2.9, "zero") == ""
    small = recovered_note(2.98, 2.91, "zero")
    assert "raises the loss by only 0.070 nats" in small and f"< {MIN_ABLATION_GAP}" in small
    assert "lowers the loss (2.890 < clean 2.910 nats)" in recovered_note(2.89, 2.91, "mean")


def test_table_marks_flagged_ratios_and_prints_raw_losses_and_dead_window():
    m = _metrics(ce_recovered_zero_note=recovered_note(2.98, 2.91, "zero"),
                 ce_recovered_mean_note=recovered_note(2.89, 2.91, "mean"))
    table = format_metrics_table([m])
    assert "118.1%*" in table and "-61.2%*" in table
    assert "CE zero" in table and "2.980" in table and "CE mean" in table and "2.890" in table
    assert "* L15.z CE rec (zero): zero-ablating the site raises the loss by only 0.070 nats" in table
    assert "* L15.z CE rec (mean): mean-ablating the site lowers the loss" in table
    assert "dead: latents that never fired on the 2,032 evaluation tokens" in table
    clean = format_metrics_table([_metrics(ce_recovered_zero=0.95, ce_recovered_mean=0.9)])
    assert "*" not in clean


def test_evaluation_chunk_follows_the_vocabulary():
    small = types.SimpleNamespace(cfg=types.SimpleNamespace(d_vocab=4096))
    big = types.SimpleNamespace(cfg=types.SimpleNamespace(d_vocab=49152))
    assert eval_chunk_rows(small, 128, 16) == 16  # the embedded model: unchanged
    per_row = 2 * 4 * 128 * 49152
    assert eval_chunk_rows(big, 128, 16) == evals.EVAL_LOGIT_BYTES // per_row == 5
    assert eval_chunk_rows(big, 100_000, 16) == 1


def test_sliced_losses_equal_the_whole_computation(monkeypatch):
    from sae_lens_attn import objective

    g = torch.Generator().manual_seed(0)
    logits, other = torch.randn(3, 7, 50, generator=g), torch.randn(3, 7, 50, generator=g)
    targets = torch.randint(0, 50, (3, 7), generator=g)
    targets[:, -1] = -100
    whole_ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 50).double(), targets.reshape(-1),
                                                 reduction="none", ignore_index=-100).reshape(3, 7)
    lp, lq = logits.double().log_softmax(-1), other.double().log_softmax(-1)
    whole_kl = (lp.exp() * (lp - lq)).sum(-1)
    monkeypatch.setattr(objective, "SLICE_ELEMENTS", 120)  # 2 positions per slice
    assert torch.equal(token_losses(logits, targets), whole_ce)
    assert torch.equal(kl_per_position(logits, other), whole_kl)


def test_evaluate_sae_reports_notes_and_token_count(default_model, tmp_path):
    from sae_lens_attn import SAE, Site
    from sae_lens_attn.data import token_rows
    from sae_lens_attn.models import SAMPLE_TEXT
    from sae_lens_attn.sae import SAEConfig

    site = Site(1)
    d_in = site.d_in(default_model.cfg)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=4 * d_in, k=8, metadata={"model_name": "sae-lens-attn/shakespeare-2l",
                                                                  "hook_name": site.hook_name}))
    rows = token_rows(SAMPLE_TEXT, default_model.tokenizer, 64, token_policy(default_model), max_rows=4)
    m, _ = evals.evaluate_sae(default_model, sae, site, rows)
    assert m.dead_tokens == int(token_policy(default_model).keep(rows).sum())
    for how, ratio, note in (("zero", m.ce_recovered_zero, m.ce_recovered_zero_note),
                             ("mean", m.ce_recovered_mean, m.ce_recovered_mean_note)):
        ablated = m.ce_zero_ablated if how == "zero" else m.ce_mean_ablated
        assert note == recovered_note(ablated, m.ce_clean, how)
        assert ratio == pytest.approx((ablated - m.ce_spliced) / (ablated - m.ce_clean))
    assert json.loads(json.dumps(m.as_dict()))["dead_tokens"] == m.dead_tokens


# ------------------------------------------------------------------------------------------ start token


def _chat_tokenizer():
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.bos_token = "<|im_start|>"
    return tok


def test_start_token_choices():
    from sae_lens_attn.tokens import policy_from_tokenizer

    tok = _chat_tokenizer()
    base = policy_from_tokenizer(tok, encoder=False)
    assert base.start == tok.convert_tokens_to_ids("<|im_start|>")
    chosen = with_start_token(base, tok, "<|endoftext|>")
    assert (chosen.rule, chosen.start, chosen.separator, chosen.start_token) == ("token", 0, 0, "<|endoftext|>")
    assert chosen.encode(tok, "to be")[0] == 0 and chosen.keep(torch.tensor([0, 5])).tolist() == [False, True]
    none = with_start_token(base, tok, "none")
    assert none.start is None and none.start_token == "none" and none.n_structural == 0
    assert with_start_token(base, tok, "bos") is base
    with pytest.raises(ValueError, match=r"'to be' is not one token of this tokenizer's vocabulary .* 'none'"):
        with_start_token(base, tok, "to be")
    with pytest.raises(ValueError, match="encoders keep their"):
        with_start_token(base, tok, "none", encoder=True)


def test_start_token_reaches_the_model_and_the_sae_metadata(tiny_neox_dir, tmp_path):
    model = load_model(tiny_neox_dir, start_token="none")
    assert token_policy(model).rule == "none"
    from sae_lens_attn import TrainConfig, train

    cfg = TrainConfig(model=tiny_neox_dir, start_token="none", tokens=256, batch_size=64, context_size=16,
                      eval_rows=2, out_dir=str(tmp_path / "run"), progress=False)
    lines = []
    result = train(cfg, log=lines.append)
    meta = result.saes[next(iter(result.saes))].cfg.metadata
    assert meta["start_token"] == "none" and meta["prepend_bos"] is False
    assert any("start_token 'none'" in line for line in lines)
    with pytest.warns(UserWarning, match=r"trained with start_token 'none' but the model was loaded with 'bos'"):
        check_start_token(torch.tensor([[0, 5, 6]]), token_policy(load_model(tiny_neox_dir)), meta, what="sae-x")


def test_training_tokens_records_what_was_trained(tiny_neox_dir, tmp_path):
    from sae_lens_attn import TrainConfig, train

    cfg = TrainConfig(model=tiny_neox_dir, tokens=100, batch_size=64, context_size=16, eval_rows=2,
                      out_dir=str(tmp_path / "run"), progress=False)
    lines = []
    result = train(cfg, log=lines.append)
    assert result.saes[next(iter(result.saes))].cfg.metadata["training_tokens"] == 64  # one whole batch
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["dead_fraction"] is None and "fewer than the 250,000-token dead window" in log[-1]["dead_note"]
    assert any("dead window" in line for line in lines)
    assert dataclasses.asdict(result.metrics[0])["dead_tokens"] > 0


def test_saved_evaluation_travels_with_the_sae_and_is_shown_with_its_flags(tiny_neox_dir, tmp_path):
    from sae_lens_attn import SAE, TrainConfig, train
    from sae_lens_attn.analysis.dashboard_index import _evaluation
    from sae_lens_attn.evals import metrics_lines, saved_metrics
    from sae_lens_attn.frontends.explorer.session import LoadedSAE

    run = tmp_path / "run"
    train(TrainConfig(model=tiny_neox_dir, tokens=128, batch_size=64, context_size=16, eval_rows=2,
                      out_dir=str(run), progress=False), log=lambda *a: None)
    listed = json.loads((run / "metrics.json").read_text())[0]
    sae = SAE.load(run / "L1.z")
    assert saved_metrics(sae) == listed == json.loads((run / "L1.z" / "metrics.json").read_text())
    (run / "L1.z" / "metrics.json").unlink()  # an older run: the run folder's list still answers
    assert saved_metrics(SAE.load(run / "L1.z")) == listed
    flagged = {**listed, "ce_recovered_mean": -0.612,
               "ce_recovered_mean_note": recovered_note(listed["ce_clean"] - 0.02, listed["ce_clean"], "mean")}
    lines = metrics_lines(flagged)
    assert "-61.2%* (mean-abl.)" in lines[0] and lines[-1].startswith("  * CE recovered (mean): mean-ablating")
    assert f"on {listed['dead_tokens']:,} evaluation tokens" in lines[1]
    assert "evaluation at training" in _evaluation(sae)
    described = LoadedSAE("L1.z", sae, __import__("sae_lens_attn").Site(1)).describe()["evaluation"]
    assert described["lines"] == metrics_lines(listed) and described["fvu"] == listed["fvu"]
