"""The conformance matrix: every model family, against computations written here from the Hugging Face
modules themselves (never from the bridge's hooks).

For each family of :mod:`tests.families`: ``hook_z`` (all heads, one head) and ``attn_out`` equal the input
and output of the HF attention output projection; DFA by head and by source position on a hook_z and an
attn_out SAE equal the formulas evaluated on HF's own z, value vectors and attention probabilities (1e-5
relative); gradients at both sites equal autograd through the HF model for the model kind's own loss; the
clean, zero-ablated and spliced losses of ``evaluate_sae`` equal a hand splice into the HF model; RDFA's
parts add up to the DFA by source; and a few training steps, ``analyze`` and a dashboard page run.
"""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from sae_lens_attn import SAE, SAEConfig, Site, load_model
from sae_lens_attn.objective import loss_input
from sae_lens_attn.spec import model_spec

from .families import D_HEAD, D_MODEL, FAMILIES, N_HEADS, NAMES, build, reference_model

REL = 1e-5


def close(got: torch.Tensor, want: torch.Tensor, rel: float = REL) -> bool:
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    return float((got - want).abs().max()) <= rel * max(1.0, float(want.abs().max()))


@functools.cache
def _dir(name: str, root: str) -> str:
    return build(name, f"{root}/{name}")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("families"))


class Case:
    """One family: the bridge, the reference HF model, prompts and two random SAEs (layer 1)."""

    def __init__(self, name: str, root: str):
        self.name, self.fam = name, FAMILIES[name]
        self.path = _dir(name, root)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = load_model(self.path, device="cpu")
        self.hf = reference_model(self.fam, self.path)
        self.spec = model_spec(self.model)
        g = torch.Generator().manual_seed(1)
        body = torch.randint(5, min(250, int(self.model.cfg.d_vocab)), (2, 14), generator=g)
        self.tokens = torch.stack([torch.tensor(self.spec.tokens.wrap(r.tolist())) for r in body])
        self.saes = {kind: self._sae(kind, d_in) for kind, d_in in (("z", N_HEADS * D_HEAD), ("attn_out", D_MODEL))}

    def _sae(self, kind: str, d_in: int) -> SAE:
        sae = SAE(SAEConfig(d_in=d_in, d_sae=48, k=6, metadata={"hook_name": Site(1, kind).hook_name,
                                                                  "prepend_bos": self.spec.tokens.prepend_bos}))
        with torch.no_grad():
            sae.W_enc.normal_(0, 0.5)
            sae.b_enc.normal_(0, 0.1)
            sae.b_dec.normal_(0, 0.1)
        return sae

    # --- reference pieces, from the HF modules ------------------------------------------------------
    def module(self, template: str, layer: int):
        return self.hf.get_submodule(template.format(i=layer))

    def hf_run(self, tokens, edit_z=None, edit_out=None, layer: int = 1, want_grad: bool = False):
        """Logits (and z / attn_out / v / attention probs of ``layer``) of the HF model; ``edit_*`` replace the
        output projection's input / output."""
        rec: dict = {}
        o = self.module(self.fam.o_proj, layer)

        def pre(mod, args):
            z = args[0]
            if want_grad:
                rec["dz"] = torch.zeros_like(z, requires_grad=True)
                z = z + rec["dz"]
            rec["z"] = z.detach()
            return (edit_z(z),) + tuple(args[1:]) if edit_z is not None else ((z,) + tuple(args[1:]) if want_grad else None)

        def post(mod, args, out):
            if want_grad:
                rec["dout"] = torch.zeros_like(out, requires_grad=True)
                out = out + rec["dout"]
            rec["attn_out"] = out.detach()
            return edit_out(out) if edit_out is not None else (out if want_grad else None)

        kind, vpath = self.fam.values.split(":")
        vmod = self.module(vpath, layer)

        def vhook(mod, args, out):
            rec["v_raw"] = out.detach()

        hs = [o.register_forward_pre_hook(pre), o.register_forward_hook(post), vmod.register_forward_hook(vhook)]
        try:
            with torch.set_grad_enabled(want_grad):
                res = self.hf(input_ids=tokens, output_attentions=True)
        finally:
            for h in hs:
                h.remove()
        rec["logits"] = res.logits
        rec["attn"] = res.attentions[layer].detach()
        rec["v"] = self._values(kind, rec["v_raw"])
        return rec

    def _values(self, kind: str, raw: torch.Tensor) -> torch.Tensor:
        """[b, pos, n_kv, d_head] value vectors from the value projection's output."""
        b, p, _ = raw.shape
        if kind == "fused_gpt2":
            return raw[..., 2 * D_MODEL:].reshape(b, p, N_HEADS, D_HEAD)
        if kind == "fused_neox":
            return raw.reshape(b, p, N_HEADS, 3 * D_HEAD)[..., 2 * D_HEAD:]
        if kind == "fused_phi3":
            kv = self.fam.n_kv * D_HEAD
            return raw[..., N_HEADS * D_HEAD + kv:].reshape(b, p, self.fam.n_kv, D_HEAD)
        return raw.reshape(b, p, self.fam.n_kv, D_HEAD)

    def o_weight(self, layer: int = 1) -> torch.Tensor:
        """[n_heads, d_head, d_model] from the HF output projection's weight."""
        w = self.module(self.fam.o_proj, layer).weight.detach()
        w = w if self.fam.conv1d else w.T  # -> [in = heads*d_head, out = d_model]
        return w.reshape(N_HEADS, D_HEAD, D_MODEL)

    def o_bias(self, layer: int = 1) -> torch.Tensor:
        b = self.module(self.fam.o_proj, layer).bias
        return b.detach() if b is not None else torch.zeros(D_MODEL)


@functools.cache
def _case(name: str, root: str) -> Case:
    return Case(name, root)


@pytest.fixture(params=NAMES)
def case(request, root) -> Case:
    return _case(request.param, root)


def _ref_pre(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    return (x - sae.b_dec.detach()) @ sae.W_enc.detach() + sae.b_enc.detach()


def _ref_recon(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """TopK written out: keep the k largest pre-activations (ReLU'd), decode."""
    pre = _ref_pre(sae, x)
    top = pre.topk(sae.cfg.k, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return acts @ sae.W_dec.detach() + sae.b_dec.detach()


# ------------------------------------------------------------------------------------------------ sites


def test_sites_equal_the_output_projection(case):
    from sae_lens_attn.activations import harvest

    ref = case.hf_run(case.tokens)
    sites = [Site(1), Site(1, head=2), Site(1, "attn_out")]
    h = harvest(case.model, case.tokens, sites, drop_bos=False)
    assert close(h.acts[Site(1)], ref["z"])
    assert close(h.acts[Site(1, head=2)], ref["z"][..., 2 * D_HEAD: 3 * D_HEAD])
    assert close(h.acts[Site(1, "attn_out")], ref["attn_out"]), "attn_out must be the attention block's own output"
    # z_h = sum_s A_h[t, s] v_h[s] with key/value heads repeated to their query heads (HF's repeat_kv)
    v = ref["v"].repeat_interleave(N_HEADS // case.fam.n_kv, dim=2)
    z = torch.einsum("bhqk,bkhd->bqhd", ref["attn"], v).flatten(2)
    assert close(ref["z"], z)


def test_the_description_matches_the_family(case):
    s = case.spec
    assert (s.n_heads, s.n_kv_heads, s.kind) == (N_HEADS, case.fam.n_kv, "encoder" if case.fam.encoder else "causal")
    assert s.has_b_O == (case.module(case.fam.o_proj, 0).bias is not None)
    want_layout = {"gemma2": "sandwich", "bert": "post_norm", "bert_no_head": "post_norm"}.get(case.name, "pre_norm")
    assert s.layout == want_layout
    assert s.bridge_attn_out == {"sandwich": "post_attn_norm", "post_norm": "post_ln_residual"}.get(want_layout, "attn_output")
    assert bool(s.new_weights) == (case.name == "bert_no_head")


# -------------------------------------------------------------------------------------------------- DFA


@pytest.mark.parametrize("kind", ["z", "attn_out"])
def test_dfa_by_head_and_source(case, kind):
    from sae_lens_attn.analysis import dfa, dfa_by_source

    sae = case.saes[kind]
    ref = case.hf_run(case.tokens)
    W = sae.W_enc.detach()
    if kind == "z":
        e = W.reshape(N_HEADS, D_HEAD, -1)  # [head, d_head, f]
        bias = sae.b_enc.detach() - sae.b_dec.detach() @ W
        x = ref["z"]
    else:
        e = torch.einsum("hdm,mf->hdf", case.o_weight(), W)
        bias = sae.b_enc.detach() - sae.b_dec.detach() @ W + case.o_bias() @ W
        x = ref["attn_out"]
    z = ref["z"].reshape(*ref["z"].shape[:2], N_HEADS, D_HEAD)
    by_head = torch.einsum("bphd,hdf->bphf", z, e)
    feats = [0, 5, 17]
    res = dfa(case.model, sae, case.tokens, site=Site(1, kind))
    assert close(res.by_head, by_head)
    assert close(res.by_head.sum(2) + res.bias, _ref_pre(sae, x))
    assert close(res.bias, bias)
    v = ref["v"].repeat_interleave(N_HEADS // case.fam.n_kv, dim=2)
    by_src = torch.einsum("bhqk,bkhd,hdf->bqhkf", ref["attn"], v, e[..., feats])
    src = dfa_by_source(case.model, sae, case.tokens, feats, Site(1, kind))
    assert close(src.by_source, by_src)
    assert close(src.by_source.sum(3), by_head[..., feats])


@pytest.mark.parametrize("kind", ["z", "attn_out"])
def test_rdfa_parts_add_up(case, kind):
    from sae_lens_attn.analysis import dfa_by_source, rdfa, rdfa_upstream_heads

    sae = case.saes[kind]
    row = case.tokens[:1]
    q = row.shape[1] - 2
    src = dfa_by_source(case.model, sae, row, [3], Site(1, kind))
    step = rdfa(case.model, sae, row, 3, q, Site(1, kind))
    assert close(step.total, src.by_source[0, q, :, :, 0])
    assert close(step.contributions.sum(0) + step.value_bias, step.total)
    up = rdfa_upstream_heads(case.model, sae, row, 3, q, head=1, site=Site(1, kind))
    for g in range(N_HEADS):
        assert close(up.by_source[0, g].sum(-1), step.component(f"L0H{g}")[1])


# ---------------------------------------------------------------------------------------- losses, grads


def _ref_losses(case: Case, kind: str) -> dict[str, float]:
    inp = loss_input(case.tokens, case.spec)
    keep = case.spec.tokens.keep(inp.tokens)[..., None]
    sae = case.saes[kind]

    def ce(rec) -> float:
        lg = rec["logits"].double()
        return float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), inp.targets.reshape(-1), ignore_index=-100))

    if kind == "z":
        run = lambda f: case.hf_run(inp.tokens, edit_z=lambda z: torch.where(keep, f(z), z))  # noqa: E731
    else:
        run = lambda f: case.hf_run(inp.tokens, edit_out=lambda o: torch.where(keep, f(o), o))  # noqa: E731
    return {"clean": ce(case.hf_run(inp.tokens)), "zero": ce(run(torch.zeros_like)),
            "spliced": ce(run(lambda x: _ref_recon(sae, x)))}


@pytest.mark.parametrize("kind", ["z", "attn_out"])
def test_losses_of_the_right_kind(case, kind):
    from sae_lens_attn.evals import evaluate_sae

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m, _ = evaluate_sae(case.model, case.saes[kind], Site(1, kind), case.tokens)
    assert m.loss_kind.startswith("masked-token" if case.fam.encoder else "next-token")
    if case.name == "bert_no_head":  # its LM head is random: CE refused, reconstruction still given
        assert m.ce_clean is None and m.ce_recovered_zero is None and m.kl_spliced is None
        assert "newly initialised" in m.lm_note and any("newly initialised" in str(w.message) for w in caught)
        assert 0 < m.fvu
        return
    ref = _ref_losses(case, kind)
    for key, got in (("clean", m.ce_clean), ("zero", m.ce_zero_ablated), ("spliced", m.ce_spliced)):
        assert abs(got - ref[key]) <= REL * max(1.0, abs(ref[key])), (key, got, ref[key])


def test_gradients_at_sites(case):
    from sae_lens_attn.activations import harvest

    sites = [Site(1), Site(1, "attn_out")]
    if case.name == "bert_no_head":
        with pytest.raises(ValueError, match="newly initialised"):
            harvest(case.model, case.tokens, sites, with_grad=True)
        return
    inp = loss_input(case.tokens, case.spec)
    rec = case.hf_run(inp.tokens, want_grad=True)
    lg = rec["logits"].float()
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), inp.targets.reshape(-1), ignore_index=-100, reduction="sum")
    dz, dout = torch.autograd.grad(loss, [rec["dz"], rec["dout"]])
    h = harvest(case.model, case.tokens, sites, with_grad=True, drop_bos=False)
    assert close(h.acts[Site(1)], rec["z"])  # encoders: activations of the masked input
    assert close(h.grads[Site(1)], dz, 1e-4)
    assert close(h.grads[Site(1, "attn_out")], dout, 1e-4)


# --------------------------------------------------------------------------------------------- end to end


def test_train_analyze_dashboard(case, tmp_path):
    from sae_lens_attn.frontends.cli import main
    from sae_lens_attn.training import TrainConfig, train

    text = tmp_path / "text.txt"
    text.write_text("\n".join(["my lord, the question is whether to be or not to be."] * 60))
    site = "attn_out" if case.name in ("gemma2", "bert", "llama") else "z"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train(TrainConfig(model=case.path, dataset=str(text), layers="1", site=site, k=4, d_sae=32,
                                tokens=256, batch_size=64, warmup_steps=1, context_size=16, eval_rows=4,
                                checkpoint_every=0, progress=False, out_dir=str(tmp_path / "run")), log=lambda *a: None)
    (m,) = res.metrics
    assert 0 < m.l0 <= 4 + 1e-6 and 0 < m.fvu < 100  # smoke: exactness is tested above
    assert (m.ce_clean is None) == (case.name == "bert_no_head")
    cfg = json.loads((tmp_path / "run" / f"L1.{site}" / "cfg.json").read_text())
    rows_start = case.spec.tokens.start
    assert cfg["metadata"]["prepend_bos"] is (rows_start is not None)
    sae_dir = str(tmp_path / "run" / f"L1.{site}")
    args = ["--sae", sae_dir, "--model", case.path, "--dataset", str(text), "--tokens", "256", "--context-size", "16"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["analyze", *args, "--n-seq", "2", "--induction-length", "6", "--out", str(tmp_path / "a.json")]) == 0
        assert main(["dashboard", *args, "--features", "0,1", "--out", str(tmp_path / "dash")]) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["tokens"] > 0 and len(report["head_induction"]) == 2
    assert "Feature 0" in (tmp_path / "dash" / "feature_0.html").read_text()
