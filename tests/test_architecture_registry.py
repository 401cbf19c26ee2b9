"""Adding an SAE architecture takes one module (``tests/toy_architecture.py``): defining its class registers
it, so ``SAE(SAEConfig(architecture=...))`` builds it and ``SAE.load`` reads back what ``save`` wrote."""

import importlib
import json
import sys

import pytest
import torch

from sae_lens_attn.sae import SAE, SAEConfig
from sae_lens_attn.saes import REGISTRY, architectures, sae_class


@pytest.fixture
def toy():
    """The toy module imported (so registered) for one test, and the registry as it was afterwards."""
    before = dict(REGISTRY)
    sys.modules.pop("tests.toy_architecture", None)
    yield importlib.import_module("tests.toy_architecture").ShiftedReLUSAE
    REGISTRY.clear()
    REGISTRY.update(before)


def test_the_builtin_architectures_are_registered_by_their_modules():
    assert set(architectures()) == {"topk", "batchtopk", "jumprelu", "standard", "gated"}
    assert REGISTRY["batchtopk"].saelens_name == "jumprelu" and REGISTRY["topk"].saelens_name == "topk"
    assert all(sae_class(name).architecture == name for name in architectures())


def test_a_toy_architecture_is_built_saved_and_loaded(toy, tmp_path):
    assert "toy_shifted_relu" in architectures()
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="toy_shifted_relu"))
    assert type(sae) is toy
    x = torch.randn(5, 8)
    f = sae.encode(x)
    assert torch.equal(f, (sae.encode_pre(x) - 0.5).relu())
    sae.save(tmp_path / "toy")
    assert json.loads((tmp_path / "toy" / "cfg.json").read_text())["architecture"] == "toy_shifted_relu"
    back = SAE.load(tmp_path / "toy")
    assert type(back) is toy and torch.equal(back.encode(x), f)


def test_an_unregistered_architecture_is_refused(toy):
    with pytest.raises(ValueError, match="architecture must be one of"):
        SAEConfig(d_in=8, d_sae=16, architecture="nonesuch")
