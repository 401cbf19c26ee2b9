"""The name-copying task, per-row feature edits, the head survey's criterion and the induction writers."""

from __future__ import annotations

import torch

from sae_lens_attn import SAE, SAEConfig, Site
from sae_lens_attn.analysis import copy_logit_diff, edit_rows, repeated_name_prompts, run_spliced, spearman
from sae_lens_attn.analysis.induction import repeated_tokens
from sae_lens_attn.analysis.induction_heads import induction_writers
from sae_lens_attn.analysis.survey import HeadRoles, source_role
from sae_lens_attn.models import SAMPLE_TEXT


def test_copy_prompts_and_the_model_does_the_task(default_model):
    model = default_model
    data = repeated_name_prompts(model, SAMPLE_TEXT.read_text(encoding="utf-8")[:300_000], n=16, window=64)
    n, w = data.tokens.shape
    assert (n, w) == (16, 64) and data.corrupted.shape == data.tokens.shape
    assert (data.tokens[:, 0] == 0).all()  # the policy's BOS
    rows = torch.arange(n)
    a = data.tokens[:, -1]
    assert (data.tokens[rows, data.earlier] == a).all() and (data.tokens[rows, data.earlier + 1] == data.answer).all()
    changed = data.tokens != data.corrupted
    for r in range(n):
        for p in changed[r].nonzero()[:, 0].tolist():  # only the second piece after an earlier ``a``
            assert data.tokens[r, p - 1] == a[r] and data.tokens[r, p] == data.answer[r]
            assert data.corrupted[r, p] == data.alt[r]
    assert changed[rows, data.earlier + 1].all()
    with torch.no_grad():
        clean = float(copy_logit_diff(model(data.tokens), data))
        corrupted = float(copy_logit_diff(model(data.corrupted), data))
    assert clean > 3 and clean - corrupted > 3, (clean, corrupted)


def test_edit_rows_sets_each_rows_own_features(tiny_neox):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=16, k=4, metadata={"hook_name": "blocks.1.attn.hook_z"}))
    toks = torch.randint(1, 200, (3, 6))
    feats = torch.tensor([[1, 2], [3, 4], [5, 6]])
    last = torch.zeros_like(toks, dtype=torch.bool)
    last[:, -1] = True
    values = torch.randn(3, 6, 16)
    rec = {}

    def spy(f):
        out = edit_rows(feats, last, toks, values)(f)
        rec["before"], rec["after"] = f, out
        return out

    run_spliced(tiny_neox, sae, toks, edit=spy)
    before, after = rec["before"], rec["after"]
    want = before.clone()
    for r in range(3):
        for f in feats[r].tolist():
            want[r, -1, f] = values[r, -1, f]
    assert torch.equal(after, want)
    zeroed = edit_rows(feats, last, toks)(before)
    assert (zeroed[torch.arange(3)[:, None], -1, feats] == 0).all() and torch.equal(zeroed[:, :-1], before[:, :-1])


def test_spearman():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert abs(spearman(x, x * 10) - 1) < 1e-12 and abs(spearman(x, -x) + 1) < 1e-12
    y = torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])  # ranks differ by one swap in two places: rho = 1 - 6*4/(5*24)
    assert abs(spearman(x, y) - 0.8) < 1e-12


def test_source_roles_and_verdicts():
    toks = torch.tensor([0, 7, 8, 9, 7, 5, 6, 1, 2, 3, 4, 5, 7])
    assert source_role(toks, 6, 0) == "start"
    assert source_role(toks, 6, 6) == "self" and source_role(toks, 6, 5) == "previous"
    assert source_role(toks, 12, 2) == "copy"  # token 8 follows the earlier 7; position 12 holds a 7
    assert source_role(toks, 11, 7) == "local" and source_role(toks, 12, 3) == "distant"
    r = HeadRoles(1, 0, [1, 2, 3, 4, 5], {1: "copy", 2: "copy", 3: "copy", 4: "copy", 5: "local"})
    assert r.verdict == "polysemantic"  # local holds 1 of 5 = 20%
    r.roles[5] = "copy"
    assert r.verdict == "monosemantic"
    assert HeadRoles(1, 2).verdict == "no features"


def test_induction_writers_factor_the_dfa(default_model):
    from sae_lens_attn.analysis import dfa_by_source

    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=256, d_sae=8, k=8, metadata={"hook_name": "blocks.1.attn.hook_z"}))
    toks = repeated_tokens(default_model, n_seq=3, length=10, seed=2)
    writers = induction_writers(default_model, sae, [0, 1], toks, Site(1))
    res = dfa_by_source(default_model, sae, toks, [0, 1], Site(1))
    L = 10
    for w in writers:  # recompute the head's mean attention and value read-out at s* by hand
        att, read, n = 0.0, 0.0, 0
        for b in range(3):
            for t in range(L + 1, 2 * L + 1):
                s = t - L + 1
                for j in range(2):
                    if res.acts[b, t, j] > 0:
                        a = float(res.pattern[b, w.head, t, s])
                        att += a
                        read += float(res.by_source[b, t, w.head, s, j]) / a
                        n += 1
        assert abs(w.attention - att / max(n, 1)) < 1e-5 and abs(w.value_readout - read / max(n, 1)) < 1e-4
    assert abs(sum(w.dfa_share for w in writers) - 1) < 1e-5
