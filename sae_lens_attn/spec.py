"""One description of the model, derived once at load: what sites, evals and analysis may assume.

Families differ in exactly the ways the analysis depends on (ARCHITECTURE.md, "The model description"):

* **grouped-query / multi-query attention** (Llama, Mistral, Qwen2, Gemma, Phi-3): ``hook_v`` and ``W_V``
  have ``n_kv_heads`` heads; query head h reads key/value head ``h // (n_heads // n_kv_heads)``
  (Hugging Face's ``repeat_kv``);
* **bias-free projections** (Llama, Mistral, Gemma, GPT-J, ...): no b_O / b_V (zeros here);
* **where the block writes its attention output** (:data:`Layout`): ``pre_norm`` blocks add
  ``attn_out = sum_h z_h W_O[h] + b_O`` to the residual; ``sandwich`` blocks (Gemma-2) add
  ``post_norm(attn_out)``; ``post_norm`` blocks (BERT) replace the residual by ``LN(resid + attn_out)``;
* **the model kind**: causal LM (next-token loss) or encoder (bidirectional attention, masked-token loss);
* **the tokenization policy** (:mod:`sae_lens_attn.tokens`).

The layout is not taken on trust: :func:`derive_spec` runs one short forward pass and checks the residual
identity of block 0 for the layout it claims, the norm arithmetic RDFA relies on, and what the bridge's
``hook_attn_out`` holds. Where nothing matches, ``layout`` is None and RDFA refuses, naming the family.

``attn_out`` means one thing on every family: the attention block's own output, before any post-attention
norm and before the residual add. It is read at the output projection (``blocks.L.attn.o.hook_out``),
never at the bridge's ``hook_attn_out``, which on Gemma-2 is after the post-attention RMSNorm and on BERT
is ``LayerNorm(attn_out + resid)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from .errors import InputError
from .tokens import TokenPolicy

Kind = Literal["causal", "encoder"]
Layout = Literal["pre_norm", "sandwich", "post_norm"]
BridgeAttnOut = Literal["attn_output", "post_attn_norm", "post_ln_residual", "unknown"]

#: Where every family's attention block exposes its own output (the output projection's result).
ATTN_OUT_HOOK = "blocks.{layer}.attn.o.hook_out"
Z_HOOK = "blocks.{layer}.attn.hook_z"


class UnsupportedModelError(InputError):
    """The model's structure does not allow the asked computation to be exact: the message names the family
    and the piece that is missing."""


@dataclass(frozen=True)
class ModelSpec:
    """What the toolkit knows about a loaded model (see the module docstring)."""

    family: str
    """Hugging Face ``model_type`` (``gpt2``, ``llama``, ``gemma2``, ``bert``, ...)."""
    kind: Kind
    n_layers: int
    n_heads: int
    n_kv_heads: int
    """Key/value heads (= n_heads without grouped-query attention; 1 for multi-query)."""
    d_head: int
    d_model: int
    has_b_O: bool
    has_b_V: bool
    layout: Layout | None
    """How blocks write the attention output into the residual stream; None when the probe matched none."""
    layout_note: str
    """Why ``layout`` is None (empty otherwise)."""
    attn_norm: Literal["LN", "RMS"] | None
    """The norm in front of attention (``ln1``); None when attention reads the residual itself (post-norm)."""
    norm_weight_offset: float
    """Norm weights are applied as ``offset + w`` (Gemma stores RMSNorm weights as w - 1)."""
    bridge_attn_out: BridgeAttnOut
    """What the bridge's own ``blocks.L.hook_attn_out`` holds (the toolkit never reads it)."""
    tokens: TokenPolicy
    new_weights: tuple[str, ...] | None
    """Weights the checkpoint did not contain, newly initialised at load (None: could not be checked)."""
    notes: tuple[str, ...] = ()
    """Family facts that do not change any formula (softcaps, sliding windows) but belong in reports."""
    source: str = ""
    """Where the weights came from when not a Hugging Face checkpoint: a GGUF file's name, architecture and
    quantization (the activations are those of the dequantized weights)."""

    # --- sites -----------------------------------------------------------------------------------------
    def capture_hook(self, site) -> str:
        """The hook a :class:`~sae_lens_attn.sites.Site` is read (and spliced) at."""
        if site.kind == "attn_out":
            return ATTN_OUT_HOOK.format(layer=site.layer)
        return Z_HOOK.format(layer=site.layer)

    # --- heads -----------------------------------------------------------------------------------------
    @property
    def kv_group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_index(self, device=None) -> torch.Tensor:
        """[n_heads] the key/value head each query head reads."""
        return torch.arange(self.n_heads, device=device) // self.kv_group

    def per_query_head(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Repeat a key/value-head axis (``dim``, of size n_kv_heads) to the n_heads query heads."""
        if t.shape[dim] == self.n_heads:
            return t
        if t.shape[dim] != self.n_kv_heads:
            raise ValueError(f"axis {dim} has {t.shape[dim]} heads, expected {self.n_kv_heads} or {self.n_heads}")
        return t.index_select(dim, self.kv_index(t.device))

    # --- refusals --------------------------------------------------------------------------------------
    def require_layout(self, what: str) -> Layout:
        if self.layout is None:
            raise UnsupportedModelError(
                f"{what} is not supported for {self.family}: {self.layout_note}. It needs the residual stream "
                "to be an exact sum of the blocks' outputs (with norms frozen), which this model's blocks "
                "were not found to be"
            )
        return self.layout

    @property
    def lm_refusal(self) -> str | None:
        """Why loss-based metrics (CE, KL) cannot be trusted on this model, or None."""
        if self.new_weights:
            shown = ", ".join(self.new_weights[:6]) + (" ..." if len(self.new_weights) > 6 else "")
            return (
                f"{len(self.new_weights)} weight(s) of this {self.family} model were not in its checkpoint and "
                f"were newly initialised at load ({shown}); its loss is that of random weights, so CE and KL "
                "metrics are refused (reconstruction metrics are still exact). Load a checkpoint that has "
                "its language-model head"
            )
        if self.kind == "encoder" and self.tokens.mask is None:
            return f"this {self.family} encoder's tokenizer has no mask token, so its masked-token loss is undefined"
        return None


class AttnWeights(NamedTuple):
    """One layer's value and output weights per *query* head (float32, detached), zeros for missing biases."""

    W_V: torch.Tensor
    """[n_heads, d_model, d_head] (key/value heads repeated)."""
    b_V: torch.Tensor
    """[n_heads, d_head]."""
    W_O: torch.Tensor
    """[n_heads, d_head, d_model]."""
    b_O: torch.Tensor
    """[d_model]."""


def attn_weights(model, layer: int, device=None) -> AttnWeights:
    """The value/output weights of ``layer`` for the analysis formulas (every family)."""
    spec = model_spec(model)
    attn = model.blocks[layer].attn
    W_V = attn.W_V.detach().float()
    W_O = attn.W_O.detach().float()
    device = device if device is not None else W_O.device
    b_V = attn.b_V
    b_V = b_V.detach().float() if b_V is not None else torch.zeros(W_V.shape[0], spec.d_head)
    b_O = attn.b_O
    b_O = b_O.detach().float() if b_O is not None else torch.zeros(spec.d_model)
    return AttnWeights(
        spec.per_query_head(W_V.to(device), 0), spec.per_query_head(b_V.to(device), 0), W_O.to(device), b_O.to(device)
    )


def norm_affine(model, module, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A norm module's effective ``(weight, bias)``: ``offset + w`` (ones without a weight), zeros without a bias."""
    spec = model_spec(model)
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    weight = w.detach().float() + spec.norm_weight_offset if w is not None else torch.ones(spec.d_model)
    bias = b.detach().float() if b is not None else torch.zeros(spec.d_model)
    return weight.to(device or weight.device), bias.to(device or weight.device)


def model_spec(model) -> ModelSpec:
    """The model's :class:`ModelSpec` (derived once, at :func:`~sae_lens_attn.models.load_model`; derived
    here, from the bridge's own tokenizer, for a bridge booted elsewhere)."""
    spec = getattr(model, "sae_lens_attn_spec", None)
    if spec is None:
        from .tokens import policy_from_tokenizer

        encoder = getattr(model.cfg, "attention_dir", "causal") == "bidirectional"
        spec = derive_spec(model, policy_from_tokenizer(model.tokenizer, encoder), None)
        model.sae_lens_attn_spec = spec
    return spec


# ------------------------------------------------------------------------------------------ derivation


def derive_spec(model, tokens: TokenPolicy, new_weights: tuple[str, ...] | None) -> ModelSpec:
    """Describe ``model`` (a TransformerBridge), checking the layout on one short forward pass."""
    cfg = model.cfg
    hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
    family = str(getattr(hf_cfg, "model_type", None) or getattr(cfg, "original_architecture", None) or "unknown")
    kind: Kind = "encoder" if getattr(cfg, "attention_dir", "causal") == "bidirectional" else "causal"
    n_heads = int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    attn0 = model.blocks[0].attn
    if int(attn0.W_V.shape[0]) != n_kv or n_heads % n_kv:
        raise UnsupportedModelError(
            f"{family}: W_V has {attn0.W_V.shape[0]} key/value heads but the config says {n_kv} of {n_heads} "
            "query heads; the bridge's description of this model is inconsistent"
        )
    offset = 1.0 if getattr(cfg, "rmsnorm_uses_offset", False) else 0.0
    layout, note, bridge_out = _probe_layout(model, tokens, offset)
    norm = str(getattr(cfg, "normalization_type", "LN") or "LN")
    attn_norm = None if layout in ("post_norm", None) else ("RMS" if norm.startswith("RMS") else "LN")
    notes = []
    cap = float(getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0)
    if cap > 0:
        notes.append(f"attention logits soft-capped at {cap:g} (patterns are read after it)")
    window = getattr(hf_cfg, "sliding_window", None) if hf_cfg is not None else None
    if window:
        notes.append(f"sliding-window attention ({window} tokens; patterns are read with the window applied)")
    out_cap = float(getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0)
    if out_cap > 0:
        notes.append(f"final logits soft-capped at {out_cap:g} (direct logit effects are before the cap)")
    return ModelSpec(
        family=family, kind=kind, n_layers=int(cfg.n_layers), n_heads=n_heads, n_kv_heads=n_kv,
        d_head=int(cfg.d_head), d_model=int(cfg.d_model), has_b_O=attn0.b_O is not None,
        has_b_V=attn0.b_V is not None, layout=layout, layout_note=note, attn_norm=attn_norm,
        norm_weight_offset=offset, bridge_attn_out=bridge_out, tokens=tokens, new_weights=new_weights,
        notes=tuple(notes),
    )


def _probe_layout(model, tokens: TokenPolicy, offset: float) -> tuple[Layout | None, str, BridgeAttnOut]:
    """Which residual identity block 0 satisfies, on one short prompt."""
    n_vocab = int(model.cfg.d_vocab)
    ids = [i % n_vocab for i in range(7, 13)]
    row = torch.tensor([tokens.wrap(ids)], device=next(model.parameters()).device)
    b = model.blocks[0]
    names = {
        "pre": "blocks.0.hook_resid_pre", "post": "blocks.0.hook_resid_post", "a": ATTN_OUT_HOOK.format(layer=0),
        "m": "blocks.0.hook_mlp_out", "bridge": "blocks.0.hook_attn_out",
        "ln1_in": "blocks.0.ln1.hook_in", "ln1_out": "blocks.0.ln1.hook_out", "ln1_n": "blocks.0.ln1.hook_normalized",
        "ln2_in": "blocks.0.ln2.hook_in", "ln2_out": "blocks.0.ln2.hook_out",
    }
    if hasattr(b, "ln1_post"):
        names["a_post"] = "blocks.0.ln1_post.hook_out"
    missing = [n for k, n in names.items() if n not in model.hook_dict and k in ("pre", "post", "a", "m")]
    if missing:
        return None, f"it has no hook(s) {missing}", "unknown"
    wanted = {n for n in names.values() if n in model.hook_dict}
    with torch.inference_mode():
        _, cache = model.run_with_cache(row, names_filter=lambda n: n in wanted)
    c = {k: cache[n].double() for k, n in names.items() if n in cache}
    scale = max(1.0, float(c["post"].abs().max()))
    tol = 1e3 * torch.finfo(cache[names["post"]].dtype).eps * scale

    def close(x: torch.Tensor, y: torch.Tensor) -> bool:
        return float((x - y).abs().max()) <= tol

    layout: Layout | None = None
    if close(c["post"], c["pre"] + c["a"] + c["m"]):
        layout = "pre_norm"
    elif "a_post" in c and close(c["post"], c["pre"] + c["a_post"] + c["m"]):
        layout = "sandwich"
    elif all(k in c for k in ("ln1_in", "ln1_out", "ln2_in", "ln2_out")) and close(c["ln1_in"], c["pre"] + c["a"]) \
            and close(c["ln2_in"], c["ln1_out"] + c["m"]) and close(c["post"], c["ln2_out"]):
        layout = "post_norm"
    if layout is None:
        return None, "block 0's output is neither resid + attn_out + mlp_out, nor a sandwich or post-norm block", "unknown"
    bridge: BridgeAttnOut = "unknown"
    if "bridge" in c:
        if close(c["bridge"], c["a"]):
            bridge = "attn_output"
        elif "a_post" in c and close(c["bridge"], c["a_post"]):
            bridge = "post_attn_norm"
        elif "ln1_out" in c and close(c["bridge"], c["ln1_out"]):
            bridge = "post_ln_residual"
    if layout != "post_norm" and "ln1_n" in c:
        w, bias = b.ln1.weight, getattr(b.ln1, "bias", None)
        expect = c["ln1_n"] * (w.detach().double() + offset) + (bias.detach().double() if bias is not None else 0.0)
        if not close(c["ln1_out"], expect):
            return None, "its attention norm is not normalized * (offset + weight) + bias", bridge
        if not close(c["ln1_in"], c["pre"]):
            return None, "its attention norm does not read the residual stream", bridge
    return layout, "", bridge
