"""The explorer's state and its JSON, computed from the Python API without any HTTP.

:class:`ExplorerSession` holds one model and the SAEs being explored (any sites, any architectures), keeps
the last few prompts' activations, and answers every question the web page asks as plain JSON-ready
dicts (the server only routes them):

* :meth:`~ExplorerSession.analyze` -- the prompt tokenized by the project's policy, every SAE's features on
  every token (one model pass that stops after the last SAE's site; every feature encoded densely, as
  ``sae.encode`` does), the top features per token with their activation and their top head by DFA, the
  strongest feature per token, and the SAE's reconstruction error per token;
* :meth:`~ExplorerSession.activations` -- one chosen feature's activation on every token;
* :meth:`~ExplorerSession.feature` -- one feature at one token (see :mod:`.detail`);
* :meth:`~ExplorerSession.qk` -- why a head attends from a token to a source (see :mod:`.qk`);
* :meth:`~ExplorerSession.steer` -- next-token distribution and greedy continuation with a feature added
  (see :mod:`.steer`);
* :meth:`~ExplorerSession.run_analysis` -- a registered analysis on the prompt (see :mod:`.registered`).

Structural tokens of the tokenization policy (BOS, CLS, SEP) are shown but get no features: the SAEs never
saw them (training, statistics and dashboards drop them too). Calls are serialised by a lock: they share
the model, whose hooks are not safe to add from two threads at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import einops
import torch

from sae_lens_attn.activations import harvest
from sae_lens_attn.analysis._common import HeadEncoder, decode_token, head_encoder, sae_site
from sae_lens_attn.analysis.heads import head_shares
from sae_lens_attn.errors import InputError, UserError
from sae_lens_attn.evals import metrics_lines, saved_metrics
from sae_lens_attn.models import model_device, model_name
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site
from sae_lens_attn.spec import model_spec

from .registered import describe as describe_analyses

#: Most top features per token one analyze call returns.
MAX_TOP_K = 64


class UnknownSAEError(UserError, KeyError):
    """An SAE id that is not in the session (the server answers 404)."""


@dataclass
class LoadedSAE:
    """One SAE in the session."""

    id: str
    """Its name in the page and the JSON API: the site label (``L1.z``), made unique with ``#2``, ``#3``."""
    sae: SAE
    site: Site
    path: str | None = None
    """Where it was loaded from (None: given as an object)."""
    dashboard: Path | None = None
    """A dashboard folder for this SAE (``feature_<i>.html`` pages), or None."""
    dashboard_features: frozenset[int] = frozenset()
    """Features that have a page in ``dashboard``."""
    encoder: HeadEncoder | None = field(default=None, repr=False)
    """Its encoder per head for all features (computed on first use)."""
    shares: torch.Tensor | None = field(default=None, repr=False)
    """Decoder-norm share per head [d_sae, n_heads] (hook_z SAEs; computed on first use)."""

    def describe(self) -> dict:
        cfg = self.sae.cfg
        return {"id": self.id, "site": self.site.label, "hook_name": self.site.hook_name, "layer": self.site.layer,
                "kind": self.site.kind, "head": self.site.head, "architecture": self.sae.architecture,
                "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k if self.sae.architecture == "topk" else None,
                "path": self.path, "dashboard": self.dashboard is not None,
                "dashboard_features": len(self.dashboard_features), "evaluation": self._evaluation()}

    def _evaluation(self) -> dict | None:
        """Its evaluation at training, with ``lines``: unreliable CE-recovered ratios marked and explained."""
        saved = saved_metrics(self.sae)
        return None if saved is None else {**saved, "lines": metrics_lines(saved)}

    def page(self, feature: int) -> str | None:
        """The feature's dashboard URL under the server, or None."""
        if self.dashboard is None or int(feature) not in self.dashboard_features:
            return None
        return f"/dashboards/{self.id}/feature_{int(feature)}.html"


class Prompt(NamedTuple):
    """One analysed prompt: its tokens and what the model pass gave."""

    text: str
    tokens: torch.Tensor
    """[1, pos] on the model's device."""
    keep: torch.Tensor
    """[pos] True on text tokens (False on the policy's structural tokens)."""
    x: dict[str, torch.Tensor]
    """Per SAE id: the site's activation [pos, d_in] (float32, on the SAE's device)."""
    acts: dict[str, torch.Tensor]
    """Per SAE id: every feature's activation ``sae.encode(x)`` [pos, d_sae], 0 on structural tokens."""
    z: dict[int, torch.Tensor]
    """Per layer of an SAE: hook_z [pos, n_heads, d_head] (for DFA by head)."""


def dashboard_features(folder: Path) -> tuple[str | None, frozenset[int]]:
    """The site label and feature ids of a dashboard folder written by ``write_dashboards``."""
    meta = folder / "features.json"
    if not meta.exists():
        raise InputError(f"{folder} has no features.json: it is not a dashboard folder (write one with "
                         "`sae-lens-attn dashboard --sae DIR --out FOLDER`)")
    info = json.loads(meta.read_text())
    return info.get("site"), frozenset(int(f) for f in info.get("features", []))


class ExplorerSession:
    """A model and its SAEs, answering the explorer's questions as JSON-ready dicts (see the module doc)."""

    def __init__(self, model, saes: SAE | Sequence[SAE] | Mapping[str, SAE], dashboards: Sequence[str | Path] = (),
                 paths: Sequence[str | None] | None = None, cache_prompts: int = 4):
        self.model = model
        self.spec = model_spec(model)
        items = list(saes.items()) if isinstance(saes, Mapping) else [(None, s) for s in
                                                                       ([saes] if isinstance(saes, SAE) else saes)]
        if not items:
            raise InputError("the explorer needs at least one SAE: pass --sae DIR (repeat it for several layers)")
        paths = list(paths) if paths is not None else [None] * len(items)
        self.saes: dict[str, LoadedSAE] = {}
        for (name, sae), path in zip(items, paths):
            site = sae_site(sae)
            sae.check_site(site, model.cfg)
            sae = sae.to(model_device(model)).requires_grad_(False)
            sid = name or site.label
            n = 2
            while sid in self.saes:
                sid, n = f"{name or site.label}#{n}", n + 1
            self.saes[sid] = LoadedSAE(sid, sae, site, None if path is None else str(path))
        for folder in dashboards:
            self._add_dashboard(Path(folder))
        self.lock = threading.RLock()
        self._prompts: OrderedDict[str, Prompt] = OrderedDict()
        self.cache_prompts = cache_prompts

    def _add_dashboard(self, folder: Path) -> None:
        label, feats = dashboard_features(folder)
        for entry in self.saes.values():
            if entry.site.label == label and entry.dashboard is None:
                entry.dashboard, entry.dashboard_features = folder.resolve(), feats
                return
        raise InputError(f"dashboard folder {folder} is for site {label!r}, but no SAE without a dashboard reads "
                         f"that site (loaded: {[e.site.label for e in self.saes.values()]})")

    # --- helpers ---------------------------------------------------------------------------------------
    def entry(self, sae_id: str) -> LoadedSAE:
        if sae_id not in self.saes:
            raise UnknownSAEError(f"no SAE {sae_id!r} in this session (loaded: {', '.join(self.saes)})")
        return self.saes[sae_id]

    def check_feature(self, entry: LoadedSAE, feature: int) -> int:
        if not 0 <= int(feature) < entry.sae.cfg.d_sae:
            raise InputError(f"feature {feature} is outside {entry.id}'s features 0..{entry.sae.cfg.d_sae - 1}")
        return int(feature)

    def encoder(self, entry: LoadedSAE) -> HeadEncoder:
        if entry.encoder is None:
            entry.encoder = head_encoder(self.model, entry.sae, entry.site)
        return entry.encoder

    def shares(self, entry: LoadedSAE) -> torch.Tensor | None:
        if entry.site.kind != "z":
            return None
        if entry.shares is None:
            entry.shares = head_shares(entry.sae, int(self.model.cfg.n_heads), entry.site).cpu()
        return entry.shares

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        return [decode_token(self.model.tokenizer, int(t)) for t in ids]

    def tokenize(self, text: str) -> list[int]:
        """``text`` by the project's tokenization policy; too long or empty prompts are refused."""
        if not isinstance(text, str):
            raise InputError("the prompt must be a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate, which JSON can escape and no tokenizer encodes
            raise InputError(f"text: character {err.start} is a lone UTF-16 surrogate, not text; send valid "
                             "Unicode") from None
        ids = self.spec.tokens.encode(self.model.tokenizer, text)
        n_ctx = int(self.model.cfg.n_ctx)
        if len(ids) > n_ctx:
            raise InputError(f"the prompt is {len(ids)} tokens; this model reads at most {n_ctx}: shorten it")
        if len(ids) <= self.spec.tokens.n_structural:
            raise InputError("the prompt has no text tokens: type some text")
        return ids

    @torch.no_grad()
    def prompt(self, text: str) -> Prompt:
        """The prompt's tokens and activations (cached for the last ``cache_prompts`` prompts)."""
        with self.lock:
            if text in self._prompts:
                self._prompts.move_to_end(text)
                return self._prompts[text]
            ids = self.tokenize(text)
            tokens = torch.tensor([ids], device=model_device(self.model))
            sites = sorted({e.site for e in self.saes.values()} | {Site(e.site.layer) for e in self.saes.values()},
                           key=lambda s: (s.layer, s.kind, -1 if s.head is None else s.head))
            h = harvest(self.model, tokens, sites, drop_bos=False)
            keep = self.spec.tokens.keep(tokens[0]).cpu()
            x, acts, z = {}, {}, {}
            for e in self.saes.values():
                xi = h.acts[e.site][0].to(e.sae.W_enc.device, e.sae.W_enc.dtype)
                a = e.sae.encode(xi).float()
                x[e.id] = xi.float()
                acts[e.id] = a.masked_fill(~keep.to(a.device)[:, None], 0.0)
                L = e.site.layer
                z[L] = einops.rearrange(h.acts[Site(L)][0].float(), "pos (head d) -> pos head d",
                                        head=int(self.model.cfg.n_heads))
            p = Prompt(text, tokens, keep, x, acts, z)
            self._prompts[text] = p
            while len(self._prompts) > self.cache_prompts:
                self._prompts.popitem(last=False)
            return p

    # --- the JSON API -----------------------------------------------------------------------------------
    def info(self) -> dict:
        """The model and the loaded SAEs."""
        m = self.model
        return {"model": model_name(m), "family": self.spec.family, "kind": self.spec.kind,
                "n_layers": int(m.cfg.n_layers), "n_heads": int(m.cfg.n_heads), "n_ctx": int(m.cfg.n_ctx),
                "token_policy": self.spec.tokens.describe(), "saes": [e.describe() for e in self.saes.values()],
                "analyses": describe_analyses()}

    @torch.no_grad()
    def analyze(self, text: str, top_k: int = 8) -> dict:
        """Every SAE's top ``top_k`` features on every token (see the module docstring)."""
        if not 1 <= int(top_k) <= MAX_TOP_K:
            raise InputError(f"top_k must be in 1..{MAX_TOP_K}, got {top_k}")
        t0 = time.perf_counter()
        with self.lock:
            p = self.prompt(text)
            ids = p.tokens[0].tolist()
            out = {"text": text, "n_tokens": len(ids), "tokens": [
                {"pos": i, "id": t, "text": s, "structural": not bool(k)}
                for i, (t, s, k) in enumerate(zip(ids, self.token_texts(ids), p.keep.tolist()))]}
            out["saes"] = [self._top(e, p, int(top_k)) for e in self.saes.values()]
        out["elapsed_ms"] = (time.perf_counter() - t0) * 1e3
        return out

    def _top(self, e: LoadedSAE, p: Prompt, k: int) -> dict:
        acts = p.acts[e.id]  # [pos, d_sae]
        vals, idx = acts.topk(min(k, acts.shape[-1]), dim=-1)  # [pos, k]
        enc = self.encoder(e)
        W = enc.W.permute(2, 0, 1)[idx.to(enc.W.device)]  # [pos, k, head, d_head]
        by_head = einops.einsum(W, p.z[e.site.layer].to(W.device), "pos k head d, pos head d -> pos k head")
        heads = by_head.argmax(-1).cpu()
        shares = self.shares(e)
        err = p.x[e.id] - e.sae.decode(acts.to(e.sae.W_dec.dtype)).float()
        x_sq = p.x[e.id].pow(2).sum(-1)
        fvu = torch.where(x_sq > 0, err.pow(2).sum(-1) / x_sq.clamp_min(1e-30), torch.zeros_like(x_sq))
        keep = p.keep.tolist()
        n_fire = ((vals > 0).sum(-1).cpu() * p.keep).tolist()  # top features that fire (none on structural tokens)
        idx_l, vals_l, heads_l = idx.cpu().tolist(), vals.cpu().tolist(), heads.tolist()
        share_l = shares[idx.cpu()].argmax(-1).tolist() if shares is not None else None
        rows_f = [r[:n] for r, n in zip(idx_l, n_fire)]
        rows_a = [r[:n] for r, n in zip(vals_l, n_fire)]
        rows_h = [r[:n] for r, n in zip(heads_l, n_fire)]
        rows_s = [r[:n] for r, n in zip(share_l, n_fire)] if share_l is not None else [None] * len(n_fire)
        mx, arg = acts.max(-1)
        return {"id": e.id, "features": rows_f, "acts": rows_a, "heads": rows_h, "share_heads": rows_s,
                "max_act": mx.tolist(), "argmax": [int(a) if m > 0 else None for a, m in zip(arg.tolist(), mx.tolist())],
                "l0": (acts > 0).sum(-1).tolist(), "error_fvu": [float(v) if k_ else None for v, k_ in
                                                                 zip(fvu.tolist(), keep)]}

    @torch.no_grad()
    def activations(self, text: str, sae_id: str, feature: int) -> dict:
        """One feature's activation on every token of the prompt."""
        with self.lock:
            e = self.entry(sae_id)
            f = self.check_feature(e, feature)
            p = self.prompt(text)
            return {"sae": e.id, "feature": f, "acts": p.acts[e.id][:, f].tolist(), "dashboard": e.page(f)}

    def feature(self, text: str, sae_id: str, feature: int, pos: int, n_logits: int = 10, n_terms: int = 12) -> dict:
        """One feature at one token: DFA, error term, one RDFA step back, head shares, logits, dashboard link."""
        from .detail import feature_detail

        with self.lock:
            return feature_detail(self, text, sae_id, feature, pos, n_logits, n_terms)

    def qk(self, text: str, layer: int, head: int, pos: int, source: int, contrast: int | None = None,
           n_pairs: int = 12) -> dict:
        """Why ``head`` of ``layer`` attends from token ``pos`` to ``source``: its QK attribution (see :mod:`.qk`)."""
        from .qk import qk_detail

        with self.lock:
            return qk_detail(self, text, layer, head, pos, source, contrast, n_pairs)

    def steer(self, text: str, sae_id: str, feature: int, coefficient: float, n_tokens: int = 20, top: int = 10) -> dict:
        """The next-token distribution and a greedy continuation with ``coefficient * W_dec[feature]`` added."""
        from .steer import steer_prompt

        with self.lock:
            return steer_prompt(self, text, sae_id, feature, coefficient, n_tokens, top)

    def run_analysis(self, name: str, text: str, sae_id: str, options: dict | None = None) -> dict:
        """The registered analysis ``name`` run on the prompt with the SAE ``sae_id`` (see :mod:`.registered`)."""
        from .registered import run_registered

        return run_registered(self, name, text, sae_id, options)

    # --- loading --------------------------------------------------------------------------------------
    @classmethod
    def from_paths(cls, sae_dirs: Sequence[str | Path], model: str | None = None, device: str | None = None,
                   dashboards: Sequence[str | Path] = ()) -> ExplorerSession:
        """Load SAEs from directories and the model they name (``metadata.model_name``) or ``model``."""
        from sae_lens_attn.models import load_model

        if not sae_dirs:
            raise InputError("the explorer needs at least one SAE: pass --sae DIR (repeat it for several layers)")
        saes = [SAE.load(d, device="cpu") for d in sae_dirs]
        names = {s.cfg.metadata.get("model_name") for s in saes} if model is None else {model}
        if len(names) != 1:
            raise InputError(f"the SAEs name different models {sorted(map(str, names))}: pass --model to choose one")
        starts = {s.cfg.metadata.get("start_token") for s in saes} - {None}
        if len(starts) > 1:
            raise InputError(f"the SAEs were trained with different start tokens {sorted(starts)}: explore them separately")
        loaded = load_model(names.pop(), device=device, start_token=starts.pop() if starts else None)
        return cls(loaded, saes, dashboards, paths=[str(d) for d in sae_dirs])
