"""Per-head IOI scores from one clean forward pass: what each head writes to the logit difference directly,
and where it attends. With :mod:`.patching` they give each head its role (Wang et al. 2022, section 3).

* **Direct logit attribution** (DLA) at the last token: head h adds ``z_h W_O^h`` to the residual stream; the
  final norm divides the whole stream at that position by one scale ``s`` (frozen at its value on the
  prompt) and multiplies by its weight ``w``, so the head's share of ``logit[IO] - logit[S]`` is
  ``centre(z_h W_O^h) / s * w . (W_U[:, IO] - W_U[:, S])``. Summed over every component (embeddings, heads,
  biases, MLPs) this is exactly the logit difference; a name mover has a large positive share, a negative name
  mover a negative one, an S-inhibition head almost none (it acts through the name movers' queries).
* **Attention**: from the last token to IO and to S2 (name movers attend to IO), and from S2 to S1
  (duplicate-token heads) and to the token after S1 (induction heads), averaged over prompts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float

from sae_lens_attn.models import model_device
from sae_lens_attn.spec import UnsupportedModelError, attn_weights, model_spec, norm_affine

from ._common import centre, normalization_kind
from .ioi import IOIDataset


class IOIHeadScores(NamedTuple):
    dla: Float[torch.Tensor, "n_layers n_heads"]
    """Each head's direct share of the logit difference at the last token, mean over prompts."""
    dla_io: Float[torch.Tensor, "n_layers n_heads"]
    """Its direct share of ``logit[IO]`` alone (``dla = dla_io - dla_s``; for LayerNorm models each is read
    through the centred residual, which shifts both by the same amount)."""
    dla_s: Float[torch.Tensor, "n_layers n_heads"]
    """Its direct share of ``logit[S]``: a head that lowers it suppresses the subject."""
    end_to_io: Float[torch.Tensor, "n_layers n_heads"]
    end_to_s2: Float[torch.Tensor, "n_layers n_heads"]
    s2_to_s1: Float[torch.Tensor, "n_layers n_heads"]
    """Duplicate-token score."""
    s2_to_s1_next: Float[torch.Tensor, "n_layers n_heads"]
    """Induction score: attention from S2 to the token after S1."""
    logit_diff: float
    """The clean logit difference the DLA shares are parts of."""


@torch.no_grad()
def ioi_head_scores(model, data: IOIDataset) -> IOIHeadScores:
    """The scores above for every head (one forward pass over ``data``)."""
    spec = model_spec(model)
    if spec.kind != "causal" or not hasattr(model, "ln_final"):
        raise UnsupportedModelError(f"IOI head scores need a causal LM with a final norm; {spec.family} is not one")
    if spec.require_layout("per-head direct logit attribution") != "pre_norm":
        # a post-attention norm (sandwich) or post-norm blocks rescale each head's write per position, so
        # z_h W_O^h is not what reaches the residual stream: the DLA would be silently wrong
        raise UnsupportedModelError(f"per-head DLA reads z_h W_O^h as the head's write to the residual stream; "
                                    f"{spec.family} is a {spec.layout} model, where a norm after attention rescales it")
    dev = model_device(model)
    n_layers = model.cfg.n_layers
    names = {f"blocks.{L}.attn.hook_{w}" for L in range(n_layers) for w in ("z", "pattern")} | {"ln_final.hook_scale"}
    logits, cache = model.run_with_cache(data.tokens.to(dev), names_filter=lambda n: n in names)
    idx = torch.arange(len(data), device=dev)
    pos = {k: v.to(dev) for k, v in data.positions.items()}
    end = pos["end"]
    w, _ = norm_affine(model, model.ln_final, dev)
    W_U = model.W_U.detach().float().to(dev)
    read_io = W_U[:, data.io_tokens.to(dev)].T * w  # [batch, d_model]
    read_s = W_U[:, data.s_tokens.to(dev)].T * w
    scale = cache["ln_final.hook_scale"][idx, end].float().reshape(len(data), -1)[:, :1]  # [batch, 1]
    kind = normalization_kind(model)
    out = {k: torch.zeros(n_layers, model.cfg.n_heads) for k in ("dla_io", "dla_s", "io", "s2", "dup", "ind")}
    for L in range(n_layers):
        z = cache[f"blocks.{L}.attn.hook_z"][idx, end].float()  # [batch, head, d_head]
        W_O = attn_weights(model, L, dev).W_O  # [head, d_head, d_model]
        contrib = centre(torch.einsum("bhd,hdm->bhm", z, W_O), kind) / scale[:, :, None]
        out["dla_io"][L] = torch.einsum("bhm,bm->bh", contrib, read_io).mean(0).cpu()
        out["dla_s"][L] = torch.einsum("bhm,bm->bh", contrib, read_s).mean(0).cpu()
        pat = cache[f"blocks.{L}.attn.hook_pattern"].float()  # [batch, head, q, k]
        out["io"][L] = pat[idx, :, end, pos["IO"]].mean(0).cpu()
        out["s2"][L] = pat[idx, :, end, pos["S2"]].mean(0).cpu()
        out["dup"][L] = pat[idx, :, pos["S2"], pos["S1"]].mean(0).cpu()
        out["ind"][L] = pat[idx, :, pos["S2"], pos["S1"] + 1].mean(0).cpu()
    ld = logits[idx, end]
    diff = (ld[idx, data.io_tokens.to(dev)] - ld[idx, data.s_tokens.to(dev)]).mean()
    return IOIHeadScores(out["dla_io"] - out["dla_s"], out["dla_io"], out["dla_s"], out["io"], out["s2"], out["dup"],
                         out["ind"], float(diff))


class IOIFeatureSources(NamedTuple):
    """Where one SAE feature is read from at the last token of IOI prompts (DFA by head and source)."""

    head: int
    """The head with the largest positive DFA to the feature, summed over the prompts."""
    head_share: float
    """That head's part of the feature's positive DFA (sum over heads of relu(DFA_h) is 1)."""
    sources: dict[str, float]
    """``IO``, ``S1``, ``S2``: the part of that head's DFA read from each name's position."""


def ioi_feature_sources(model, sae, data: IOIDataset, feature: int, rows: list[int]) -> IOIFeatureSources:
    """DFA by source (:func:`~.dfa.dfa_by_source`) of ``feature`` at each prompt's last token, summed over
    ``rows``: which head computes it, and whether that head reads it from IO, S1 or S2."""
    from .dfa import dfa_by_source

    src = dfa_by_source(model, sae, data.tokens[rows], [int(feature)])
    idx = torch.arange(len(rows))
    ends = data.positions["end"][rows]
    by_head = src.by_head[idx, ends, :, 0].clamp_min(0).sum(0)
    h = int(by_head.argmax())
    total = src.by_head[idx, ends, h, 0].sum()
    sources = {name: float(src.by_source[idx, ends, h, data.positions[name][rows], 0].sum() / total)
               for name in ("IO", "S1", "S2")}
    return IOIFeatureSources(h, float(by_head[h] / by_head.sum()), sources)
