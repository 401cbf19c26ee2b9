"""Per-head activation patching, path patching and the IOI head scores, each against a computation written
here with plain hooks on a tiny grouped-query Llama (4 query heads, 2 key/value heads) and the embedded model."""

from __future__ import annotations

import pytest
import torch

from sae_lens_attn import load_model
from sae_lens_attn.analysis.ioi import corrupt_ioi, logit_diff, make_ioi
from sae_lens_attn.analysis.ioi_heads import ioi_head_scores
from sae_lens_attn.analysis.patching import head_patching, path_patching, top_heads
from sae_lens_attn.errors import InputError
from tests.families import build


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_model(build("llama", tmp_path_factory.mktemp("llama_gqa")), device="cpu")


@pytest.fixture(scope="module")
def ioi(llama):
    data = make_ioi(llama, n=6, seed=0)
    return data, corrupt_ioi(llama, data, seed=1)


def _metric(data):
    return lambda lg: logit_diff(lg, data, per_prompt=True)


def _ld(model, tokens, data, hooks=()):
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        return float(logit_diff(model(tokens, return_type="logits"), data))


def _z(model, tokens, layer):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == f"blocks.{layer}.attn.hook_z")
    return cache[f"blocks.{layer}.attn.hook_z"]


def test_head_patching_matches_one_hook_per_head(llama, ioi):
    data, corr = ioi
    end = data.positions["end"]
    r = head_patching(llama, data.tokens, corr.tokens, _metric(data), positions=end)
    clean, corrupted = _ld(llama, data.tokens, data), _ld(llama, corr.tokens, data)
    assert r.clean_metric == pytest.approx(clean, abs=1e-5) and r.corrupted_metric == pytest.approx(corrupted, abs=1e-5)
    for layer, head in [(0, 1), (1, 3)]:
        zc = _z(llama, corr.tokens, layer)

        def hook(z, hook, head=head, zc=zc):
            z = z.clone()
            z[torch.arange(len(data)), end, head] = zc[torch.arange(len(data)), end, head]
            return z

        m = _ld(llama, data.tokens, data, [(f"blocks.{layer}.attn.hook_z", hook)])
        assert r.patched[layer, head] == pytest.approx(m, abs=1e-4)
        assert r.effect[layer, head] == pytest.approx((m - clean) / (clean - corrupted), abs=1e-4)
    # top_heads orders by the signed effect
    top = top_heads(r.effect, 3)
    assert [e for *_, e in top] == sorted(e for *_, e in top)


def test_patching_refuses_a_corruption_without_a_gap_and_a_shape_mismatch(llama, ioi):
    data, _ = ioi
    with pytest.raises(InputError, match="no gap"):
        head_patching(llama, data.tokens, data.tokens.clone(), _metric(data))
    with pytest.raises(InputError, match="one shape"):
        head_patching(llama, data.tokens, data.tokens[:, :-1], _metric(data))


def test_path_patching_into_receiver_outputs_matches_a_hand_written_two_step(llama, ioi):
    data, corr = ioi
    sender, receiver = (0, 2), (1, 0)
    r = path_patching(llama, data.tokens, corr.tokens, _metric(data), receivers=[receiver], receiver_input="z",
                      senders=[sender])
    z0c, z0x = _z(llama, data.tokens, 0), _z(llama, corr.tokens, 0)
    z1c = _z(llama, data.tokens, 1)
    got = {}

    def layer0(z, hook):  # every layer-0 head frozen clean except the sender, patched
        new = z0c.clone()
        new[:, :, sender[1]] = z0x[:, :, sender[1]]
        return new

    def layer1(z, hook):  # layer 1 frozen clean except the receiver, recomputed
        got["z"] = z[:, :, receiver[1]].clone()
        new = z1c.clone()
        new[:, :, receiver[1]] = z[:, :, receiver[1]]
        return new

    _ld(llama, data.tokens, data, [("blocks.0.attn.hook_z", layer0), ("blocks.1.attn.hook_z", layer1)])

    def put(z, hook):
        z = z.clone()
        z[:, :, receiver[1]] = got["z"]
        return z

    m = _ld(llama, data.tokens, data, [("blocks.1.attn.hook_z", put)])
    gap = r.clean_metric - r.corrupted_metric
    assert r.effect[sender] == pytest.approx((m - r.clean_metric) / gap, abs=1e-4)
    assert torch.isnan(r.effect[1]).all() and r.patched_heads == [receiver]


def test_path_patching_through_keys_patches_the_whole_kv_group(llama, ioi):
    data, corr = ioi
    r = path_patching(llama, data.tokens, corr.tokens, _metric(data), receivers=[(1, 1)], receiver_input="k",
                      senders=[(0, 0)])
    assert r.patched_heads == [(1, 0), (1, 1)]  # 4 query heads share 2 key/value heads: group 0 is heads 0, 1
    q = path_patching(llama, data.tokens, corr.tokens, _metric(data), receivers=[(1, 1)], receiver_input="q",
                      senders=[(0, 0)])
    assert q.patched_heads == [(1, 1)]
    with pytest.raises(InputError, match="not before every receiver"):
        path_patching(llama, data.tokens, corr.tokens, _metric(data), receivers=[(1, 1)], senders=[(1, 0)])


def test_ioi_head_dla_completes_the_logit_difference(llama, ioi):
    """Sum of the heads' DLA plus everything else the residual stream holds (embeddings, MLPs, W_O biases),
    read through the frozen final norm, is the logit difference."""
    data, _ = ioi
    s = ioi_head_scores(llama, data)
    n = llama.cfg.n_layers
    names = {"blocks.0.hook_resid_pre", "ln_final.hook_scale"} | {f"blocks.{L}.hook_mlp_out" for L in range(n)}
    with torch.no_grad():
        logits, cache = llama.run_with_cache(data.tokens, names_filter=lambda x: x in names)
    idx, end = torch.arange(len(data)), data.positions["end"]
    rest = cache["blocks.0.hook_resid_pre"][idx, end].clone()
    for L in range(n):
        rest += cache[f"blocks.{L}.hook_mlp_out"][idx, end]
        b_O = llama.blocks[L].attn.b_O
        if b_O is not None:
            rest += b_O
    w = llama.ln_final.weight.detach()
    scale = cache["ln_final.hook_scale"][idx, end].reshape(len(data), -1)[:, :1]
    read = (llama.W_U[:, data.io_tokens] - llama.W_U[:, data.s_tokens]).T * w
    rest_dla = ((rest / scale) * read).sum(-1).mean()
    ld = logit_diff(logits, data)
    assert float(s.dla.sum() + rest_dla) == pytest.approx(float(ld), abs=1e-3)
    assert s.logit_diff == pytest.approx(float(ld), abs=1e-5)
    torch.testing.assert_close(s.dla, s.dla_io - s.dla_s)
    with torch.no_grad():
        _, pc = llama.run_with_cache(data.tokens, names_filter=lambda x: x == "blocks.1.attn.hook_pattern")
    pat = pc["blocks.1.attn.hook_pattern"]
    io = data.positions["IO"]
    assert float(s.end_to_io[1, 3]) == pytest.approx(float(pat[idx, 3, end, io].mean()), abs=1e-6)
    s1, s2 = data.positions["S1"], data.positions["S2"]
    assert float(s.s2_to_s1_next[1, 2]) == pytest.approx(float(pat[idx, 2, s2, s1 + 1].mean()), abs=1e-6)


def test_feature_circuit_check_against_hand_written_patches(llama, ioi):
    from sae_lens_attn.analysis.circuits import edit_rows, run_spliced
    from sae_lens_attn.analysis.feature_circuit import feature_circuit_check
    from sae_lens_attn.sae import SAE, SAEConfig
    from sae_lens_attn.sites import Site

    data, corr = ioi
    site = Site(1)
    sae = SAE(SAEConfig(d_in=site.d_in(llama.cfg), d_sae=64, k=12, metadata={"hook_name": site.hook_name}))
    end = data.positions["end"]
    metric = lambda lg: logit_diff(lg, data)  # noqa: E731
    r = feature_circuit_check(llama, sae, data.tokens, corr.tokens, metric, end, n=3, n_rank=5)
    gap = r.clean_metric - r.corrupted_metric
    rows = torch.arange(len(data))
    zc = _z(llama, corr.tokens, 1)

    def whole(z, hook):  # every head of layer 1 patched at the last token
        z = z.clone()
        z[rows, end] = zc[rows, end]
        return z

    m = _ld(llama, data.tokens, data, [("blocks.1.attn.hook_z", whole)])
    assert r.layer_share == pytest.approx((r.clean_metric - m) / gap, abs=1e-4)
    corr_f = run_spliced(llama, sae, corr.tokens).features
    mask = torch.zeros_like(data.tokens, dtype=torch.bool)
    mask[rows, end] = True
    lg = run_spliced(llama, sae, data.tokens, edit=edit_rows(r.top, mask, data.tokens, corr_f)).logits
    assert r.top_share == pytest.approx((r.clean_metric - float(metric(lg))) / gap, abs=1e-4)
    assert r.top.shape == (len(data), 3) and r.ranked.shape == (5,) and -1 <= r.spearman <= 1
    assert r.predicted.tolist() == sorted(r.predicted.tolist())  # most negative summed attribution first


def test_ioi_feature_sources_against_the_attention_pattern_and_values(llama, ioi):
    """DFA of a feature at the last token split by head and source, computed here from the cached pattern
    and values (a key/value head repeated for its query heads) and the encoder's rows for each head."""
    from sae_lens_attn.analysis.ioi_heads import ioi_feature_sources
    from sae_lens_attn.sae import SAE, SAEConfig
    from sae_lens_attn.sites import Site

    data, _ = ioi
    site, f, rows = Site(1), 5, [0, 2, 3]
    sae = SAE(SAEConfig(d_in=site.d_in(llama.cfg), d_sae=16, k=4, metadata={"hook_name": site.hook_name}))
    r = ioi_feature_sources(llama, sae, data, f, rows)
    names = ("blocks.1.attn.hook_pattern", "blocks.1.attn.hook_v")
    with torch.no_grad():
        _, cache = llama.run_with_cache(data.tokens[rows], names_filter=lambda n: n in names)
    n_heads, d_head = llama.cfg.n_heads, llama.cfg.d_head
    v = cache["blocks.1.attn.hook_v"]
    v = v.repeat_interleave(n_heads // v.shape[2], dim=2)  # [b, k, head, d_head]
    w = sae.W_enc[:, f].detach().reshape(n_heads, d_head)
    by_source = torch.einsum("bhk,bkhd,hd->bhk", cache["blocks.1.attn.hook_pattern"][torch.arange(3), :, data.positions["end"][rows]], v, w)
    by_head = by_source.sum(-1)  # [b, head]
    pos = by_head.clamp_min(0).sum(0)
    h = int(pos.argmax())
    assert r.head == h and r.head_share == pytest.approx(float(pos[h] / pos.sum()), rel=1e-4)
    for name in ("IO", "S1", "S2"):
        at = by_source[torch.arange(3), h, data.positions[name][rows]].sum() / by_head[:, h].sum()
        assert r.sources[name] == pytest.approx(float(at), rel=1e-4, abs=1e-6)
