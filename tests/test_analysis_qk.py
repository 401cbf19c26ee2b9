"""QK attribution against Hugging Face's own queries and keys, on every family of the conformance matrix.

The reference is taken from the Hugging Face modules, never from the code under test: the attention input
(a forward pre-hook on the HF attention module), and the query and key states that module hands to its
attention function (``eager_attention_forward``, wrapped here): after its own projections, rotary embedding
(partial, GPT-J's pairs), query/key norms and OPT's folded scaling; with its scaling and softcap. Per term,
HF's own projection and rotation are applied to the term's attention-input part by running the HF model
with that part in place of the attention input at one position (q and k of a position read nothing else).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site, load_model
from sae_lens_attn.analysis import qk_attribution
from sae_lens_attn.analysis.induction import repeated_tokens
from sae_lens_attn.spec import UnsupportedModelError

from .families import D_HEAD, D_MODEL, FFN, N_HEADS, N_LAYERS, N_POS, NAMES, make_tokenizer
from .test_families import _case, _ref_pre

#: The HF module whose forward computes one layer's scores (BERT: the self-attention inside BertAttention).
ATTN = {"gpt2": "transformer.h.{i}.attn", "gptj": "transformer.h.{i}.attn", "gpt_neox": "gpt_neox.layers.{i}.attention",
        "opt": "model.decoder.layers.{i}.self_attn", "bert": "bert.encoder.layer.{i}.attention.self",
        "bert_no_head": "bert.encoder.layer.{i}.attention.self"}


#: The HF norm in front of each pre-norm family's attention.
LN1 = {"gpt2": "transformer.h.{i}.ln_1", "gptj": "transformer.h.{i}.ln_1", "gpt_neox": "gpt_neox.layers.{i}.input_layernorm",
       "opt": "model.decoder.layers.{i}.self_attn_layer_norm"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("qk_families"))


@pytest.fixture(params=NAMES)
def case(request, root):
    return _case(request.param, root)


def hf_qk(hf, name: str, tokens: torch.Tensor, layer: int = 1,
          replace: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """HF's attention input ``x`` [b, pos, d], query/key states ``q`` [b, H, pos, D], ``k`` [b, n_kv, pos, D]
    as passed to its attention function, ``scaling``, ``softcap`` and attention weights ``w``; ``replace``
    rewrites the attention input first."""
    attn = hf.get_submodule(ATTN.get(name, "model.layers.{i}.self_attn").format(i=layer))
    mod = sys.modules[type(attn).__module__]
    orig, rec = mod.eager_attention_forward, {}

    def capture(*args, **kwargs):
        out = orig(*args, **kwargs)
        if args[0] is attn:
            rec.update(q=args[1].detach().double(), k=args[2].detach().double(), scaling=kwargs.get("scaling"),
                       softcap=kwargs.get("softcap"), w=out[1].detach().double())
        return out

    def pre(module, args, kwargs):
        key = "hidden_states" in kwargs
        x = kwargs["hidden_states"] if key else args[0]
        rec["x"] = x.detach().double()
        if replace is None:
            return None
        new = replace(x)
        return (args, {**kwargs, "hidden_states": new}) if key else ((new,) + tuple(args[1:]), kwargs)

    handle = attn.register_forward_pre_hook(pre, with_kwargs=True)
    mod.eager_attention_forward = capture
    try:
        with torch.no_grad():
            hf(input_ids=tokens)
    finally:
        mod.eager_attention_forward = orig
        handle.remove()
    if rec.get("scaling") is None:  # GPT-2's eager function defaults to 1/sqrt(d_head)
        rec["scaling"] = rec["q"].shape[-1] ** -0.5
    return rec


def hf_score(ref: dict, head: int, kv: int, t: int, s: int, row: int = 0) -> float:
    return float(ref["scaling"] * ref["q"][row, head, t] @ ref["k"][row, kv, s])


def near(got: torch.Tensor, want: torch.Tensor, scale: float, rel: float = 1e-5) -> bool:
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    return float((got - want).abs().max()) <= rel * scale


def _positions(case) -> tuple[int, int]:
    n = case.tokens.shape[1]
    t = n - 2
    return (t, t + 1) if case.fam.encoder else (t, t - 3)  # inside Mistral's and Gemma-2's 6-token windows


def _per_term(case, res, row: torch.Tensor, ref: dict) -> None:
    """Each term's q (at the query position) and k (at the key position) equal HF's projection, rotation (and
    OPT's folded scaling) of that term's attention-input part: one HF run per side with the parts in place."""
    for inputs, vectors, p, which, h in ((res.query_inputs, res.query_vectors * res.scale, res.query_pos, "q", res.head),
                                         (res.key_inputs, res.key_vectors, res.key_pos, "k", res.kv_head)):
        n = inputs.shape[0]

        def put(x, inputs=inputs, p=p, n=n):
            x = x.expand(n + 1, -1, -1).clone()
            x[:n, p] = inputs.to(x.dtype)
            x[n, p] = 0.0
            return x

        got = hf_qk(case.hf, case.name, row.expand(n + 1, -1), replace=put)
        states = got[which][:, h, p] * (ref["scaling"] if which == "q" else 1.0)  # [n + 1, D]
        want = states[:n] - states[n]  # a part's own share: without the projection's bias ...
        bias = (res.query_names if which == "q" else res.key_names).index("bias")
        want[bias] = states[bias]  # ... which enters once, in the "bias" term (whose part is the norm's bias)
        assert near(vectors, want, float(want.sum(0).norm()) + float(want.norm(dim=-1).max()))


def hf_frozen_ln1(case, row: torch.Tensor, p: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Layer 1's input norm of a pre-norm family with its scale frozen at position p, from the HF module."""
    mod = case.hf.get_submodule(LN1.get(case.name, "model.layers.{i}.input_layernorm").format(i=1))
    rec = {}
    handle = mod.register_forward_pre_hook(lambda m, args: rec.update(h=args[0][0, p].detach().double()))
    try:
        with torch.no_grad():
            case.hf(input_ids=row)
    finally:
        handle.remove()
    h, w = rec["h"], mod.weight.detach().double()
    if isinstance(mod, torch.nn.LayerNorm):
        sigma = torch.sqrt(h.var(unbiased=False) + mod.eps)
        return lambda v: (v - v.mean(-1, keepdim=True)) / sigma * w
    eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
    w = w + 1.0 if case.name.startswith("gemma") else w  # Gemma's RMSNorm applies 1 + w
    return lambda v: v / torch.sqrt(h.pow(2).mean() + eps) * w


def _check_labels(case, res, row: torch.Tensor, sae: SAE | None = None) -> None:
    """Pre-norm families: the term named ``L0H{g}`` (or ``L0.z:{j}``) is that head's (feature's) output, through
    HF's o_proj and HF's norm frozen, at each side's position."""
    if case.spec.layout != "pre_norm":
        return
    z = case.hf_run(row, layer=0)["z"][0].double()  # [pos, H*D]
    W_O = case.o_weight(layer=0).double()  # [H, D, d_model]
    for names, inputs, p in ((res.query_names, res.query_inputs, res.query_pos), (res.key_names, res.key_inputs, res.key_pos)):
        ln = hf_frozen_ln1(case, row, p)
        want = {f"L0H{g}": ln(z[p].reshape(N_HEADS, D_HEAD)[g] @ W_O[g]) for g in range(N_HEADS)}
        if sae is not None:
            top = _ref_pre(sae, z[p].float()).topk(6)
            dec = sae.W_dec.detach().double().reshape(-1, N_HEADS, D_HEAD)
            want = {f"L0.z:{j}": ln(a * torch.einsum("hd,hdm->m", dec[j], W_O))
                    for j, a in zip(top.indices.tolist(), top.values.double().tolist()) if a > 0}
        for name, vec in want.items():
            assert near(inputs[names.index(name)], vec, float(vec.norm())), name


def test_qk_equals_hugging_face_scores_and_terms(case):
    row = case.tokens[:1]
    t, s = _positions(case)
    ref = hf_qk(case.hf, case.name, row)
    res = qk_attribution(case.model, row, 1, 1, t, s)
    kv = res.kv_head
    assert kv == 1 // (N_HEADS // case.fam.n_kv)  # grouped-query / multi-query heads share the key head
    want = hf_score(ref, 1, kv, t, s)
    size = ref["scaling"] * float(ref["q"][0, 1, t].norm() * ref["k"][0, kv, s].norm())
    assert abs(res.score - want) <= 1e-5 * size, (res.score, want)
    assert abs(float(res.pairs.sum()) - res.score) <= 1e-9 * size
    assert near(res.query_totals.sum(), res.score, size, 1e-9) and near(res.key_totals.sum(), res.score, size, 1e-9)
    # each side's terms add up to HF's own q and k, and their inputs to HF's attention input
    assert near(res.query_vectors.sum(0) * res.scale, ref["q"][0, 1, t] * ref["scaling"], float(ref["q"][0, 1, t].norm()))
    assert near(res.key_vectors.sum(0), ref["k"][0, kv, s], float(ref["k"][0, kv, s].norm()))
    for inputs, p in ((res.query_inputs, t), (res.key_inputs, s)):
        assert near(inputs.sum(0), ref["x"][0, p], float(ref["x"][0, p].abs().max()))
    _per_term(case, res, row, ref)
    _check_labels(case, res, row)
    # the reference reproduces HF's attention probabilities (through Gemma-2's softcap), and so does the result
    cap = ref["softcap"]
    raw = ref["scaling"] * ref["k"][0, kv] @ ref["q"][0, 1, t]
    capped = cap * torch.tanh(raw / cap) if cap else raw
    allowed = ref["w"][0, 1, t] > 0
    assert near(torch.softmax(capped[allowed], 0), ref["w"][0, 1, t][allowed], 1.0)
    assert res.softcap == cap and res.pattern[0] == pytest.approx(float(ref["w"][0, 1, t, s]), abs=1e-6)
    if res.model_score is not None:  # the bridge's own scores, after the softcap
        assert res.model_score == pytest.approx(float(capped[s]), abs=1e-5 * max(1.0, size))
    assert (res.model_score is None) == (case.name in ("gptj", "opt", "bert", "bert_no_head"))
    # the contrast: against the other source HF's head attends to most
    w = ref["w"][0, 1, t].clone()
    w[s] = -1
    s2 = int(w.argmax())
    assert res.contrast.contrast_pos == s2
    assert abs(res.contrast.score - (want - hf_score(ref, 1, kv, t, s2))) <= 1e-5 * size
    assert near(res.contrast.pairs.sum(), res.contrast.score, size, 1e-9)


def _layer0_saes() -> list[SAE]:
    out = []
    for seed, (kind, d_in) in enumerate((("z", N_HEADS * D_HEAD), ("attn_out", D_MODEL))):
        sae = SAE(SAEConfig(d_in=d_in, d_sae=48, k=6, metadata={"hook_name": Site(0, kind).hook_name}))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p, std in ((sae.W_enc, 0.5), (sae.W_dec, 0.3), (sae.b_enc, 0.1), (sae.b_dec, 0.1)):
                p.copy_(torch.randn(p.shape, generator=g) * std)
        out.append(sae)
    return out


def test_qk_features_split_the_layer_exactly(case):
    row = case.tokens[:1]
    t, s = _positions(case)
    saes = _layer0_saes()
    res = qk_attribution(case.model, row, 1, 1, t, s, saes=saes)
    ref = hf_qk(case.hf, case.name, row)
    hf0 = case.hf_run(row, layer=0)
    for view, sae, kind in zip(res.features, saes, ("z", "attn_out")):
        label = f"L0.{kind}"
        assert view.saes == (label,)
        size = abs(res.score) + float(res.pairs.abs().max())
        assert abs(view.score - res.score) <= 1e-6 * size and abs(float(view.pairs.sum()) - view.score) <= 1e-9 * size
        for names, p in ((view.query_names, t), (view.key_names, s)):
            top = _ref_pre(sae, hf0[kind][0, p]).topk(6)  # TopK written out, on HF's z / attention output
            want = sorted(top.indices[top.values > 0].tolist())
            got = sorted(int(n.split(":")[1]) for n in names if n.startswith(label + ":") and n.split(":")[1].isdigit())
            assert got == want
            assert not any(n.startswith("L0H") for n in names)  # the layer's heads are replaced
            assert ("L0.b_O" in names) == (kind == "z" and case.spec.has_b_O)  # attn_out already holds b_O
        _per_term(case, view, row, ref)
        if kind == "z":
            _check_labels(case, view, row, sae)
        if view.contrast is not None:
            assert abs(view.contrast.score - res.contrast.score) <= 1e-6 * size


def test_qk_refusals_name_the_case(case):
    row = case.tokens[:1]
    if not case.fam.encoder:
        with pytest.raises(ValueError, match="masked for query position 3 .causal"):
            qk_attribution(case.model, row, 1, 0, 3, 5)
    if case.name in ("mistral", "gemma2"):  # sliding windows of 6 tokens (Gemma-2: on even layers only)
        with pytest.raises(ValueError, match="outside its attention window"):
            qk_attribution(case.model, row, 0, 0, 14, 2)
    z, a = _layer0_saes()
    with pytest.raises(ValueError, match="both split L0H0"):
        qk_attribution(case.model, row, 1, 0, 4, 2, saes=[(z, a)])
    with pytest.raises(ValueError, match="not upstream of layer 0"):
        qk_attribution(case.model, row, 0, 0, 4, 2, saes=[z])


def _build_extra(name: str, path: str) -> str:
    """Tiny random models of families with query/key norms (outside the matrix), as tests/families.py builds."""
    import transformers as T

    common = dict(hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, intermediate_size=FFN,
                  max_position_embeddings=N_POS, num_key_value_heads=2)
    cfgs = {"qwen3": lambda v: T.Qwen3Config(vocab_size=v, head_dim=D_HEAD, **common),
            "olmo2": lambda v: T.Olmo2Config(vocab_size=v, **common),
            "gemma3_text": lambda v: T.Gemma3TextConfig(vocab_size=v, head_dim=D_HEAD, sliding_window=6,
                                                        query_pre_attn_scalar=D_HEAD, **common),
            "bloom": lambda v: T.BloomConfig(vocab_size=v, hidden_size=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS)}
    torch.manual_seed(0)
    tok = make_tokenizer("bpe")
    cfg = cfgs[name](len(tok.get_vocab()))
    cfg.bos_token_id = cfg.eos_token_id = tok.bos_token_id
    model = T.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # randomise norm weights: at 1 (0 for Gemma's 1 + w) they would hide a missed weight
        for pname, p in model.named_parameters():
            if "norm" in pname.lower() and pname.endswith("weight"):
                p.normal_(0.0 if name.startswith("gemma") else 1.0, 0.2)
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["qwen3", "olmo2", "gemma3_text"])
def test_qk_with_query_key_norms(name, tmp_path):
    """Per-head (Qwen3, Gemma 3) and whole-projection (OLMo 2) query/key RMSNorms, frozen: exact sums."""
    from transformers import AutoModelForCausalLM

    path = _build_extra(name, str(tmp_path / name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(path, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    row = torch.tensor([[model.tokenizer.bos_token_id] + list(range(10, 24))])
    ref = hf_qk(hf, name, row)
    res = qk_attribution(model, row, 1, 3, 13, 10, saes=_layer0_saes())
    want = hf_score(ref, 3, res.kv_head, 13, 10)
    size = ref["scaling"] * float(ref["q"][0, 3, 13].norm() * ref["k"][0, res.kv_head, 10].norm())
    assert res.kv_head == 1 and abs(res.score - want) <= 1e-5 * size
    assert near(res.query_vectors.sum(0) * res.scale, ref["q"][0, 3, 13] * ref["scaling"], float(ref["q"][0, 3, 13].norm()))
    assert near(res.key_vectors.sum(0), ref["k"][0, 1, 10], float(ref["k"][0, 1, 10].norm()))
    assert any("query/key norms frozen" in n for n in res.notes)
    for view in res.features:
        assert abs(view.score - want) <= 1e-5 * size


def test_qk_refuses_alibi_by_name(tmp_path):
    path = _build_extra("bloom", str(tmp_path / "bloom"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(path, device="cpu")
    with pytest.raises(UnsupportedModelError, match="not supported for bloom: ALiBi"):
        qk_attribution(model, "to be or not to be", 1, 0, 4, 2)


# ------------------------------------------------------------------------------------------ the embedded model

#: Induction study of the README ("QK attribution"): heads, rows of [BOS, r, r] with |r| = 50, query positions.
INDUCTION_HEADS, N_ROWS, LENGTH = (4, 7), 2, 50


def induction_shares(model, head: int) -> dict[str, list[float]]:
    rows = repeated_tokens(model, N_ROWS, LENGTH, seed=0)
    out: dict[str, list[float]] = {"key L0H2": [], "query L0H0+L0H1": [], "query embed": [], "key top": []}
    for r in range(N_ROWS):
        for t in range(LENGTH + 2, 2 * LENGTH + 1, 6):  # second copy; its copy target is t - LENGTH + 1
            res = qk_attribution(model, rows[r:r + 1], 1, head, t, t - LENGTH + 1, contrast_pos=None)
            key, query = res.shares("key"), res.shares("query")
            out["key L0H2"].append(key["L0H2"])
            out["query L0H0+L0H1"].append(query["L0H0"] + query["L0H1"])
            out["query embed"].append(query["embed"])
            out["key top"].append(float(res.top("key", 1)[0][0] == "L0H2"))
    return out


@pytest.mark.parametrize("head", INDUCTION_HEADS)
def test_induction_key_side_is_the_previous_token_head(default_model, head):
    """At the copy target, the induction head's score is carried on the key side by the previous-token head
    L0H2's output there (it wrote the previous token into that position) and on the query side by the heads
    that read the current token (L0H0 and L0H1 attend to the token itself), not by the raw embedding."""
    shares = {k: sum(v) / len(v) for k, v in induction_shares(default_model, head).items()}
    assert shares["key L0H2"] > 0.6, shares
    assert shares["key top"] >= 0.9, shares
    assert shares["query L0H0+L0H1"] > 0.5, shares
    assert abs(shares["query embed"]) < 0.05, shares


def test_dashboard_page_shows_the_top_heads_qk_attribution(tiny_neox, tmp_path):
    """A feature page: for the top example, its top head's QK attribution at its top source, as the API gives."""
    from sae_lens_attn.analysis.dashboard import feature_page
    from sae_lens_attn.analysis.dashboard_figures import example_dfa
    from sae_lens_attn.analysis.features import StatsConfig, feature_stats

    from .conftest import random_rows
    from .test_explorer import random_sae

    sae = random_sae(tiny_neox, Site(1), 24, 5)
    stats = feature_stats(tiny_neox, sae, random_rows(tiny_neox, 4, 16), cfg=StatsConfig(n_top=4, n_samples=8))
    f = int((stats.fire_count > 0).nonzero()[0, 0])
    page = feature_page(tiny_neox, sae, stats, f)
    first = example_dfa(tiny_neox, sae, Site(1), stats, f, stats.top_examples(f, 12))[0]
    head = int(first.by_head.argmax())
    source = int(first.by_source[head].argmax())
    res = qk_attribution(tiny_neox, torch.tensor([first.tokens]), 1, head, first.q, source)
    assert f"Why L1H{head} attends from {first.q} " in page and f"score {res.score:.4g} = the sum of all pairs" in page
    q, k, v = res.top_pairs(1)[0]
    assert f"<tr><td>{q}</td><td>{k}</td><td>{v:+.4g}</td></tr>" in page
    assert f"score difference {res.contrast.score:+.4g}" in page
