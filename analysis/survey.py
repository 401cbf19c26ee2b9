"""The head survey, defined: which features each head computes, and whether a head is polysemantic.

Kissane et al. (2024, section 4.1) list each head's top features by decoder-norm share and read them by hand;
they report that at least 90% of GPT-2 small's heads are polysemantic. To make that a number a script
computes, the criterion is stated here and used by ``sae-lens-attn analyze``:

* A feature **belongs to** head h when it is alive (fired on the statistics' tokens) and its decoder-norm
  share on h (:func:`~.heads.head_shares`) is at least :data:`SHARE` = 0.5, i.e. more of its decoder row
  lies in h's block than in all other heads' blocks together. Each feature belongs to at most one head.
* A feature's **role** in its head is where the head reads it from, the source position of its largest
  positive DFA through that head (:func:`~.dfa.dfa_by_source`) on the feature's top-activating examples
  (at most :data:`N_EXAMPLES`), as the majority over them of: ``start`` (the row's first token, an attention
  sink), ``self`` (the token itself), ``previous`` (the token before), ``copy`` (the token right after an
  earlier occurrence of the current token: induction), ``local`` (another of the 8 tokens before) and
  ``distant`` (further back). These are the head behaviours circuit studies name (previous-token, induction,
  local-context heads).
* A head is **polysemantic** when its features have at least two roles that each hold at least
  :data:`MIN_ROLE_SHARE` = 20% of them (at least one feature); **monosemantic** otherwise (one role, give or
  take a few features); **no features** when none belong to it.

Hook_z SAEs only (the decoder has head blocks); other sites are refused (weight-based attribution needs head
blocks).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sae_lens_attn.errors import InputError
from sae_lens_attn.models import model_device
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site
from sae_lens_attn.spec import model_spec

from ._common import head_encoder, run_cache, sae_site
from .features import FeatureStats
from .heads import head_shares

#: A feature belongs to the head holding at least this share of its decoder norm.
SHARE = 0.5
#: Top-activating examples per feature whose DFA sources decide its role.
N_EXAMPLES = 8
#: A role counts towards polysemanticity when it holds at least this share of the head's features.
MIN_ROLE_SHARE = 0.2
ROLES = ("start", "self", "previous", "copy", "local", "distant")


@dataclass
class HeadRoles:
    """One head's features and their roles."""

    layer: int
    head: int
    features: list[int] = field(default_factory=list)
    """Features that belong to the head, by decreasing share."""
    roles: dict[int, str] = field(default_factory=dict)
    """Each feature's role (see the module docstring)."""
    labels: dict[int, str] = field(default_factory=dict)
    """A few words per feature (its top tokens), when a describer was given."""

    @property
    def counts(self) -> Counter:
        return Counter(self.roles.values())

    @property
    def verdict(self) -> str:
        if not self.features:
            return "no features"
        n = len(self.features)
        big = [r for r, c in self.counts.items() if c >= max(1, MIN_ROLE_SHARE * n)]
        return "polysemantic" if len(big) >= 2 else "monosemantic"


def source_role(tokens: torch.Tensor, t: int, s: int) -> str:
    """The relation of source position ``s`` to destination ``t`` in one row of ``tokens``."""
    if s == 0:
        return "start"
    if s == t:
        return "self"
    if s == t - 1:
        return "previous"
    if s < t and int(tokens[s - 1]) == int(tokens[t]):
        return "copy"
    return "local" if 0 < t - s <= 8 else "distant"


class _Sources:
    """The SAE layer's attention patterns and value vectors on the statistics' rows (one forward pass)."""

    def __init__(self, model, sae: SAE, site: Site, rows: torch.Tensor):
        L = site.layer
        names = [f"blocks.{L}.attn.hook_pattern", f"blocks.{L}.attn.hook_v"]
        cache = run_cache(model, rows.to(model_device(model)), names, stop_at_layer=L + 1)
        self.pattern = cache[names[0]].cpu()  # [row, head, q, k]
        self.v = model_spec(model).per_query_head(cache[names[1]].cpu(), 2)  # [row, k, head, d_head]
        self.model, self.sae, self.site, self.rows = model, sae, site, rows

    def role(self, stats: FeatureStats, feature: int, head: int) -> str:
        """The majority source role of ``feature`` through ``head`` on its top examples."""
        examples = stats.top_examples(feature, N_EXAMPLES)
        if not examples:
            return "distant"
        e = head_encoder(self.model, self.sae, self.site, [feature]).W[head, :, 0].cpu()  # [d_head]
        votes = []
        for ex in examples:
            per_src = self.pattern[ex.row, head, ex.pos] * (self.v[ex.row, :, head] @ e)  # DFA by source
            votes.append(source_role(self.rows[ex.row], ex.pos, int(per_src.argmax())))
        return Counter(votes).most_common(1)[0][0]


@torch.no_grad()
def head_roles(
    model,
    sae: SAE,
    stats: FeatureStats,
    site: Site | None = None,
    describe: Callable[[int], str] | None = None,
    share: float = SHARE,
) -> list[HeadRoles]:
    """The survey of every head of the SAE's layer (see the module docstring); ``stats`` from
    :func:`~.features.feature_stats` over all features, with its token rows kept."""
    site = sae_site(sae, site)
    if stats.rows is None:
        raise InputError("the head survey needs feature statistics computed from one token tensor (stats.rows)")
    n_heads = int(model.cfg.n_heads)
    shares = head_shares(sae, n_heads, site).cpu()
    alive = torch.zeros(shares.shape[0], dtype=torch.bool)
    alive[stats.features] = stats.fire_count > 0
    best, top = shares.argmax(-1), shares.max(-1).values
    sources = _Sources(model, sae, site, stats.rows)
    out = []
    for h in range(n_heads):
        mine = ((best == h) & (top >= share) & alive).nonzero()[:, 0]
        mine = mine[shares[mine, h].argsort(descending=True)].tolist()
        report = HeadRoles(site.layer, h, mine)
        for f in mine:
            report.roles[f] = sources.role(stats, f, h)
            if describe is not None:
                report.labels[f] = describe(f)
        out.append(report)
    return out


def format_head_roles(reports: list[HeadRoles], per_role: int = 2) -> str:
    """Plain text: the verdict per head, its features' roles, and examples of each role."""
    with_feats = [r for r in reports if r.features]
    n_poly = sum(r.verdict == "polysemantic" for r in with_feats)
    lines = [f"{n_poly} of {len(with_feats)} heads with features are polysemantic (>= 2 roles with >= "
             f"{MIN_ROLE_SHARE:.0%} of the head's features; a feature belongs to a head at decoder-norm share >= {SHARE}; "
             "role = where its DFA through the head comes from)"]
    for r in reports:
        counts = ", ".join(f"{role} {c}" for role, c in r.counts.most_common())
        lines.append(f"  L{r.layer}H{r.head}: {r.verdict}: {len(r.features)} features ({counts or 'none'})")
        for role, _ in r.counts.most_common(3):
            feats = [f for f in r.features if r.roles[f] == role][:per_role]
            shown = "; ".join(f"#{f} {r.labels.get(f, '')}".strip() for f in feats)
            lines.append(f"      {role}: {shown}")
    return "\n".join(lines)
