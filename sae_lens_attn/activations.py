"""One model pass feeds many sites: activations (and optionally dL/d activation) as flat token batches.

* :func:`harvest` runs the model once on token rows and returns every requested site's activations as
  ``[rows, pos, d_in]``. When no gradient is needed the pass stops as soon as the last requested hook has
  fired (the rest of that layer, the later layers, the final norm and the unembedding never run).
* With ``with_grad=True`` it also returns ``dL/dx`` at each site for the model kind's own loss, summed
  (:mod:`sae_lens_attn.objective`: next-token cross-entropy for causal LMs; for encoders the masked-token
  loss, so the activations then come from the masked input), the model's parameters untouched (they are
  frozen by ``load_model``) and the gradients detached.
* Sites are read where :meth:`~sae_lens_attn.spec.ModelSpec.capture_hook` says (``attn_out`` at the output
  projection on every family), and the mask drops the tokenization policy's structural tokens.
* :mod:`sae_lens_attn.stream` turns token rows into shuffled training batches through :func:`harvest`.
* :func:`splice` is the context manager evals and analysis use to replace a site's activation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from jaxtyping import Float, Int

from .errors import InputError, UserError
from .models import model_device
from .objective import loss_input, token_losses
from .sites import Site
from .spec import UnsupportedModelError, model_spec


class NonFiniteActivationError(UserError, FloatingPointError):
    """NaN or inf in a harvested activation: names the site and the first bad row."""


class Harvest(NamedTuple):
    acts: dict[Site, Float[torch.Tensor, "rows pos d_in"]]
    """Each site's activations, heads flattened by the Site."""
    grads: dict[Site, Float[torch.Tensor, "rows pos d_in"]] | None
    """dL/dx at each site (L: the model kind's loss summed over positions), or None."""
    mask: torch.Tensor
    """[rows, pos] True where the token is kept (not a structural token of the policy, when those are dropped)."""


class _StopForward(Exception):
    """Raised by the last capture hook of a gradient-free harvest to end the model's forward pass there."""


class SiteBatch(NamedTuple):
    acts: Float[torch.Tensor, "batch d_in"]
    grads: Float[torch.Tensor, "batch d_in"] | None


def check_sites(model, sites: Sequence[Site]) -> None:
    if not sites:
        raise InputError("no sites given")
    spec = model_spec(model)
    for site in sites:
        site.validate(model.cfg)
        hook = spec.capture_hook(site)
        if hook not in model.hook_dict:
            raise UnsupportedModelError(
                f"site {site.label}: this {spec.family} model has no hook {hook!r} (the attention block's "
                f"{'output projection' if site.kind == 'attn_out' else 'per-head output'}), so the site cannot be read"
            )


def _check_finite(site: Site, t: torch.Tensor, what: str = "activations") -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).flatten(1).any(1).nonzero()[0].item()
        raise NonFiniteActivationError(
            f"NaN/inf {what} at site {site.label} ({site.hook_name}), first in row {bad}: check the model's "
            "dtype (try --dtype float32) and the input tokens"
        )


def harvest(
    model,
    tokens: Int[torch.Tensor, "rows pos"],
    sites: Sequence[Site],
    with_grad: bool = False,
    drop_bos: bool = True,
) -> Harvest:
    """Run ``model`` once on ``tokens`` and capture every site (and dL/dx at it, with ``with_grad``)."""
    check_sites(model, sites)
    spec = model_spec(model)
    if with_grad and spec.lm_refusal:
        raise UnsupportedModelError(f"gradients of the model's loss are refused: {spec.lm_refusal}")
    tokens = tokens.to(model_device(model))
    hook_of = {s: spec.capture_hook(s) for s in sites}
    capture = _Capture(sorted(set(hook_of.values())), with_grad)
    with model.hooks(fwd_hooks=capture.hooks()):
        if with_grad:
            grads_raw = _loss_gradients(model, tokens, spec, capture.deltas)
        else:
            _forward_until_captured(model, tokens, sites)
    capture.check_fired()
    acts = _site_vectors(sites, hook_of, capture.raw, "activations")
    grads = None
    if with_grad:
        grads = _site_vectors(sites, hook_of, {n: g.detach() for n, g in grads_raw.items()}, "gradients")
    mask = spec.tokens.keep(tokens) if drop_bos else torch.ones_like(tokens, dtype=torch.bool)
    return Harvest(acts, grads, mask)


class _Capture:
    """The capture hooks of one harvest: each hook's activation (``raw``) and, with ``with_grad``, the zero
    ``delta`` added at it (``deltas``), keyed by our hook name."""

    def __init__(self, hook_names: list[str], with_grad: bool):
        self.hook_names, self.with_grad = hook_names, with_grad
        self.raw: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        self.wanted = set(hook_names)

    def hooks(self) -> list[tuple[str, Callable]]:
        return [(name, functools.partial(self.capture, name=name)) for name in self.hook_names]

    def capture(self, tensor: torch.Tensor, hook, name: str) -> torch.Tensor | None:
        # ``hook.name`` may be the canonical name of an alias (hook_z is o.hook_in in the bridge): key by ours.
        if self.with_grad:
            # A zero "delta" added at the site: dL/d(delta) = dL/d(activation), and the graph is kept whole,
            # so the gradient at an early site still flows through later sites.
            delta = torch.zeros_like(tensor, requires_grad=True)
            self.deltas[name] = delta
            self.raw[name] = tensor.detach()
            return tensor + delta
        self.raw[name] = tensor.detach()
        if self.wanted.issubset(self.raw):
            # Everything is captured. TransformerBridge's ``stop_at_layer`` still runs the whole last layer
            # and, at the model's last layer, the unembedding ([tokens, d_model] x [d_model, vocab], a third
            # of a GPT-2-small pass); ending the pass here skips all of it.
            raise _StopForward
        return None

    def check_fired(self) -> None:
        missing = [n for n in self.hook_names if n not in self.raw]
        if missing:
            raise RuntimeError(f"hooks {missing} did not fire; the model's forward pass skipped them")


def _loss_gradients(model, tokens: torch.Tensor, spec, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full forward pass for the model kind's loss (summed), and its gradient at each capture hook's delta."""
    inp = loss_input(tokens, spec)
    with torch.enable_grad():
        logits = model(inp.tokens, return_type="logits")
        loss = token_losses(logits, inp.targets, dtype=logits.dtype).sum()
        return dict(zip(deltas, torch.autograd.grad(loss, list(deltas.values())), strict=True))


def _forward_until_captured(model, tokens: torch.Tensor, sites: Sequence[Site]) -> None:
    """A gradient-free forward pass that ends once the last capture hook has fired."""
    with torch.inference_mode():
        try:
            model(tokens, return_type=None, stop_at_layer=max(s.layer for s in sites) + 1)
        except _StopForward:
            pass


def _site_vectors(
    sites: Sequence[Site], hook_of: dict[Site, str], tensors: dict[str, torch.Tensor], what: str
) -> dict[Site, torch.Tensor]:
    """Each site's own copy of its hook's tensor, heads flattened, refused when not finite."""
    out = {s: s.flatten(tensors[hook_of[s]]).clone() for s in sites}
    for s, t in out.items():
        _check_finite(s, t, what)
    return out


@contextmanager
def splice(model, site: Site, fn: Callable[[torch.Tensor], torch.Tensor], keep: torch.Tensor | None = None):
    """Replace ``site``'s activation by ``fn(flat)`` (flat: [batch, pos, d_in]) inside the block.

    ``keep``: [batch, pos] bool; positions where it is False keep the clean activation (e.g. BOS, which SAEs
    are not trained on). Hooks are removed on exit, also on error.
    """
    check_sites(model, [site])
    hook_name = model_spec(model).capture_hook(site)

    def hook(tensor: torch.Tensor, hook) -> torch.Tensor:
        flat = site.flatten(tensor)
        new = fn(flat).to(flat.dtype)
        if keep is not None:
            new = torch.where(keep.to(new.device)[..., None], new, flat)
        return site.unflatten(new, tensor)

    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        yield model


def kept_vectors(h: Harvest, sites: Sequence[Site]) -> dict[Site, SiteBatch]:
    """One harvest as flat CPU [tokens, d_in] vectors per site, only the positions its mask keeps."""
    keep = h.mask.reshape(-1).cpu()

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1]).cpu()[keep]

    return {s: SiteBatch(flat(h.acts[s]), flat(h.grads[s]) if h.grads is not None else None) for s in sites}


def harvest_all(
    model,
    rows: Int[torch.Tensor, "rows pos"],
    sites: Sequence[Site],
    *,
    model_batch_rows: int = 32,
    with_grad: bool = False,
    drop_bos: bool = True,
) -> dict[Site, SiteBatch]:
    """Every kept token's activation (and gradient) at every site, as CPU tensors [tokens, d_in]."""
    acts: dict[Site, list[torch.Tensor]] = {s: [] for s in sites}
    grads: dict[Site, list[torch.Tensor]] = {s: [] for s in sites}
    for start in range(0, rows.shape[0], model_batch_rows):
        kept = kept_vectors(harvest(model, rows[start : start + model_batch_rows], sites, with_grad, drop_bos), sites)
        for s in sites:
            acts[s].append(kept[s].acts)
            if with_grad:
                grads[s].append(kept[s].grads)
    return {s: SiteBatch(torch.cat(acts[s]), torch.cat(grads[s]) if with_grad else None) for s in sites}


def epoch_batches(
    data: dict[Site, SiteBatch], batch_size: int, seed: int = 0, device: str | torch.device = "cpu"
) -> Iterator[dict[Site, SiteBatch]]:
    """Endless shuffled batches over activations held in memory (a fresh permutation every epoch)."""
    n = next(iter(data.values())).acts.shape[0]
    if n < batch_size:
        raise InputError(f"only {n} activation vectors, fewer than one batch of {batch_size}; use more text")
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen)
        for b in range(n // batch_size):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            yield {
                s: SiteBatch(d.acts[idx].to(device), d.grads[idx].to(device) if d.grads is not None else None)
                for s, d in data.items()
            }
