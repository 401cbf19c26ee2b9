"""``SAE.from_pretrained`` on local folders laid out like the hub repos (small fake files with the real names and
formats), the registry's content, and the errors: unknown release or id, missing file, no network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sae_lens_attn.sae import SAE, JumpReLUSAE, SAEFileError, StandardSAE
from sae_lens_attn.saes.pretrained import pretrained_saes, releases

KK = "gpt2-small-hook-z-kk"
KK_REPO = "ckkissane/attn-saes-gpt2-small-all-layers"


def _weights(d_in: int, d_sae: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.3, "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.3,
            "b_enc": torch.randn(d_sae, generator=g) * 0.3, "b_dec": torch.randn(d_in, generator=g) * 0.3}


def test_registry_lists_the_published_attention_saes():
    rel = releases()
    assert rel[KK]["repo_id"] == KK_REPO and list(pretrained_saes(KK)) == [f"blocks.{i}.hook_z" for i in range(12)]
    assert pretrained_saes(KK)["blocks.5.hook_z"].startswith("gpt2-small_L5_Hcat_z_")
    assert rel["gemma-scope-2b-pt-att"]["repo_id"] == "google/gemma-scope-2b-pt-att"
    canon = pretrained_saes("gemma-scope-2b-pt-att-canonical")
    every = pretrained_saes("gemma-scope-2b-pt-att")
    assert len(canon) == 52 and {p for p in canon.values()} <= set(every)  # canonical ids name real folders
    assert canon["layer_3/width_16k/canonical"] == "layer_3/width_16k/average_l0_117"
    assert {r["architecture"] for n, r in rel.items() if n.startswith("gemma-scope")} == {"jumprelu"}


def test_kissane_release_from_a_local_copy_of_the_repo(tmp_path):
    path = pretrained_saes(KK)["blocks.5.hook_z"]
    t = _weights(32, 64, 0)
    torch.save(t, tmp_path / path)
    (tmp_path / path.replace(".pt", "_cfg.json")).write_text(json.dumps(
        {"act_size": 32, "dict_size": 64, "act_name": "blocks.5.attn.hook_z", "layer": 5, "seq_len": 128}))
    sae = SAE.from_pretrained(KK, "blocks.5.hook_z", local_dir=tmp_path)
    assert type(sae) is StandardSAE and sae.cfg.reshape_activations == "hook_z"
    assert sae.cfg.metadata["hook_name"] == "blocks.5.attn.hook_z" and sae.cfg.metadata["release"] == KK
    z = torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(1))
    want = ((z.reshape(2, 3, 32) - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu()
    torch.testing.assert_close(sae.encode(z), want)
    torch.testing.assert_close(sae(z), (want @ t["W_dec"] + t["b_dec"]).reshape(z.shape))


def test_gemma_scope_release_from_a_local_copy_of_the_repo(tmp_path):
    release, sae_id = "gemma-scope-2b-pt-att-canonical", "layer_3/width_16k/canonical"
    folder = tmp_path / "layer_3" / "width_16k" / "average_l0_117"
    folder.mkdir(parents=True)
    t = _weights(16, 40, 2)
    t["threshold"] = torch.rand(40, generator=torch.Generator().manual_seed(3)) * 0.5
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in t.items()})
    sae = JumpReLUSAE.from_pretrained(release, sae_id, local_dir=tmp_path)
    assert type(sae) is JumpReLUSAE and sae.cfg.apply_b_dec_to_input is False
    meta = sae.cfg.metadata
    assert meta["hook_name"] == "blocks.3.attn.hook_z" and meta["model_name"] == "gemma-2-2b" and meta["sae_id"] == sae_id
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    pre = x @ t["W_enc"] + t["b_enc"]  # Gemma Scope: b_dec is not subtracted from the input
    want = pre.relu() * (pre > t["threshold"])
    torch.testing.assert_close(sae.encode(x), want)
    assert (want > 0).any() and (want == 0).any()
    torch.testing.assert_close(sae(x), want @ t["W_dec"] + t["b_dec"])


def test_unknown_release_or_id_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown release 'gpt2-small-kk'; known attention-SAE releases: \[.*'gpt2-small-hook-z-kk'"):
        SAE.from_pretrained("gpt2-small-kk", "blocks.5.hook_z")
    with pytest.raises(ValueError, match=r"has no SAE 'blocks.5.attn.hook_z'; valid ids: \['blocks.0.hook_z', .*'blocks.11.hook_z'\]"):
        SAE.from_pretrained(KK, "blocks.5.attn.hook_z")
    with pytest.raises(ValueError, match=r"closest of its 260 ids: \['layer_3/width_16k/average_l0_1"):
        SAE.from_pretrained("gemma-scope-2b-pt-att", "layer_3/width_16k/average_l0_1")


def test_missing_local_file_names_repo_and_file(tmp_path):
    with pytest.raises(SAEFileError, match=r"layer_0/width_16k/average_l0_104/params.npz is missing: local_dir must be "
                                           r"laid out like the hub repo google/gemma-scope-2b-pt-att"):
        SAE.from_pretrained("gemma-scope-2b-pt-att-canonical", "layer_0/width_16k/canonical", local_dir=tmp_path)


def test_offline_error_names_repo_file_and_local_dir(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(SAEFileError) as err:
        SAE.from_pretrained(KK, "blocks.0.hook_z")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"from the Hugging Face hub repo {KK_REPO}" in msg and "gpt2-small_L0_Hcat_z_" in msg
    assert "pass local_dir=" in msg
