"""Direct feature attribution (DFA) by head and by source position, exact (Kissane et al. 2024, section 3.2).

For an SAE on hook_z (z = the heads' outputs concatenated, before W_O) the pre-activation of feature i is

    pre_i = sum_h z_h . W_enc[h-block, i] + (b_enc_i - b_dec . W_enc[:, i])        (apply_b_dec_to_input)

so ``DFA_{i,h} = z_h . W_enc[h-block, i]`` and the terms sum exactly to ``pre_i`` minus the bias term.
Each head's output is a mix of value vectors, ``z_h[t] = sum_s A_h[t, s] v_h[s]``; the bridge's ``hook_v``
already holds the value bias b_V where the model has one (checked against the Hugging Face modules in
``tests/test_families.py``), and the rows of A sum to 1, so ``DFA_{i,h,s}[t] = A_h[t, s] (v_h[s] .
W_enc[h-block, i])`` sums over s to DFA_{i,h}[t]. With grouped-query or multi-query attention ``hook_v`` has
``n_kv_heads`` heads and query head h reads key/value head ``h // (n_heads / n_kv_heads)``
(:meth:`~sae_lens_attn.spec.ModelSpec.per_query_head`). Attention may be bidirectional (encoders): sources
after the destination then count like the others.

For an SAE on attn_out the same holds with ``W_O[h] @ W_enc`` in place of the head block and b_O in the bias
term (attn_out = sum_h z_h W_O[h] + b_O, read at the output projection on every family, before any
post-attention norm; b_O = 0 where the projection has no bias).

Every architecture is attributed through the one linear map that decides and sizes its features,
``sae.linear_encoder()`` (``pre = x @ W + b``): W_enc for TopK, ReLU, JumpReLU and BatchTopK; for a
gated SAE the *magnitude* path, ``W = W_enc * exp(r_mag)`` with bias ``b_mag - b_dec @ W``, the value of
an active feature (its gate, ``(x - b_dec) @ W_enc + b_gate > 0``, only says whether it is active and is not
attributed).
"""

from __future__ import annotations

from typing import NamedTuple

import einops
import torch
from jaxtyping import Float, Int

from sae_lens_attn.errors import InputError
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site
from sae_lens_attn.spec import model_spec

from ._common import FeatureIds, as_tokens, feature_ids, head_encoder, run_cache, sae_site


class DFAResult(NamedTuple):
    """DFA by head for some features at every position."""

    features: Int[torch.Tensor, " f"]
    pre: Float[torch.Tensor, "batch pos f"]
    """The SAE's pre-activations, computed by ``sae.encode_pre`` from the cached site activation (gated
    SAEs: the magnitude pre-activation)."""
    acts: Float[torch.Tensor, "batch pos f"]
    """The SAE's activations (``sae.encode``): e.g. ReLU(``pre``) where the feature is among TopK's k kept
    or above JumpReLU's threshold, else 0."""
    by_head: Float[torch.Tensor, "batch pos n_heads f"]
    """``DFA_{i,h}``; ``by_head.sum(2) + bias == pre``."""
    bias: Float[torch.Tensor, " f"]
    """The bias term ``b_enc - b_dec @ W_enc`` (+ ``b_O @ W_enc`` for hook_attn_out)."""


class SourceDFA(NamedTuple):
    """DFA by head and source position for some features at every query position."""

    features: Int[torch.Tensor, " f"]
    pre: Float[torch.Tensor, "batch pos f"]
    acts: Float[torch.Tensor, "batch pos f"]
    by_head: Float[torch.Tensor, "batch pos n_heads f"]
    by_source: Float[torch.Tensor, "batch q n_heads k f"]
    """``DFA_{i,h,s}[t]`` (q = t, k = s); ``by_source.sum(3) == by_head``."""
    bias: Float[torch.Tensor, " f"]
    pattern: Float[torch.Tensor, "batch n_heads q k"]
    """The attention patterns used."""


def _hooks(model, site: Site, with_source: bool) -> list[str]:
    L = site.layer
    names = [f"blocks.{L}.attn.hook_z", model_spec(model).capture_hook(site)]
    if with_source:
        names += [f"blocks.{L}.attn.hook_pattern", f"blocks.{L}.attn.hook_v"]
    return sorted(set(names))


def _pre_and_acts(sae: SAE, site: Site, act: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = site.flatten(act).to(sae.W_enc.device, sae.W_enc.dtype)
    pre = sae.encode_pre(flat)
    dense = sae.encode(flat)
    return pre[..., ids].float(), dense[..., ids].float()


@torch.no_grad()
def dfa(
    model,
    sae: SAE,
    tokens: Int[torch.Tensor, "batch pos"] | str,
    features: FeatureIds = None,
    site: Site | None = None,
) -> DFAResult:
    """DFA by head of ``features`` (all when None) on ``tokens`` (text gets BOS prepended)."""
    site = sae_site(sae, site)
    ids = feature_ids(features, sae.cfg.d_sae)
    tokens = as_tokens(model, tokens, sae)
    cache = run_cache(model, tokens, _hooks(model, site, False), stop_at_layer=site.layer + 1)
    enc = head_encoder(model, sae, site, ids)
    z = cache[f"blocks.{site.layer}.attn.hook_z"].to(enc.W.device)
    by_head = einops.einsum(z, enc.W, "b pos head d_head, head d_head f -> b pos head f")
    pre, acts = _pre_and_acts(sae, site, cache[model_spec(model).capture_hook(site)], ids.to(sae.W_enc.device))
    return DFAResult(ids, pre, acts, by_head, enc.bias)


@torch.no_grad()
def dfa_by_source(
    model,
    sae: SAE,
    tokens: Int[torch.Tensor, "batch pos"] | str,
    features: FeatureIds,
    site: Site | None = None,
) -> SourceDFA:
    """DFA by head and source position of ``features`` (a few: the output is [batch, pos, head, pos, f])."""
    site = sae_site(sae, site)
    if features is None:
        raise InputError("dfa_by_source needs explicit features: its output grows as pos^2 * n_heads * n_features")
    ids = feature_ids(features, sae.cfg.d_sae)
    tokens = as_tokens(model, tokens, sae)
    L = site.layer
    spec = model_spec(model)
    cache = run_cache(model, tokens, _hooks(model, site, True), stop_at_layer=L + 1)
    enc = head_encoder(model, sae, site, ids)
    dev = enc.W.device
    z = cache[f"blocks.{L}.attn.hook_z"].to(dev)
    v = spec.per_query_head(cache[f"blocks.{L}.attn.hook_v"].to(dev), 2)  # [b, k, head, d_head], b_V included
    pattern = cache[f"blocks.{L}.attn.hook_pattern"].to(dev)  # [b, head, q, k]
    by_head = einops.einsum(z, enc.W, "b pos head d_head, head d_head f -> b pos head f")
    v_read = einops.einsum(v, enc.W, "b k head d_head, head d_head f -> b k head f")
    by_source = einops.einsum(pattern, v_read, "b head q k, b k head f -> b q head k f")
    pre, acts = _pre_and_acts(sae, site, cache[spec.capture_hook(site)], ids.to(sae.W_enc.device))
    return SourceDFA(ids, pre, acts, by_head, by_source, enc.bias, pattern)


def head_fractions(by_head: Float[torch.Tensor, "... n_heads"]) -> Float[torch.Tensor, "... n_heads"]:
    """Share of DFA mass per head: ``relu(DFA_h) / sum_h relu(DFA_h)`` (0 where nothing is positive).

    Positive terms push the feature up; this is the "fraction of DFA from head h" used to say which head
    computes a feature on an example.
    """
    pos = by_head.clamp_min(0)
    total = pos.sum(-1, keepdim=True)
    return torch.where(total > 0, pos / total.clamp_min(1e-30), torch.zeros_like(pos))
