"""SAEs attached to a booted model, with hook points of their own (as SAELens' ``HookedSAETransformer``).

Inside ``with attach_saes(model, [sae_l0, sae_l1]) as hooked:`` every SAE sits at its site (read and written
where :meth:`~sae_lens_attn.spec.ModelSpec.capture_hook` says: ``hook_z``, or the attention output
projection for ``attn_out``) and exposes hook points named under the site's SAELens hook name::

    blocks.1.attn.hook_z.hook_sae_input       the site's activation, flattened to [batch, pos, d_in]
    blocks.1.attn.hook_z.hook_sae_acts_pre    the SAE's (linear) pre-activations [batch, pos, d_sae]
    blocks.1.attn.hook_z.hook_sae_acts_post   the feature activations [batch, pos, d_sae]
    blocks.1.attn.hook_z.hook_sae_recons      the reconstruction from (possibly edited) features
    blocks.1.attn.hook_z.hook_sae_error       x - reconstruction of the unedited features
    blocks.1.attn.hook_z.hook_sae_output      what the site carries on: recons (+ error with the error term)

They work with the bridge's ``run_with_cache``, ``run_with_hooks``, ``hooks`` and ``generate``; all of
them are removed on exit, also on error. ``use_error_term=True`` keeps the model's output exactly as without
the SAE until a hook edits the features (the error is computed from the unedited features, as in SAELens);
``False`` replaces the site by the reconstruction. Structural tokens of the tokenization policy (BOS, CLS,
SEP) keep their clean activation either way (the SAEs never saw them); their features are still computed and
hooked. Hooks a caller adds on the site's own hook (``blocks.1.attn.hook_z``) inside the block see the
SAE's output, since the SAE's hook was added first.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from transformer_lens.hook_points import HookPoint

from .activations import check_sites
from .errors import InputError
from .models import model_device
from .sae import SAE
from .sites import Site
from .spec import model_spec

HOOK_NAMES = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
              "hook_sae_output")


def site_of(sae: SAE) -> Site:
    """The site an SAE reads, from its ``metadata.hook_name`` / ``hook_head_index``."""
    meta = sae.cfg.metadata or {}
    hook = meta.get("hook_name")
    if not hook:
        raise InputError("the SAE's metadata has no hook_name; attach it as {Site(layer, kind): sae}")
    return Site.parse(str(hook), head=meta.get("hook_head_index"))


class SAEHookPoints:
    """The hook points of one attached SAE (attributes named as :data:`HOOK_NAMES`)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.points: dict[str, HookPoint] = {}
        for name in HOOK_NAMES:
            hp = HookPoint()
            hp.name = f"{prefix}.{name}"
            self.points[hp.name] = hp
            setattr(self, name, hp)


@dataclass
class Attached:
    """One SAE at one site."""

    site: Site
    sae: SAE
    hooks: SAEHookPoints

    def name(self, hook: str) -> str:
        """The full hook name, e.g. ``name("hook_sae_acts_post")``."""
        return f"{self.hooks.prefix}.{hook}"


class HookedSAEs:
    """What :func:`attach_saes` yields: the attached SAEs by site, and their hook names."""

    def __init__(self, model, attached: list[Attached]):
        self.model = model
        self.attached = attached

    def __getitem__(self, site: Site | str) -> Attached:
        site = Site.parse(site) if isinstance(site, str) else site
        for a in self.attached:
            if a.site == site:
                return a
        raise KeyError(f"no SAE attached at {site} (attached: {[a.site.label for a in self.attached]})")

    @property
    def acts_names(self) -> list[str]:
        """``<site>.hook_sae_acts_post`` of every attached SAE (for ``run_with_cache(names_filter=...)``)."""
        return [a.name("hook_sae_acts_post") for a in self.attached]

    @torch.no_grad()
    def features(self, tokens) -> dict[Site, torch.Tensor]:
        """Every attached SAE's feature activations [batch, pos, d_sae] from one forward pass."""
        names = set(self.acts_names)
        _, cache = self.model.run_with_cache(torch.as_tensor(tokens).to(model_device(self.model)),
                                             names_filter=lambda n: n in names)
        return {a.site: cache[a.name("hook_sae_acts_post")] for a in self.attached}


def _as_pairs(saes) -> list[tuple[Site, SAE]]:
    if isinstance(saes, SAE):
        return [(site_of(saes), saes)]
    if isinstance(saes, Mapping):
        return [(Site.parse(s) if isinstance(s, str) else s, sae) for s, sae in saes.items()]
    return [(site_of(s), s) for s in saes]


@contextmanager
def attach_saes(model, saes: SAE | Sequence[SAE] | Mapping[Site, SAE], use_error_term: bool = False) -> Iterator[HookedSAEs]:
    """Attach one or several SAEs (each at its metadata's site, or ``{Site: sae}``) for the ``with`` block."""
    pairs = _as_pairs(saes)
    sites = [s for s, _ in pairs]
    if len(set(sites)) != len(sites):
        raise InputError(f"two SAEs for one site: {[s.label for s in sites]}")
    check_sites(model, sites)
    for site, sae in pairs:
        sae.check_site(site, model.cfg)
    spec = model_spec(model)
    attached = [Attached(site, sae, SAEHookPoints(site.hook_name)) for site, sae in pairs]
    current: dict[str, torch.Tensor] = {}

    def remember_tokens(t: torch.Tensor, hook) -> None:
        current["tokens"] = t

    fwd = [("embed.hook_in", remember_tokens)] if "embed.hook_in" in model.hook_dict else []
    for a in attached:
        fwd.append((spec.capture_hook(a.site), _site_hook(a, use_error_term, spec, current)))
    registry = model._hook_registry
    clash = [n for a in attached for n in a.hooks.points if n in registry]
    if clash:
        raise InputError(f"hook points {clash} already exist: another attach_saes block is open on these sites")
    with ExitStack() as stack:
        for a in attached:
            registry.update(a.hooks.points)
            stack.callback(lambda a=a: [registry.pop(n, None) for n in a.hooks.points])
        stack.enter_context(model.hooks(fwd_hooks=fwd))
        yield HookedSAEs(model, attached)


def _site_hook(a: Attached, use_error_term: bool, spec, current: dict):
    sae, site, h = a.sae, a.site, a.hooks

    def hook(tensor: torch.Tensor, hook) -> torch.Tensor:
        flat = site.flatten(tensor)
        x = h.hook_sae_input(flat.to(sae.W_enc.device, sae.W_enc.dtype))
        h.hook_sae_acts_pre(sae.encode_pre(x))
        clean = sae.encode(x)
        acts = h.hook_sae_acts_post(clean.clone())  # a hook may edit it in place; the error uses the clean one
        recons = h.hook_sae_recons(sae.decode(acts))
        error = h.hook_sae_error(x - sae.decode(clean))
        out = h.hook_sae_output(recons + error if use_error_term else recons).to(flat.dtype)
        toks = current.get("tokens")
        if toks is not None and toks.shape == flat.shape[:2]:
            keep = spec.tokens.keep(toks.to(out.device))
            out = torch.where(keep[..., None], out, flat.to(out.device))
        return site.unflatten(out.to(flat.device), tensor)

    return hook
