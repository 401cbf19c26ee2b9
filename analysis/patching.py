"""Which heads a behaviour runs through: per-head activation patching and path patching (Wang et al. 2022).

Both are *noising* experiments on a clean prompt and its corruption of the same length (e.g.
:func:`~.ioi.corrupt_ioi`): a head's output ``z`` (its ``hook_z`` slice, before ``W_O``) is set to its value on
the corrupted prompt and the metric is read again. The effect is normalised by the clean-corrupted gap,

    effect = (m_patched - m_clean) / (m_clean - m_corrupted),

so -1 means "patching this head alone removes the whole gap", 0 "no effect", and a positive value means the
head works *against* the behaviour on the clean prompt (a negative name mover, in IOI).

Path patching (Wang et al. 2022, section 3.1 and appendix B) separates roles: the sender head is patched,
every other head's output is frozen at its clean value, so the corruption reaches the receivers only along
sender -> (MLPs) -> receiver; the receivers' inputs (query, key, value, or whole output) from that run are then
patched into a clean run, and everything downstream of the receivers computes normally. Frozen heads make the
effect a *path* effect: a duplicate-token head that matters only by moving S-inhibition heads' queries shows
up with those heads as receivers and not elsewhere.

Grouped-query models share a key/value head among several query heads: patching a receiver's ``k`` or ``v``
patches its whole group (all query heads reading that key/value head), which :func:`path_patching` says in
the returned record; ``q`` and ``z`` are per query head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float, Int

from sae_lens_attn.errors import InputError
from sae_lens_attn.models import model_device
from sae_lens_attn.spec import Z_HOOK, model_spec

from .circuits import Positions, position_mask

Metric = Callable[[Float[torch.Tensor, "batch pos vocab"]], Float[torch.Tensor, " batch"]]
"""Per-prompt metric of the logits (e.g. ``lambda lg: logit_diff(lg, data, per_prompt=True)``)."""
Head = tuple[int, int]
ReceiverInput = Literal["q", "k", "v", "z"]


class HeadPatching(NamedTuple):
    effect: Float[torch.Tensor, "n_layers n_heads"]
    """(m_patched - m_clean) / (m_clean - m_corrupted), metric averaged over prompts; NaN for layers skipped."""
    patched: Float[torch.Tensor, "n_layers n_heads"]
    """The metric itself with each head patched (mean over prompts)."""
    clean_metric: float
    corrupted_metric: float


def _z_hook(layer: int) -> str:
    return Z_HOOK.format(layer=layer)  # the spec's one name for a layer's hook_z (what Site(layer) reads)


def _check_pair(clean: torch.Tensor, corrupted: torch.Tensor) -> None:
    if clean.shape != corrupted.shape:
        raise InputError(f"clean and corrupted tokens must have one shape, got {tuple(clean.shape)} and "
                         f"{tuple(corrupted.shape)}; corrupt each prompt without changing its length")


@torch.no_grad()
def _clean_corrupted(model, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric) -> tuple[float, float, float]:
    """The mean metric on the clean and on the corrupted prompts, and their gap (refused when there is none)."""
    clean_m = float(metric(model(clean, return_type="logits")).mean())
    corr_m = float(metric(model(corrupted, return_type="logits")).mean())
    gap = clean_m - corr_m
    if abs(gap) < 1e-6:
        raise InputError(f"the metric is {clean_m:.4g} on the clean and {corr_m:.4g} on the corrupted prompts: no gap "
                         "to normalise by; choose a corruption that changes the behaviour")
    return clean_m, corr_m, gap


@torch.no_grad()
def cache_z(model, tokens: Int[torch.Tensor, "batch pos"], layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """``hook_z`` ([batch, pos, n_heads, d_head]) at ``layers`` from one forward pass."""
    names = {_z_hook(layer) for layer in layers}
    _, cache = model.run_with_cache(tokens.to(model_device(model)), names_filter=lambda n: n in names)
    return {layer: cache[_z_hook(layer)].detach() for layer in layers}


@torch.no_grad()
def head_patching(
    model,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Metric,
    positions: Positions = None,
    layers: Sequence[int] | None = None,
) -> HeadPatching:
    """Patch each head's ``z`` at ``positions`` (all when None) from the corrupted run into the clean run.

    One forward pass per layer: the batch is repeated once per head, copy ``h`` patching head ``h``.
    """
    _check_pair(clean, corrupted)
    dev = model_device(model)
    clean, corrupted = clean.to(dev), corrupted.to(dev)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    layers = list(range(n_layers)) if layers is None else list(layers)
    clean_m, corr_m, gap = _clean_corrupted(model, clean, corrupted, metric)
    z_corr = cache_z(model, corrupted, layers)
    mask = position_mask(positions, clean)
    b = clean.shape[0]
    patched = torch.full((n_layers, n_heads), float("nan"))
    rep = clean.repeat(n_heads, 1)
    for layer in layers:
        def hook(z: torch.Tensor, hook, layer=layer) -> torch.Tensor:
            z = z.clone()
            for h in range(n_heads):
                rows = slice(h * b, (h + 1) * b)
                z[rows, :, h] = torch.where(mask[..., None], z_corr[layer][:, :, h], z[rows, :, h])
            return z

        with model.hooks(fwd_hooks=[(_z_hook(layer), hook)]):
            logits = model(rep, return_type="logits")
        for h in range(n_heads):
            patched[layer, h] = float(metric(logits[h * b : (h + 1) * b]).mean())
    return HeadPatching((patched - clean_m) / gap, patched, clean_m, corr_m)


class PathPatching(NamedTuple):
    effect: Float[torch.Tensor, "n_layers n_heads"]
    """Per sender head: (m_path - m_clean) / (m_clean - m_corrupted); NaN for heads not tried as senders."""
    receivers: list[Head]
    receiver_input: str
    patched_heads: list[Head]
    """The query heads whose input was actually patched (with ``k``/``v`` on a grouped-query model: every head
    of the receivers' key/value groups)."""
    clean_metric: float
    corrupted_metric: float


def _receiver_hooks(model, receivers: Sequence[Head], what: ReceiverInput) -> tuple[dict[int, list[int]], list[Head]]:
    """Per layer, the indices along the head axis of ``hook_{what}`` to patch, and the query heads affected."""
    spec = model_spec(model)
    kv_of = spec.kv_index().tolist()  # query head -> its key/value head
    per_layer: dict[int, list[int]] = {}
    heads: list[Head] = []
    for layer, h in receivers:
        if what in ("k", "v") and spec.n_kv_heads != spec.n_heads:
            idx = kv_of[h]
            heads += [(layer, q) for q in range(spec.n_heads) if kv_of[q] == idx]
        else:
            idx = h
            heads.append((layer, h))
        per_layer.setdefault(layer, [])
        if idx not in per_layer[layer]:
            per_layer[layer].append(idx)
    return per_layer, sorted(set(heads))


def _input_hook(layer: int, what: ReceiverInput) -> str:
    return _z_hook(layer) if what == "z" else f"blocks.{layer}.attn.hook_{what}"


@torch.no_grad()
def _record_receivers(model, clean, z_clean, z_corr, mask, sender: Head, recv: dict[int, list[int]],
                      what: ReceiverInput) -> dict[int, torch.Tensor]:
    """Step 2: clean run, sender patched, every other head frozen at clean (receivers recompute); the
    receivers' inputs recorded."""
    got: dict[int, torch.Tensor] = {}
    hooks = []
    for layer, z_c in z_clean.items():
        def freeze(z: torch.Tensor, hook, layer=layer, z_c=z_c) -> torch.Tensor:
            new = z_c.clone()
            if layer == sender[0]:
                h = sender[1]
                new[:, :, h] = torch.where(mask[..., None], z_corr[:, :, h], z_c[:, :, h])
            if what == "z":
                for h in recv.get(layer, []):
                    new[:, :, h] = z[:, :, h]
            return new
        hooks.append((_z_hook(layer), freeze))
    for layer in recv:
        def record(t: torch.Tensor, hook, layer=layer) -> torch.Tensor:
            got[layer] = t.detach().clone()
            return t
        hooks.append((_input_hook(layer, what), record))
    last = max(recv)
    with model.hooks(fwd_hooks=hooks):
        model(clean, return_type="logits", stop_at_layer=last + 1)
    return got


@torch.no_grad()
def path_patching(
    model,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Metric,
    receivers: Sequence[Head],
    receiver_input: ReceiverInput = "q",
    senders: Sequence[Head] | None = None,
    positions: Positions = None,
) -> PathPatching:
    """Path-patching effect of each sender head (every head in a layer before the last receiver when None)
    through ``receivers``' ``receiver_input`` on ``metric``. ``positions``: where the sender is patched."""
    _check_pair(clean, corrupted)
    if receiver_input not in ("q", "k", "v", "z"):
        raise InputError(f"receiver_input must be 'q', 'k', 'v' or 'z', got {receiver_input!r}")
    if not receivers:
        raise InputError("path patching needs at least one receiver head (layer, head)")
    dev = model_device(model)
    clean, corrupted = clean.to(dev), corrupted.to(dev)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    recv, patched_heads = _receiver_hooks(model, receivers, receiver_input)
    last = max(recv)
    if senders is None:
        senders = [(layer, h) for layer in range(max(recv)) for h in range(n_heads)]
    for s_layer, _ in senders:
        if s_layer >= min(recv):
            raise InputError(f"sender layer {s_layer} is not before every receiver (first receiver layer {min(recv)}); "
                             "pass senders in earlier layers")
    clean_m, corr_m, gap = _clean_corrupted(model, clean, corrupted, metric)
    layers = list(range(last + 1))
    z_clean, z_corr = cache_z(model, clean, layers), cache_z(model, corrupted, layers)
    mask = position_mask(positions, clean)
    effect = torch.full((n_layers, n_heads), float("nan"))
    for sender in senders:
        got = _record_receivers(model, clean, z_clean, z_corr[sender[0]], mask, sender, recv, receiver_input)
        hooks = []
        for layer, idx in recv.items():
            def put(t: torch.Tensor, hook, new=got[layer], idx=idx) -> torch.Tensor:
                t = t.clone()
                t[:, :, idx] = new[:, :, idx]
                return t
            hooks.append((_input_hook(layer, receiver_input), put))
        with model.hooks(fwd_hooks=hooks):
            m = float(metric(model(clean, return_type="logits")).mean())
        effect[sender] = (m - clean_m) / gap
    return PathPatching(effect, list(receivers), receiver_input, patched_heads, clean_m, corr_m)


def top_heads(effect: Float[torch.Tensor, "n_layers n_heads"], n: int = 10, sign: int = -1) -> list[tuple[int, int, float]]:
    """The ``n`` heads with the most negative (``sign=-1``) or most positive (``+1``) effect, as (layer, head, effect)."""
    e = torch.nan_to_num(effect * sign, nan=float("-inf"))
    order = e.flatten().argsort(descending=True)[:n]
    nh = effect.shape[1]
    return [(int(i) // nh, int(i) % nh, float(effect.flatten()[i])) for i in order]
