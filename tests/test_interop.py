"""Interop: SAELens' files load with the function SAELens computes; ours export in SAELens' v6 layout;
feature data exports in Neuronpedia's layout; optional Weights & Biases logging works offline.

SAELens itself is not importable here (it pins transformer-lens < 4), so the SAELens side is written out:
``SAELENS_CFGS`` are cfg.json files exactly as ``sae_lens`` 6.54.12 ``save_model`` wrote them, and
``saelens_reference`` is its encode/decode (StandardSAE, TopKSAE with and without
rescale_acts_by_decoder_norm, JumpReLUSAE). Files and outputs written by SAELens itself, for every
architecture, are checked in test_saes_saelens.py.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae_lens_attn.frontends.neuronpedia import export_neuronpedia
from sae_lens_attn.interop import (
    SAELENS_ARCH_FIELDS,
    SAELENS_BASE_FIELDS,
    export_saelens,
    load_sae,
    saelens_cfg_problems,
)
from sae_lens_attn.sae import SAE, JumpReLUSAE, SAEConfig, SAEFileError, StandardSAE, TopKSAE
from sae_lens_attn.sites import Site

N_HEADS, D_HEAD, D_SAE = 4, 8, 64
D_IN = N_HEADS * D_HEAD
_META = {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12", "hook_name": "blocks.1.attn.hook_z",
         "model_name": "gpt2-small", "hook_head_index": None}
_BASE = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
         "normalize_activations": "none", "reshape_activations": "hook_z", "metadata": _META}
SAELENS_CFGS = {
    "standard": {**_BASE, "architecture": "standard"},
    "topk": {**_BASE, "k": 5, "rescale_acts_by_decoder_norm": False, "architecture": "topk"},
    "topk_rescale": {**_BASE, "k": 5, "rescale_acts_by_decoder_norm": True, "architecture": "topk"},
    "jumprelu": {**_BASE, "architecture": "jumprelu"},
}


def _tensors(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.3, "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
         "b_enc": torch.randn(D_SAE, generator=g) * 0.3, "b_dec": torch.randn(D_IN, generator=g) * 0.3}
    if arch == "jumprelu":
        t["threshold"] = torch.rand(D_SAE, generator=g) * 0.5
    return t


def write_saelens(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def saelens_reference(cfg: dict, t: dict[str, torch.Tensor], z: torch.Tensor):
    """SAELens v6 inference on hook_z input ``[..., n_heads, d_head]``: flatten head-major, encode, decode."""
    x = z.reshape(*z.shape[:-2], -1)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    arch = cfg["architecture"]
    if arch == "topk":
        if cfg["rescale_acts_by_decoder_norm"]:
            pre = pre * t["W_dec"].norm(dim=-1)
        vals, idx = pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        dec_in = acts / t["W_dec"].norm(dim=-1) if cfg["rescale_acts_by_decoder_norm"] else acts
    elif arch == "jumprelu":
        acts = dec_in = pre.relu() * (pre > t["threshold"]).float()
    else:
        acts = dec_in = pre.relu()
    return acts, dec_in @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("name", sorted(SAELENS_CFGS))
def test_saelens_v6_attention_saes_compute_what_saelens_computes(tmp_path, name):
    cfg, t = SAELENS_CFGS[name], _tensors(SAELENS_CFGS[name]["architecture"])
    sae = load_sae(write_saelens(tmp_path / name, cfg, t))
    assert type(sae) is {"topk": TopKSAE, "standard": StandardSAE, "jumprelu": JumpReLUSAE}[cfg["architecture"]]
    assert sae.cfg.reshape_activations == "hook_z" and sae.cfg.metadata["hook_name"] == "blocks.1.attn.hook_z"
    z = torch.randn(6, 5, N_HEADS, D_HEAD, generator=torch.Generator().manual_seed(1))
    acts, recon = saelens_reference(cfg, t, z)
    flat = Site(1).flatten(z)  # our head flattening is SAELens' hook_z reshape
    torch.testing.assert_close(sae.encode(flat), acts, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(sae(flat), recon, atol=2e-5, rtol=1e-5)
    code = sae.encode_sparse(flat.reshape(-1, D_IN))  # the sparse interface: decode of the code is the reconstruction
    torch.testing.assert_close(sae.decode_sparse(code.values, code.indices), recon.reshape(-1, D_IN), atol=2e-5, rtol=1e-5)
    if cfg["architecture"] == "topk":
        assert (code.values > 0).sum(-1).max() <= 5


def test_jumprelu_log_threshold_files_load(tmp_path):
    t = _tensors("jumprelu")
    old = {**{k: v for k, v in t.items() if k != "threshold"}, "log_threshold": t["threshold"].log()}
    sae = load_sae(write_saelens(tmp_path / "j", SAELENS_CFGS["jumprelu"], old))
    torch.testing.assert_close(sae.threshold, t["threshold"])


def test_pre_v6_saelens_configs_load(tmp_path):
    t = _tensors("topk")
    pre6_topk = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "device": "cpu", "model_name": "gpt2-small",
                 "hook_point": "blocks.3.attn.hook_z", "hook_point_layer": 3, "hook_point_head_index": None,
                 "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 7}, "normalize_activations": False,
                 "context_size": 128, "sae_lens_training_version": "3.13.0"}
    sae = load_sae(write_saelens(tmp_path / "topk", pre6_topk, t))
    assert type(sae) is TopKSAE and sae.cfg.k == 7 and sae.cfg.reshape_activations == "hook_z"
    assert sae.cfg.metadata["hook_name"] == "blocks.3.attn.hook_z" and sae.cfg.metadata["hook_layer"] == 3
    # a pre-6 ReLU SAE with a finetuning scaling factor: SAELens decoded (acts * scaling_factor) @ W_dec
    scale = torch.rand(D_SAE, generator=torch.Generator().manual_seed(4)) + 0.5
    pre6_relu = {k: v for k, v in pre6_topk.items() if not k.startswith("activation_fn")}
    sae = load_sae(write_saelens(tmp_path / "relu", {**pre6_relu, "finetuning_scaling_factor": True},
                                 {**t, "scaling_factor": scale}))
    x = torch.randn(9, D_IN, generator=torch.Generator().manual_seed(2))
    acts = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu()
    torch.testing.assert_close(sae(x), (acts * scale) @ t["W_dec"] + t["b_dec"], atol=2e-5, rtol=1e-5)


def test_kissane_attention_sae_files_load(tmp_path):
    """The original files of Kissane et al.'s GPT-2 attention SAEs: ``<name>.pt`` + ``<name>_cfg.json``."""
    t = _tensors("standard")
    name = "gpt2-small_L5_Hcat_z_lr1.20e-03_l11.80e+00_ds64_bs4096_dc1.00e-06_rsanthropic_rie25000_nr4_v9"
    torch.save(t, tmp_path / f"{name}.pt")
    (tmp_path / f"{name}_cfg.json").write_text(json.dumps(
        {"act_size": D_IN, "dict_size": D_SAE, "act_name": "blocks.5.attn.hook_z", "layer": 5, "seq_len": 128,
         "l1_coeff": 1.8, "lr": 1.2e-3}))
    sae = load_sae(tmp_path / f"{name}.pt")
    assert type(sae) is StandardSAE and sae.cfg.metadata["hook_name"] == "blocks.5.attn.hook_z"
    x = torch.randn(9, D_IN, generator=torch.Generator().manual_seed(3))
    _, recon = saelens_reference(SAELENS_CFGS["standard"], t, x.reshape(9, N_HEADS, D_HEAD))
    torch.testing.assert_close(sae(x), recon, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("field,value,match", [
    ("normalize_activations", "layer_norm", "normalize_activations='layer_norm' is not supported"),
    ("architecture", "crosscoder", "architecture 'crosscoder' is not supported"),
    ("d_sae", 63, r"W_enc has shape \(32, 64\) but cfg.json \(d_in=32, d_sae=63\)"),
])
def test_unsupported_or_inconsistent_files_are_named(tmp_path, field, value, match):
    cfg = {**copy.deepcopy(SAELENS_CFGS["standard"]), field: value}
    path = write_saelens(tmp_path / "s", cfg, _tensors("standard"))
    with pytest.raises(SAEFileError, match=match) as err:
        load_sae(path)
    assert str(path) in str(err.value)


def _ours(selection: str = "gsae") -> SAE:
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=6, selection=selection, reshape_activations="hook_z",
                        metadata={"model_name": "sae-lens-attn/shakespeare-2l", "hook_name": "blocks.1.attn.hook_z",
                                  "hook_layer": 1, "hook_head_index": None, "context_size": 64}),
              init=False)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(1))
    return sae


def test_export_follows_saelens_v6_conventions(tmp_path):
    sae = _ours()
    # SAELens reads a cfg.json without metadata.sae_lens_version as pre-v6 and drops the metadata
    plain = json.loads((sae.save(tmp_path / "plain") / "cfg.json").read_text())
    assert saelens_cfg_problems(plain) == []  # SAE.save itself now writes metadata.sae_lens_version
    path = export_saelens(sae, tmp_path / "exported", torch.full((D_SAE,), -3.0))
    cfg = json.loads((path / "cfg.json").read_text())
    assert saelens_cfg_problems(cfg) == []
    assert set(cfg) == set(SAELENS_BASE_FIELDS + SAELENS_ARCH_FIELDS["topk"])
    assert cfg["architecture"] == "topk" and cfg["k"] == 6 and cfg["dtype"] == "float32"
    assert cfg["reshape_activations"] == "hook_z" and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.") and cfg["metadata"]["selection"] == "gsae"
    with safe_open(str(path / "sae_weights.safetensors"), "pt") as f:
        shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    assert shapes == {"W_enc": ([D_IN, D_SAE], "F32"), "W_dec": ([D_SAE, D_IN], "F32"), "b_enc": ([D_SAE], "F32"),
                      "b_dec": ([D_IN], "F32")}
    with safe_open(str(path / "sparsity.safetensors"), "pt") as f:
        assert list(f.keys()) == ["sparsity"] and f.get_slice("sparsity").get_shape() == [D_SAE]
    back = load_sae(path)  # the round trip through SAELens' layout is exact
    for name, p in sae.named_parameters():
        assert torch.equal(p, dict(back.named_parameters())[name]), name
    z = torch.randn(4, 3, N_HEADS, D_HEAD, generator=torch.Generator().manual_seed(2))
    t = {n: p.detach() for n, p in sae.named_parameters()}
    _, recon = saelens_reference(cfg, t, z)
    torch.testing.assert_close(sae(Site(1).flatten(z)), recon, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(sae(z), recon.reshape(z.shape), atol=2e-5, rtol=1e-5)  # hook_z input, hook_z shape out
    bad = _ours()
    bad.cfg.metadata.pop("hook_name")
    with pytest.raises(ValueError, match="metadata.hook_name is missing"):
        export_saelens(bad, tmp_path / "bad")


@pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None,
                    reason="sae_lens is not installed (it pins transformer-lens<4); the v6 conventions are checked above")
def test_saelens_loads_the_export(tmp_path):  # pragma: no cover - runs only where sae_lens is installed
    from sae_lens import SAE as LensSAE

    sae = _ours()
    lens = LensSAE.load_from_disk(export_saelens(sae, tmp_path / "e"))
    z = torch.randn(4, 3, N_HEADS, D_HEAD)
    torch.testing.assert_close(lens(z).reshape(-1, D_IN), sae(Site(1).flatten(z)).reshape(-1, D_IN),
                               atol=2e-5, rtol=1e-5)
    assert lens.cfg.metadata.hook_name == "blocks.1.attn.hook_z"


@pytest.fixture(scope="module")
def sample_rows(default_model):
    from sae_lens_attn.data import token_rows
    from sae_lens_attn.models import SAMPLE_TEXT, bos_token_id

    return token_rows(str(SAMPLE_TEXT), default_model.tokenizer, 64, bos_token_id(default_model))[:6]


def test_relu_sae_from_saelens_runs_through_evals(default_model, sample_rows, tmp_path):
    from sae_lens_attn.evals import evaluate_sae

    d_in = Site(1).d_in(default_model.cfg)
    g = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(d_in, 128, generator=g) * 0.1, "W_dec": torch.randn(128, d_in, generator=g) * 0.1,
         "b_enc": torch.randn(128, generator=g) * 0.1 - 0.2, "b_dec": torch.zeros(d_in)}
    cfg = {**SAELENS_CFGS["standard"], "d_in": d_in, "d_sae": 128}
    sae = load_sae(write_saelens(tmp_path / "relu", cfg, t))
    # the cfg says gpt2-small: a deliberate transfer to the embedded model
    metrics, density = evaluate_sae(default_model, sae, Site(1), sample_rows, allow_transfer=True)
    from sae_lens_attn.activations import harvest

    h = harvest(default_model, sample_rows, [Site(1)])
    x = h.acts[Site(1)][h.mask]
    l0 = (((x @ t["W_enc"] + t["b_enc"]) > 0).sum(-1).float().mean()).item()
    assert metrics.l0 == pytest.approx(l0, rel=1e-5) and l0 > 10  # many latents per token: not TopK


def test_neuronpedia_export_layout_and_values(default_model, sample_rows, tmp_path):
    from sae_lens_attn.activations import harvest
    from sae_lens_attn.models import bos_token_id

    sae = SAE(SAEConfig(d_in=Site(1).d_in(default_model.cfg), d_sae=48, k=4, metadata=dict(_ours().cfg.metadata)))
    files = export_neuronpedia(default_model, sae, sample_rows, tmp_path / "np", model_id="shakespeare-2l",
                               sae_id="1-att-topk", features_per_batch=20, n_top=5, n_logits=6)
    assert [f.name for f in files] == ["batch-1.json", "batch-2.json", "batch-3.json"]
    docs = [json.loads(f.read_text()) for f in files]
    skipped = json.loads((tmp_path / "np" / "skipped_indexes.json").read_text())
    assert all(d["model_id"] == "shakespeare-2l" and d["sae_id"] == "1-att-topk" and d["layer"] == "1" for d in docs)
    feats = {f["featureIndex"]: f for d in docs for f in d["features"]}
    assert sorted(list(feats) + skipped["skipped_indexes"]) == list(range(48))
    # independent computation of densities and maxima
    h = harvest(default_model, sample_rows, [Site(1)], drop_bos=False)
    keep = sample_rows != bos_token_id(default_model)
    with torch.no_grad():
        acts = sae.encode(h.acts[Site(1)])[keep]  # [tokens, d_sae]
    density = (acts > 0).float().mean(0)
    assert set(skipped["skipped_indexes"]) == set((density == 0).nonzero().flatten().tolist())
    for i, f in feats.items():
        assert f["frac_nonzero"] == pytest.approx(float(density[i]), rel=1e-6)
        assert len(f["pos_str"]) == len(f["pos_values"]) == 6 and f["pos_values"] == sorted(f["pos_values"], reverse=True)
        assert f["neg_values"] == sorted(f["neg_values"])
        assert sum(f["freq_hist_data_bar_heights"]) == int((acts[:, i] > 0).sum())
        assert sum(f["logits_hist_data_bar_heights"]) == default_model.cfg.d_vocab
        top = [a for a in f["activations"] if a["binMin"] == -1]
        assert 1 <= len(top) <= 5
        assert top[0]["maxValue"] == pytest.approx(float(acts[:, i].max()), abs=2e-3)
        for a in f["activations"]:
            assert len(a["tokens"]) == len(a["values"]) and all(isinstance(s, str) for s in a["tokens"])
            assert a["maxValue"] == max(a["values"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (it is optional)")
def test_wandb_offline_logging(tmp_path, monkeypatch):
    from sae_lens_attn.training.config import TrainConfig
    from sae_lens_attn.training.run import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = TrainConfig(wandb_project="sae-lens-attn-test", out_dir=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    logger = WandbLogger(cfg, tmp_path / "run")
    for step in (10, 20):
        logger({"step": step, "site": "L1.z", "elapsed_s": 0.1, "loss": 1.0 / step, "fvu": 0.5, "auxk": 0.0, "l0": 8.0,
                "dead_fraction": 0.0})
    logger.finish()
    run_id = (tmp_path / "run" / "wandb_run_id").read_text()
    runs = list((tmp_path / "run").rglob(f"offline-run-*-{run_id}"))
    assert runs and list(runs[0].glob("*.wandb")), "offline run files were not written"
