"""Shared plumbing for the analysis modules: which site an SAE reads, the SAE's encoder seen per head,
feature directions in the residual stream, and cached forward passes.

Everything here is linear algebra on the formulas of ARCHITECTURE.md ("Formulas the analysis rests on"); the one
place heads are split is :func:`sae_lens_attn.sites.split_heads` (via einops).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import einops
import torch
from jaxtyping import Float, Int

from sae_lens_attn.errors import InputError
from sae_lens_attn.models import model_device
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site, split_heads
from sae_lens_attn.spec import attn_weights, model_spec
from sae_lens_attn.tokens import check_start_token

FeatureIds = int | Sequence[int] | torch.Tensor | None


def sae_site(sae: SAE, site: Site | None = None) -> Site:
    """The site ``sae`` reads: ``site`` when given, else its ``metadata.hook_name`` / ``hook_head_index``."""
    if site is not None:
        return site
    meta = sae.cfg.metadata or {}
    hook = meta.get("hook_name")
    if not hook:
        raise InputError("the SAE's metadata has no hook_name; pass site=Site(layer, kind) explicitly")
    return Site.parse(str(hook), head=meta.get("hook_head_index"))


def feature_ids(features: FeatureIds, d_sae: int) -> Int[torch.Tensor, " f"]:
    """A 1-D long tensor of feature ids (all ``d_sae`` when None), range-checked."""
    if features is None:
        return torch.arange(d_sae)
    ids = torch.as_tensor([features] if isinstance(features, int) else features, dtype=torch.long).reshape(-1)
    if ids.numel() and (ids.min() < 0 or ids.max() >= d_sae):
        raise InputError(f"feature ids must be in [0, {d_sae}), got {ids.tolist()}")
    return ids


class HeadEncoder(NamedTuple):
    """The SAE's encoder rewritten per head, so that ``pre = sum_h z_h @ W[h] + bias`` exactly."""

    W: Float[torch.Tensor, "n_heads d_head f"]
    """hook_z SAE: the head's block of W_enc; one-head SAE: W_enc at its head, 0 elsewhere;
    hook_attn_out SAE: ``W_O[h] @ W_enc`` (attn_out = sum_h z_h W_O[h] + b_O, b_O = 0 where the model has none)."""
    bias: Float[torch.Tensor, " f"]
    """``b_enc - b_dec @ W_enc`` (with apply_b_dec_to_input), plus ``b_O @ W_enc`` for hook_attn_out; the
    SAE's :meth:`~sae_lens_attn.saes.SAE.linear_encoder` gives W_enc and this bias for every architecture
    (gated SAEs: the magnitude path)."""


def head_encoder(model, sae: SAE, site: Site, features: FeatureIds = None) -> HeadEncoder:
    """Per-head encoder of ``sae`` at ``site`` for ``features`` (DFA: Kissane et al. 2024, section 3.2)."""
    sae.check_site(site, model.cfg)
    ids = feature_ids(features, sae.cfg.d_sae).to(sae.W_enc.device)
    with torch.no_grad():
        W_enc, bias = sae.linear_encoder(ids, dtype=torch.float32)  # pre = x @ W + b, b_dec folded into b
    n_heads, d_head = int(model.cfg.n_heads), int(model.cfg.d_head)
    if site.kind == "attn_out":
        aw = attn_weights(model, site.layer, W_enc.device)
        W = einops.einsum(aw.W_O, W_enc, "head d_head d_model, d_model f -> head d_head f")
        bias = bias + aw.b_O @ W_enc
    elif site.head is not None:
        W = torch.zeros(n_heads, d_head, len(ids), dtype=W_enc.dtype, device=W_enc.device)
        W[site.head] = W_enc
    else:
        W = einops.rearrange(W_enc, "(head d_head) f -> head d_head f", head=n_heads)
    return HeadEncoder(W, bias)


def decoder_head_blocks(sae: SAE, site: Site, n_heads: int) -> Float[torch.Tensor, "d_sae n_heads d_head"]:
    """W_dec split into head blocks (head-major, as :meth:`Site.flatten` concatenates them)."""
    if site.kind != "z":
        raise InputError(
            f"site {site.label} is hook_attn_out: its decoder has no head blocks; weight-based head attribution "
            "needs a hook_z SAE (use DFA, which works for both)"
        )
    W_dec = sae.W_dec.detach().float()
    if site.head is not None:
        blocks = torch.zeros(W_dec.shape[0], n_heads, W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
        blocks[:, site.head] = W_dec
        return blocks
    return split_heads(W_dec, n_heads)


def output_directions(model, sae: SAE, site: Site, features: FeatureIds = None) -> Float[torch.Tensor, "f d_model"]:
    """Each feature's decoder row in the attention output's space (d_model): through W_O for hook_z sites,
    as is for hook_attn_out. This is what the layer's attention adds *before* any post-attention norm."""
    ids = feature_ids(features, sae.cfg.d_sae).to(sae.W_dec.device)
    if site.kind == "attn_out":
        return sae.W_dec.detach()[ids].float()
    blocks = decoder_head_blocks(sae, site, int(model.cfg.n_heads))[ids]
    W_O = attn_weights(model, site.layer, blocks.device).W_O
    return einops.einsum(blocks, W_O, "f head d_head, head d_head d_model -> f d_model")


def residual_directions(model, sae: SAE, site: Site, features: FeatureIds = None) -> Float[torch.Tensor, "f d_model"]:
    """Each feature's direction as the residual stream receives it, up to the positive per-position scale of
    a frozen post-attention norm: :func:`output_directions` on pre-norm blocks; times the post-attention
    norm's weight on sandwich blocks (Gemma-2). Post-norm blocks (BERT) re-centre and rescale the whole
    stream after every sublayer, so a feature has no position-free residual direction there: refused."""
    from sae_lens_attn.spec import UnsupportedModelError, norm_affine

    dirs = output_directions(model, sae, site, features)
    spec = model_spec(model)
    layout = spec.require_layout("a feature's residual-stream direction")
    if layout == "sandwich":
        w, _ = norm_affine(model, model.blocks[site.layer].ln1_post, dirs.device)
        return dirs * w
    if layout == "post_norm":
        raise UnsupportedModelError(
            f"{spec.family} is a post-norm model (LayerNorm after every residual add): a feature's effect on the "
            "residual stream depends on each position's norm scales, so it has no position-free direction; use "
            "RDFA on a prompt instead"
        )
    return dirs


def normalization_kind(model) -> str:
    """``LN`` (centre and scale), ``RMS`` (scale only) or ``none``: how the norms in front of attention (and
    the final norm) act."""
    kind = str(getattr(model.cfg, "normalization_type", "LN") or "none")
    if kind.startswith("RMS"):
        return "RMS"
    if kind.startswith("LN"):
        return "LN"
    return "none"


def centre(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Subtract the mean over the last axis where the norm centres (LN), leave it otherwise.

    ``(r - mean r) . a == r . (a - mean a)``, so centring a read-out direction is the same as centring
    every residual vector it reads.
    """
    return x - x.mean(-1, keepdim=True) if kind == "LN" else x


def text_tokens(model, texts: str | Sequence[str]) -> Int[torch.Tensor, "batch pos"]:
    """Tokens of ``texts`` by the model's tokenization policy (``[BOS] text``, ``[CLS] text [SEP]``, ...; no
    padding: all texts must give the same length)."""
    if isinstance(texts, str):
        texts = [texts]
    policy = model_spec(model).tokens
    ids = [policy.encode(model.tokenizer, t) for t in texts]
    if len({len(r) for r in ids}) != 1:
        raise InputError("texts tokenize to different lengths; pass one text at a time or token ids")
    return torch.tensor(ids, dtype=torch.long)


def as_tokens(model, tokens, sae: SAE | None = None) -> Int[torch.Tensor, "batch pos"]:
    """Accept text (tokenized by the model's policy) or a 1-D / 2-D token tensor; return [batch, pos] on the
    model's device. Given tokens that lack the start token ``sae`` was trained with (``metadata.prepend_bos``),
    warn once (:func:`sae_lens_attn.tokens.check_start_token`)."""
    if isinstance(tokens, str) or (isinstance(tokens, Sequence) and tokens and isinstance(tokens[0], str)):
        tokens = text_tokens(model, tokens)
    elif sae is not None:
        t = torch.as_tensor(tokens)
        check_start_token(t if t.ndim > 1 else t[None], model_spec(model).tokens, sae.cfg.metadata,
                          f"the SAE for {sae.cfg.metadata.get('hook_name', 'this site')}")
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.ndim == 1:
        tokens = tokens[None]
    return tokens.to(model_device(model))


def run_cache(model, tokens: torch.Tensor, names: Sequence[str], stop_at_layer: int | None = None) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` for the hooks ``names`` of one forward pass (no grad); errors when one did not fire."""
    wanted = set(names)
    missing = sorted(n for n in wanted if n not in model.hook_dict)
    if missing:
        raise InputError(f"this model has no hook(s) {missing}")
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted, stop_at_layer=stop_at_layer)
    out = {n: cache[n] for n in wanted if n in cache}
    not_fired = sorted(wanted - set(out))
    if not_fired:
        raise RuntimeError(f"hooks {not_fired} did not fire during the forward pass")
    return {n: t.float().clone() for n, t in out.items()}


def decode_token(tokenizer, tok: int) -> str:
    """One token as text (byte-level pieces decoded), for displays."""
    return tokenizer.decode([int(tok)])
