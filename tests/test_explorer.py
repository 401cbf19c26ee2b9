"""The explorer's session layer (no HTTP) against computations written here from the model's own cache and
the SAEs' weights, and against the analysis API: activations, top features, top heads, error terms, DFA,
RDFA, upstream heads and features, logits, steering. Several SAEs (hook_z and attn_out; TopK and ReLU) on
one model; an encoder (BERT). The HTTP API is tested in test_explorer_http.py."""

from __future__ import annotations

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site
from sae_lens_attn.analysis import dfa, dfa_by_source, head_shares, logit_effects, rdfa
from sae_lens_attn.frontends.explorer import ExplorerSession
from sae_lens_attn.hooked import attach_saes
from sae_lens_attn.spec import model_spec

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


def random_sae(model, site: Site, d_sae: int, seed: int, arch: str = "topk", k: int = 4) -> SAE:
    cfg = SAEConfig(d_in=site.d_in(model.cfg), d_sae=d_sae, k=k, architecture=arch,
                    reshape_activations="hook_z" if site.kind == "z" else "none",
                    metadata={"hook_name": site.hook_name, "hook_head_index": site.head, "prepend_bos": True})
    sae = SAE(cfg, init=False)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae.requires_grad_(False)


@pytest.fixture(scope="module")
def session(tiny_neox):
    saes = [random_sae(tiny_neox, Site(0), 24, 1), random_sae(tiny_neox, Site(1), 32, 2, arch="standard"),
            random_sae(tiny_neox, Site(1, "attn_out"), 20, 3, k=3)]
    return ExplorerSession(tiny_neox, saes)


def _close(a, b, tol=1e-5) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol))


def _by_hand(model, sae: SAE, site: Site, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [pos, d_in], every feature's activation [pos, d_sae]) from the model's own full cache."""
    _, cache = model.run_with_cache(tokens)
    act = cache[model_spec(model).capture_hook(site)][0]
    x = act.reshape(act.shape[0], -1) if site.kind == "z" else act
    return x, sae.encode(x)


def test_info_and_ids(session, tiny_neox):
    info = session.info()
    assert [s["id"] for s in info["saes"]] == ["L0.z", "L1.z", "L1.attn_out"]
    assert info["kind"] == "causal" and info["n_heads"] == 4 and info["token_policy"] == "[BOS] text"
    assert [s["architecture"] for s in info["saes"]] == ["topk", "standard", "topk"]
    two = ExplorerSession(tiny_neox, [random_sae(tiny_neox, Site(0), 8, 0), random_sae(tiny_neox, Site(0), 8, 1)])
    assert list(two.saes) == ["L0.z", "L0.z#2"]


def test_one_head_sae(tiny_neox):
    s = ExplorerSession(tiny_neox, [random_sae(tiny_neox, Site(1, head=2), 12, 5, k=2)])
    res = s.analyze(TEXT)["saes"][0]
    assert res["id"] == "L1.z.h2"
    assert all(h == 2 for row in res["heads"] for h in row) and any(res["heads"])  # only head 2 feeds it
    assert all(h == 2 for row in res["share_heads"][1:] for h in row)
    d = s.feature(TEXT, "L1.z.h2", res["features"][4][0], 4)
    assert d["top_head"] == 2 and all(v == 0 for h, v in enumerate(d["dfa_by_head"]) if h != 2)


def test_analyze_matches_the_model_and_the_api(session, tiny_neox):
    model = tiny_neox
    res = session.analyze(TEXT, top_k=5)
    ids = model_spec(model).tokens.encode(model.tokenizer, TEXT)
    assert [t["id"] for t in res["tokens"]] == ids and res["n_tokens"] == len(ids)
    assert res["tokens"][0]["structural"] and not any(t["structural"] for t in res["tokens"][1:])
    tokens = torch.tensor([ids])
    with attach_saes(model, [e.sae for e in session.saes.values()], use_error_term=True) as hooked:
        hooked_acts = hooked.features(tokens)
    for entry, got in zip(session.saes.values(), res["saes"]):
        sae, site = entry.sae, entry.site
        x, acts = _by_hand(model, sae, site, tokens)
        assert _close(acts[1:], hooked_acts[site][0, 1:])  # the hooked-SAE API agrees
        assert got["features"][0] == [] and got["error_fvu"][0] is None  # BOS: not an SAE input
        by_head = dfa(model, sae, TEXT, None, site).by_head[0]  # [pos, head, d_sae]
        shares = head_shares(sae, 4, site) if site.kind == "z" else None
        for pos in range(1, len(ids)):
            vals, idx = acts[pos].topk(5)
            n = int((vals > 0).sum())
            assert got["features"][pos] == idx[:n].tolist()
            assert _close(got["acts"][pos], vals[:n])
            assert got["heads"][pos] == [int(by_head[pos, :, f].argmax()) for f in idx[:n]]
            if shares is None:
                assert got["share_heads"][pos] is None
            else:
                assert got["share_heads"][pos] == [int(shares[f].argmax()) for f in idx[:n]]
            assert got["l0"][pos] == int((acts[pos] > 0).sum())
            assert _close(got["max_act"][pos], acts[pos].max())
            assert got["argmax"][pos] == (int(acts[pos].argmax()) if acts[pos].max() > 0 else None)
            err = x[pos] - sae.decode(acts[pos])
            assert _close(got["error_fvu"][pos], err.pow(2).sum() / x[pos].pow(2).sum())
        f = int(acts[1:].sum(0).argmax())
        col = session.activations(TEXT, entry.id, f)
        assert col["acts"][0] == 0.0 and _close(col["acts"][1:], acts[1:, f])


def test_feature_detail_matches_the_analysis_api(session, tiny_neox):
    model = tiny_neox
    an = session.analyze(TEXT)
    L1 = an["saes"][1]
    pos = 9
    f = L1["features"][pos][0]
    d = session.feature(TEXT, "L1.z", f, pos)
    sae, site = session.saes["L1.z"].sae, Site(1)
    ref = dfa_by_source(model, sae, TEXT, [f], site)
    assert _close(d["act"], L1["acts"][pos][0]) and _close(d["act"], ref.acts[0, pos, 0])
    assert _close(d["dfa_by_head"], ref.by_head[0, pos, :, 0])
    assert _close(d["dfa_by_source"], ref.by_source[0, pos, :, : pos + 1, 0])  # causal: nothing after pos
    assert len(d["sources"]) == pos + 1 and d["top_head"] == int(ref.by_head[0, pos, :, 0].argmax())
    assert _close(sum(d["dfa_by_head"]) + d["bias"], d["pre"])  # DFA sums to the pre-activation
    step = rdfa(model, sae, TEXT, f, pos, site)
    comps = {c["name"]: c["value"] for c in d["rdfa"]["components"]}
    assert comps.keys() == set(step.names)
    assert _close(comps["L0H2"], step.component("L0H2").sum())
    assert _close(sum(comps.values()) + d["rdfa"]["value_bias"], sum(d["dfa_by_head"]))
    h = d["top_head"]
    heads = {(r["layer"], r["head"]): r["value"] for r in d["upstream_heads"]["heads"]}
    for g in range(4):  # the upstream-head step splits the first step's head terms along head h
        assert _close(heads[(0, g)], step.component(f"L0H{g}")[h].sum())
    (up,) = d["upstream_features"]
    assert up["sae"] == "L0.z" and up["head"] == h
    assert _close(up["features_sum"] + up["error"] + up["bias"], up["total"])
    layer0 = sum(step.component(f"L0H{g}")[h].sum() for g in range(4)) + step.component("L0.b_O")[h].sum()
    assert _close(up["total"], layer0)
    assert _close(d["head_shares"], head_shares(sae, 4, site)[f])
    eff = logit_effects(model, sae, [f], site, k=10)
    assert [t["id"] for t in d["logits"]["top"]] == eff.top_tokens[0].tolist()
    assert _close([t["value"] for t in d["logits"]["bottom"]], eff.bottom_values[0])
    x, acts = _by_hand(model, sae, site, torch.tensor([[t["id"] for t in an["tokens"]]]))
    err = x[pos] - sae.decode(acts[pos])
    assert _close(d["error"]["fvu"], err.pow(2).sum() / x[pos].pow(2).sum())
    assert d["dashboard"] is None
    # an attn_out SAE: no head shares; layer 0 has no upstream heads
    d2 = session.feature(TEXT, "L1.attn_out", an["saes"][2]["features"][pos][0], pos)
    assert d2["head_shares"] is None and d2["upstream_features"][0]["sae"] == "L0.z"
    d0 = session.feature(TEXT, "L0.z", an["saes"][0]["features"][pos][0], pos)
    assert "layer 0" in d0["upstream_heads"]["refused"] and d0["upstream_features"] == []


def _greedy(model, tokens: torch.Tensor, n: int, steer_vec=None) -> list[int]:
    """Greedy decoding by full forward passes (no key/value cache), steering written here."""
    out = tokens
    for _ in range(n):
        fwd = [("blocks.1.attn.hook_z", _adder(out, steer_vec))] if steer_vec is not None else []
        with model.hooks(fwd_hooks=fwd):
            nxt = model(out)[0, -1].argmax()
        out = torch.cat([out, nxt.view(1, 1)], 1)
    return out[0, tokens.shape[1]:].tolist()


def _adder(tokens: torch.Tensor, vec: torch.Tensor):
    keep = tokens[0] != 0  # every text position; BOS (id 0) keeps its clean activation

    def hook(z, hook):
        return z + keep[None, :, None, None] * vec

    return hook


def test_steering_matches_a_hand_written_hook(session, tiny_neox):
    model = tiny_neox
    sae, f, coef = session.saes["L1.z"].sae, 5, 8.0
    res = session.steer(TEXT, "L1.z", f, coef, n_tokens=4, top=5)
    tokens = torch.tensor([model_spec(model).tokens.encode(model.tokenizer, TEXT)])
    vec = (coef * sae.W_dec[f]).reshape(4, 8)
    assert model.tokenizer.bos_token_id == 0
    clean = model(tokens)[0, -1].softmax(-1)
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", _adder(tokens, vec))]):
        steered = model(tokens)[0, -1].softmax(-1)
    assert [t["id"] for t in res["clean"]] == clean.topk(5).indices.tolist()
    assert _close([t["prob"] for t in res["steered"]], steered.topk(5).values, 1e-4)
    delta = steered - clean
    assert res["increased"][0]["id"] == int(delta.argmax()) and res["decreased"][0]["id"] == int(delta.argmin())
    assert _close(res["kl"], (clean * (clean.log() - steered.log())).sum(), 1e-4)
    assert res["continuation"]["clean_ids"] == _greedy(model, tokens, 4)
    assert res["continuation"]["steered_ids"] == _greedy(model, tokens, 4, vec)
    assert res["continuation"]["clean"] == model.tokenizer.decode(res["continuation"]["clean_ids"])


def test_refusals_name_the_problem(session):
    with pytest.raises(ValueError, match="reads at most 64: shorten it"):
        session.analyze("word " * 100)
    with pytest.raises(ValueError, match="no text tokens"):
        session.analyze("")
    with pytest.raises(KeyError, match="loaded: L0.z, L1.z, L1.attn_out"):
        session.activations(TEXT, "L7.z", 0)
    with pytest.raises(ValueError, match="outside L1.z's features 0..31"):
        session.feature(TEXT, "L1.z", 32, 3)
    with pytest.raises(ValueError, match="outside the prompt"):
        session.feature(TEXT, "L1.z", 3, 500)
    with pytest.raises(ValueError, match="top_k must be"):
        session.analyze(TEXT, top_k=0)
    with pytest.raises(ValueError, match="finite"):
        session.steer(TEXT, "L1.z", 3, float("nan"))


def test_prompt_cache_is_bounded(tiny_neox):
    s = ExplorerSession(tiny_neox, [random_sae(tiny_neox, Site(1), 8, 0)], cache_prompts=2)
    for t in ("one", "two", "three"):
        s.analyze(t)
    assert list(s._prompts) == ["two", "three"]
    assert s.prompt("three") is s.prompt("three")


def test_encoder_family(tmp_path):
    from sae_lens_attn import load_model

    from .families import build

    model = load_model(build("bert", tmp_path / "bert"), device="cpu")
    sae = random_sae(model, Site(1), 16, 4)
    s = ExplorerSession(model, [sae])
    text = "to be or not to be"
    res = s.analyze(text)
    toks = res["tokens"]
    assert toks[0]["structural"] and toks[-1]["structural"] and toks[0]["text"] == "[CLS]"
    assert res["saes"][0]["features"][-1] == []
    pos = 2
    f = res["saes"][0]["features"][pos][0]
    d = s.feature(text, "L1.z", f, pos)
    n = len(toks)
    assert len(d["sources"]) == n  # bidirectional: every position is a source
    ref = dfa_by_source(model, sae, text, [f], Site(1))
    assert _close(d["dfa_by_source"], ref.by_source[0, pos, :, :, 0])
    assert "encoder" in d["logits"]["refused"]
    assert "components" in d["rdfa"]  # post-norm RDFA is exact
    with pytest.raises(ValueError, match="encoder: it has no next token"):
        s.steer(text, "L1.z", f, 1.0)


def test_grouped_query_family_without_output_bias(tmp_path):
    """Llama with 2 key/value heads for 4 query heads and no b_O: the explorer's DFA (by head, by source)
    equals the analysis API's, sums to the pre-activation, and steering runs (a causal LM)."""
    from sae_lens_attn import load_model

    from .families import build

    model = load_model(build("llama", tmp_path / "llama"), device="cpu")
    spec = model_spec(model)
    assert spec.n_kv_heads < spec.n_heads and not spec.has_b_O
    saes = [random_sae(model, Site(0), 16, 5), random_sae(model, Site(1, "attn_out"), 16, 6, k=3)]
    s = ExplorerSession(model, saes)
    res = s.analyze(TEXT)
    pos = 6
    for entry, site in zip(res["saes"], (Site(0), Site(1, "attn_out"))):
        f = entry["features"][pos][0]
        d = s.feature(TEXT, entry["id"], f, pos)
        ref = dfa_by_source(model, s.saes[entry["id"]].sae, TEXT, [f], site)
        assert _close(d["act"], ref.acts[0, pos, 0])
        assert _close(d["dfa_by_head"], ref.by_head[0, pos, :, 0])
        assert _close(d["dfa_by_source"], ref.by_source[0, pos, :, : pos + 1, 0])
        assert _close(sum(d["dfa_by_head"]) + d["bias"], d["pre"])
    st = s.steer(TEXT, res["saes"][1]["id"], res["saes"][1]["features"][pos][0], 2.0, n_tokens=2, top=3)
    assert len(st["continuation"]["steered_ids"]) == 2 and st["kl"] >= 0
