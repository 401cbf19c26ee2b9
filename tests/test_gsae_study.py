"""The g-SAE study's statistics (paired t-intervals, the row bootstrap), its per-row evaluation, and resuming."""

import math
import statistics

import pytest
import torch

from sae_lens_attn.errors import InputError
from sae_lens_attn.evals import evaluate_sae
from sae_lens_attn.frontends.gsae_study import Store, _grid
from sae_lens_attn.frontends.gsae_study_eval import SteerConfig, sae_eval, site_eval
from sae_lens_attn.frontends.gsae_study_stats import (
    bootstrap_weights,
    paired,
    row_metrics,
    run_key,
    t_interval,
    t_quantile,
)
from sae_lens_attn.sae import SAE, SAEConfig
from sae_lens_attn.sites import Site

from .conftest import random_rows


def test_t_quantile_against_closed_forms_and_tables():
    for p in (0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)  # Cauchy
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)
    # tabulated 97.5% points
    for df, t in ((3, 3.182446305284263), (4, 2.7764451051977987), (5, 2.570581835636314), (30, 2.0422724563012373)):
        assert t_quantile(0.975, df) == pytest.approx(t, rel=1e-9)
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile(0.975, 0)


def test_t_interval_three_seeds():
    diffs = [0.1, 0.3, 0.2]  # mean 0.2, sd 0.1
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    iv = t_interval(diffs)
    assert iv.mean == pytest.approx(0.2)
    assert (iv.lo, iv.hi) == pytest.approx((0.2 - half, 0.2 + half))
    assert not iv.excludes_zero()  # half = 0.248 > 0.2: three seeds give wide intervals
    assert t_interval([0.3, 0.4, 0.35]).excludes_zero()  # mean 0.35, half 4.30 * 0.05 / 1.73 = 0.124
    with pytest.raises(ValueError, match="at least 2 seeds"):
        t_interval([0.1])


def _record(layer, k, seed, rule, beta, **m):
    return {"key": run_key(layer, k, seed, rule, beta), "layer": layer, "k": k, "seed": seed, "rule": rule,
            "beta": beta, "d_sae": 4, **m}


def test_paired_differences_pair_by_seed():
    fvu_t, fvu_g = [0.30, 0.32, 0.31], [0.29, 0.30, 0.30]
    runs = []
    for s in range(3):
        base = dict(ce_recovered_zero=0.9, ce_recovered_mean=0.8, kl_spliced=0.1, dead_fraction=0.0, steering=0.1)
        runs.append(_record(0, 8, s, "topk", None, fvu=fvu_t[s], **base))
        runs.append(_record(0, 8, s, "gsae", 2.0, fvu=fvu_g[s], **base))
    runs.append(_record(0, 8, 3, "gsae", 2.0, fvu=0.0, **base))  # no TopK partner: left out
    (e,) = [e for e in paired({"runs": runs}, None) if e["metric"] == "fvu"]
    diffs = [-0.01, -0.02, -0.01]
    assert e["seeds"] == [0, 1, 2] and e["diff"] == pytest.approx(diffs)
    assert e["topk_mean"] == pytest.approx(0.31) and e["diff_mean"] == pytest.approx(-0.04 / 3)
    half = 4.302652729911275 * statistics.stdev(diffs) / math.sqrt(3)
    assert e["t95"] == pytest.approx([-0.04 / 3 - half, -0.04 / 3 + half])
    assert "boot95" not in e


def _rows_site():
    return {"n_tok": [2.0, 3.0, 1.0], "n_pred": [3.0, 3.0, 3.0], "ce_clean": [1.0, 2.0, 3.0],
            "ce_zero": [4.0, 6.0, 5.0], "ce_mean": [3.0, 4.0, 4.0]}


def test_row_metrics_are_ratios_of_weighted_sums():
    # three rows of 1-D activations: row 0 = [1, 3], row 1 = [0, 2, 4], row 2 = [5]
    xs = [[1.0, 3.0], [0.0, 2.0, 4.0], [5.0]]
    s = torch.tensor([sum(r) for r in xs], dtype=torch.float64)
    site = {**_rows_site(), "x_sq": [sum(v * v for v in r) for r in xs], "row_sum_gram": torch.outer(s, s).tolist()}
    sae = {"ce_spliced": [1.5, 3.0, 3.5], "kl": [0.3, 0.6, 0.9], "sq_err": [0.2, 0.4, 0.1], "never_fired": 1,
           "rare": {"2": [1]}, "steer": [0.2, 0.4], "steer_n": [2.0, 4.0]}
    w = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]], dtype=torch.float64)
    m = row_metrics(site, sae, 4, w, torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64))
    # resample 2 = rows (0, 0, 2): the metrics of that concatenated sample, computed directly
    for b, rows in ((0, [0, 1, 2]), (1, [0, 0, 2])):
        vals = [v for r in rows for v in xs[r]]
        mean = sum(vals) / len(vals)
        tv = sum((v - mean) ** 2 for v in vals)
        ce = {k: sum(site[k][r] for r in rows) for k in ("ce_clean", "ce_zero", "ce_mean")}
        spl = sum(sae["ce_spliced"][r] for r in rows)
        assert float(m["fvu"][b]) == pytest.approx(sum(sae["sq_err"][r] for r in rows) / tv)
        assert float(m["ce_recovered_zero"][b]) == pytest.approx((ce["ce_zero"] - spl) / (ce["ce_zero"] - ce["ce_clean"]))
        assert float(m["ce_recovered_mean"][b]) == pytest.approx((ce["ce_mean"] - spl) / (ce["ce_mean"] - ce["ce_clean"]))
        assert float(m["kl_spliced"][b]) == pytest.approx(sum(sae["kl"][r] for r in rows) / (3 * len(rows)))
    # latent 2 fires only in row 1: alive in the full sample, dead when row 1 is not drawn
    assert m["dead_fraction"].tolist() == pytest.approx([1 / 4, 2 / 4])
    assert m["steering"].tolist() == pytest.approx([0.6 / 6, 0.8 / 8])


def test_bootstrap_weights_are_resample_counts():
    w = bootstrap_weights(7, 50, seed=3)
    assert w.shape == (50, 7) and (w.sum(1) == 7).all() and (w == w.round()).all()
    assert torch.equal(w, bootstrap_weights(7, 50, seed=3))


def test_sae_eval_aggregates_match_evaluate_sae(tiny_neox):
    model = tiny_neox
    rows = random_rows(model, rows=5, n=12, seed=1)
    site = Site(1)
    sae = SAE(SAEConfig(d_in=site.d_in(model.cfg), d_sae=64, k=4), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    steer = SteerConfig(rows=3, n_latents=2)
    base = site_eval(model, site, rows, steer, batch_rows=2)
    ev = sae_eval(model, sae, base, steer, batch_rows=2)
    ones = torch.ones(1, 5, dtype=torch.float64)
    m = row_metrics(base.as_json(), ev.as_json(), 64, ones, torch.ones(1, 3, dtype=torch.float64))
    ref, density = evaluate_sae(model, sae, site, rows)
    for key in ("ce_recovered_zero", "ce_recovered_mean", "kl_spliced", "fvu", "dead_fraction"):
        assert float(m[key][0]) == pytest.approx(getattr(ref, key), rel=1e-6, abs=1e-9), key
    assert float(ev.l0.sum() / base.n_tok.sum()) == pytest.approx(ref.l0)
    torch.testing.assert_close(ev.density, density)
    # steering of the most frequent latent, computed directly: its direction through W_O, added at attn_out
    lat = int(density.argsort(descending=True, stable=True)[0])
    u = torch.einsum("hd,hdm->m", sae.W_dec[lat].detach().view(model.cfg.n_heads, -1), model.W_O[1])
    u = u / u.norm()
    r = rows[:3]
    keep = r != model.tokenizer.bos_token_id
    norms = []
    with model.hooks(fwd_hooks=[("blocks.1.hook_attn_out", lambda t, hook: norms.append(t[keep].norm(dim=-1)))]):
        clean = model(r).softmax(-1)
    scale = 2.0 * float(torch.cat(norms).mean())
    with model.hooks(fwd_hooks=[("blocks.1.hook_attn_out", lambda t, hook: t + scale * u * keep[..., None])]):
        steered = model(r).softmax(-1)
    top = (u @ model.W_U).topk(10).indices
    delta = (steered[:, :-1, top].sum(-1) - clean[:, :-1, top].sum(-1))[keep[:, :-1]].mean()
    one = sae_eval(model, sae, base, SteerConfig(rows=3, n_latents=1), batch_rows=2)
    assert float(one.steer.sum() / one.steer_n.sum()) == pytest.approx(float(delta), rel=1e-4, abs=1e-7)


def test_store_resumes_and_refuses_other_settings(tmp_path):
    settings = {"tokens": 100, "eval_rows": 4}
    rec = _record(0, 8, 0, "topk", None, fvu=0.3)
    Store(tmp_path, settings).add([rec], {rec["key"]: {"steer": []}}, {"0": {}})
    again = Store(tmp_path, settings)
    assert again.done(rec["key"]) and not again.done(run_key(0, 8, 1, "topk", None))
    with pytest.raises(ValueError, match=r"other settings \(tokens\)"):
        Store(tmp_path, {"tokens": 200, "eval_rows": 4})
    # a setting added since (the dataset) resumes an older study at its default, and refuses any other value
    assert Store(tmp_path, {**settings, "dataset": None}).done(rec["key"])
    with pytest.raises(ValueError, match=r"other settings \(dataset\)"):
        Store(tmp_path, {**settings, "dataset": "plays/"})
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_grid_pairs_each_beta_after_its_topk():
    assert _grid([8], [0, 1], [0.5, 2.0]) == [(0, 8, "topk", None), (0, 8, "gsae", 0.5), (0, 8, "gsae", 2.0),
                                              (1, 8, "topk", None), (1, 8, "gsae", 0.5), (1, 8, "gsae", 2.0)]


def test_paired_bootstrap_resamples_both_rules_alike():
    # g-SAE's KL is TopK's + 0.03 nats in every row (3 predictions per row): every paired resample gives +0.01,
    # while the unpaired KLs vary from resample to resample
    site = {**_rows_site(), "x_sq": [1.0, 2.0, 3.0], "row_sum_gram": torch.eye(3).tolist()}
    runs, saes = [], {}
    for seed, kl in ((0, [0.1, 0.5, 0.9]), (1, [0.3, 0.2, 0.7])):
        for rule, beta, shift in (("topk", None, 0.0), ("gsae", 1.0, 0.03)):
            rec = _record(0, 8, seed, rule, beta, ce_recovered_zero=0.9, ce_recovered_mean=0.8, kl_spliced=0.0,
                          fvu=0.2, dead_fraction=0.0, steering=0.1)
            runs.append(rec)
            saes[rec["key"]] = {"ce_spliced": [2.0, 3.0, 4.0], "kl": [v + shift for v in kl], "sq_err": [0.1] * 3,
                                "never_fired": 0, "rare": {"0": [seed]}, "steer": [0.1, 0.2], "steer_n": [1.0, 1.0]}
    entries = {e["metric"]: e for e in paired({"runs": runs}, {"sites": {"0": site}, "saes": saes}, n_boot=200)}
    assert entries["kl_spliced"]["boot95"] == pytest.approx([0.01, 0.01])
    assert entries["fvu"]["boot95"] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert "boot95" not in entries["dead_fraction"]  # biased under resampling: not bootstrapped


def test_eval_rows_held_out_of_the_dataset_for_another_model(tiny_neox, tmp_path):
    """``eval_from_dataset``: a seed-0 row shuffle of the dataset's rows, the first ``eval_rows`` held out, the
    rest trained on; disjoint, and together every row read."""
    from sae_lens_attn.data import token_rows
    from sae_lens_attn.frontends.gsae_study import StudyConfig, _study_rows
    from sae_lens_attn.models import token_policy

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 97} and more{i % 13}." for i in range(3000)))
    cfg = StudyConfig(tokens=512, batch_size=128, context_size=32, eval_rows=8, dataset=str(text), steer=SteerConfig(rows=4),
                      eval_from_dataset=True, layers=[1])
    eval_r, train_r = _study_rows(cfg, tiny_neox)
    every = token_rows(str(text), tiny_neox.tokenizer, 32, token_policy(tiny_neox))
    read = every[: eval_r.shape[0] + train_r.shape[0]]
    want = read[torch.randperm(read.shape[0], generator=torch.Generator().manual_seed(0))]
    assert eval_r.shape[0] == 8 and torch.equal(eval_r, want[:8]) and torch.equal(train_r, want[8:])
    assert train_r.shape[0] * 31 >= 512  # enough kept tokens for the budget (one structural token per row)
    with pytest.raises(ValueError, match="needs a dataset"):
        StudyConfig(eval_from_dataset=True)


def test_flags_give_the_nested_config_and_resume_the_committed_study(tmp_path):
    """The study's flags are generated from StudyConfig, OptimSettings and SteerConfig; the README's command
    for the committed study gives settings its results.json accepts (saved before the optimiser settings were
    nested: the fields it lacks count at OptimSettings' defaults, which that run used)."""
    import json
    import shutil
    from pathlib import Path

    from sae_lens_attn.frontends.gsae_study import _parser, config_from_args

    cfg = config_from_args(_parser().parse_args(["--tokens", "1000000", "--betas", "0.5,1,2,4"]))
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.dead_tokens, cfg.optim.decay_fraction) == (2e-3, 20, 100_000, 0.2)
    assert cfg.steer == SteerConfig() and cfg.eval_from_dataset is None and cfg.layers is None
    committed = Path(__file__).parents[1] / "benchmarks" / "gsae_study" / "results.json"
    shutil.copy(committed, tmp_path / "results.json")
    assert len(Store(tmp_path, cfg.settings()).results["runs"]) == len(json.loads(committed.read_text())["runs"])
    other = config_from_args(_parser().parse_args(["--warmup-steps", "50", "--steer-rows", "4", "--layers", "1,2",
                                                   "--eval-from-dataset", "--dataset", "x"]))
    assert (other.optim.warmup_steps, other.steer.rows, other.layers, other.eval_from_dataset) == (50, 4, [1, 2], True)
    with pytest.raises(InputError, match=r"other settings \(warmup_steps\)"):
        Store(tmp_path, config_from_args(_parser().parse_args(["--tokens", "1000000", "--warmup-steps", "50"])).settings())
