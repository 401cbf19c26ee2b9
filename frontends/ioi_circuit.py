"""Find a model's IOI circuit (Wang et al. 2022): per-head patching at every position, at the last token and
at S2, per-head scores (direct logit attribution, attention), path patching into the name movers' queries,
and a role for each head by criteria fixed in :data:`THRESHOLD` and :func:`assign_roles`.

Each part is saved to ``circuit.json`` as it finishes, with the settings; a rerun with the same settings
skips the parts that are there (patching every head of SmolLM2-135M on 24 prompts takes about 12 minutes on
2 CPU cores per part). Then ``circuit.md`` (the role table) and ``circuit.html`` (the heat maps) are written.

Run (the committed results in ``benchmarks/ioi_smollm2``)::

    python -m sae_lens_attn.frontends.ioi_circuit --model <SmolLM2 .gguf> --start-token '<|endoftext|>' \\
        --out benchmarks/ioi_smollm2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from sae_lens_attn.analysis.commands import HelpFormatter
from sae_lens_attn.analysis.ioi import IOIDataset, corrupt_ioi, logit_diff, make_ioi
from sae_lens_attn.analysis.ioi_heads import ioi_head_scores
from sae_lens_attn.analysis.patching import head_patching, path_patching
from sae_lens_attn.errors import InputError
from sae_lens_attn.files import ensure_dir, write_json, write_text
from sae_lens_attn.models import load_model
from sae_lens_attn.training.commands import add_config_arguments

#: A head counts for a role when patching it moves the logit difference by at least this share of the
#: clean-corrupted gap (fixed before the SmolLM2 run; Wang et al. draw their circuit at a similar cut).
THRESHOLD = 0.05


@dataclass
class CircuitConfig:
    """What the parts depend on; a rerun must match it to reuse them."""

    model: str | None = None
    """Hub id, local dir or .gguf file; None: the embedded model (which does not do IOI)."""
    start_token: str | None = None
    """The model's start-token rule (``load_model(start_token=)``)."""
    prompts: int = 24
    """IOI prompts (ABBA and BABA alternating, :func:`~sae_lens_attn.analysis.ioi.make_ioi`)."""
    seed: int = 0
    """Seed of the prompts; the ABC corruption uses ``seed + 1``."""


def _data(cfg: CircuitConfig, model) -> tuple[IOIDataset, IOIDataset]:
    data = make_ioi(model, n=cfg.prompts, seed=cfg.seed)
    return data, corrupt_ioi(model, data, seed=cfg.seed + 1)


def _patch_part(model, data, corr, where: str) -> dict:
    pos = None if where == "all" else data.positions["end" if where == "end" else "S2"]
    r = head_patching(model, data.tokens, corr.tokens, lambda lg: logit_diff(lg, data, per_prompt=True), positions=pos)
    return {"effect": r.effect.tolist(), "clean": r.clean_metric, "corrupted": r.corrupted_metric}


def _scores_part(model, data) -> dict:
    s = ioi_head_scores(model, data)
    return {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in s._asdict().items()}


def _heads(effect: list[list[float]], cut: float, sign: int) -> list[tuple[int, int]]:
    return [(L, h) for L, row in enumerate(effect) for h, e in enumerate(row) if e == e and sign * e >= cut]


def name_movers(parts: dict) -> list[tuple[int, int]]:
    """Heads whose patching at the last token lowers the logit difference by >= THRESHOLD of the gap, that
    write it directly (DLA > 0) and attend to IO more than to S2."""
    sc = parts["scores"]
    return [(L, h) for L, h in _heads(parts["end"]["effect"], THRESHOLD, -1)
            if sc["dla"][L][h] > 0 and sc["end_to_io"][L][h] > sc["end_to_s2"][L][h]]


def _path_part(model, data, corr, parts: dict, what: str = "q") -> dict:
    """Every earlier head with an effect (>= THRESHOLD / 2 of the gap at every position) as a sender, into the
    name movers' queries (``q``) or keys (``k``: on a grouped-query model, their whole key/value groups)."""
    movers = name_movers(parts)
    if not movers:
        return {"receivers": [], "effect": None, "note": "no name movers by the criterion: nothing to path-patch into"}
    first = min(L for L, _ in movers)
    senders = [(L, h) for L, h in _heads(parts["all"]["effect"], THRESHOLD / 2, -1) + _heads(parts["all"]["effect"], THRESHOLD / 2, 1)
               if L < first]
    r = path_patching(model, data.tokens, corr.tokens, lambda lg: logit_diff(lg, data, per_prompt=True),
                      receivers=movers, receiver_input=what, senders=senders)
    return {"receivers": movers, "senders": senders, "patched_heads": r.patched_heads, "effect": r.effect.tolist(),
            "clean": r.clean_metric, "corrupted": r.corrupted_metric}


def assign_roles(parts: dict) -> dict[str, str]:
    """``"L.H" -> role`` for every head that moves the logit difference by >= THRESHOLD anywhere:

    * name mover: see :func:`name_movers`;
    * negative name mover: patching at the last token *raises* the logit difference by >= THRESHOLD and DLA < 0;
    * S-inhibition: path patching it into the name movers' queries lowers the logit difference by >= THRESHOLD;
    * key-side S-inhibition: the same into the name movers' keys (Wang et al.'s S-inhibition heads act on the
      queries; a head that changes which key the name movers find acts through the keys instead);
    * induction / duplicate-token: patching at S2 lowers it by >= THRESHOLD; induction when the head attends
      from S2 to the token after S1 more than to S1, duplicate-token otherwise;
    * other: moves it by >= THRESHOLD when patched at every position but fits none of the above.
    """
    sc, roles = parts["scores"], {}
    for L, h in _heads(parts["all"]["effect"], THRESHOLD, -1) + _heads(parts["all"]["effect"], THRESHOLD, 1):
        roles[f"{L}.{h}"] = "other"
    for L, h in _heads(parts["s2"]["effect"], THRESHOLD, -1):
        roles[f"{L}.{h}"] = "induction" if sc["s2_to_s1_next"][L][h] > sc["s2_to_s1"][L][h] else "duplicate-token"
    for part, role in (("path_k", "key-side S-inhibition"), ("path", "S-inhibition")):
        path = parts.get(part, {}).get("effect")
        if path is not None:
            for L, h in _heads(path, THRESHOLD, -1):
                roles[f"{L}.{h}"] = role
    for L, h in _heads(parts["end"]["effect"], THRESHOLD, 1):
        if sc["dla"][L][h] < 0:
            roles[f"{L}.{h}"] = "negative name mover"
    for L, h in name_movers(parts):
        roles[f"{L}.{h}"] = "name mover"
    return roles


def role_table(parts: dict) -> str:
    """Markdown: one row per head with a role, its effects, DLA and attention."""
    roles, sc = assign_roles(parts), parts["scores"]
    path = parts.get("path", {}).get("effect")
    path_k = parts.get("path_k", {}).get("effect")
    lines = ["| head | role | all pos. | last token | S2 | path -> NM q | path -> NM k | DLA | end->IO | end->S2 | S2->S1 | S2->S1+1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x):
        return "" if x is None or x != x else f"{x:+.3f}"

    order = sorted(roles, key=lambda k: tuple(map(int, k.split("."))))
    for key in order:
        L, h = map(int, key.split("."))
        pe = path[L][h] if path is not None else None
        pk = path_k[L][h] if path_k is not None else None
        lines.append(f"| L{L}H{h} | {roles[key]} | {f(parts['all']['effect'][L][h])} | {f(parts['end']['effect'][L][h])} | "
                     f"{f(parts['s2']['effect'][L][h])} | {f(pe)} | {f(pk)} | {f(sc['dla'][L][h])} | {sc['end_to_io'][L][h]:.2f} | "
                     f"{sc['end_to_s2'][L][h]:.2f} | {sc['s2_to_s1'][L][h]:.2f} | {sc['s2_to_s1_next'][L][h]:.2f} |")
    return "\n".join(lines)


def figure(parts: dict, path: Path) -> Path:
    """Heat maps (layer x head) of the three patching effects and the DLA, one HTML file."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = [("every position", parts["all"]["effect"]), ("last token", parts["end"]["effect"]),
              ("S2", parts["s2"]["effect"]), ("direct logit attribution", parts["scores"]["dla"])]
    fig = make_subplots(rows=1, cols=4, subplot_titles=[p[0] for p in panels])
    for i, (_, z) in enumerate(panels):
        fig.add_trace(go.Heatmap(z=z, colorscale="RdBu", zmid=0, showscale=i == 3), row=1, col=i + 1)
        fig.update_xaxes(title_text="head", row=1, col=i + 1)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(title="IOI: effect of patching each head from the ABC corruption (share of the gap)", height=700)
    fig.write_html(path, include_plotlyjs="cdn")
    return path


PARTS = ("all", "end", "s2", "scores", "path", "path_k")


def run(cfg: CircuitConfig, out: Path, log=print) -> dict:
    ensure_dir(out)
    file = out / "circuit.json"
    saved = json.loads(file.read_text()) if file.exists() else {"settings": asdict(cfg), "parts": {}}
    if saved["settings"] != asdict(cfg):
        raise InputError(f"{file} was made with other settings ({saved['settings']}); use another --out or those settings")
    model = load_model(cfg.model, device="cpu", start_token=cfg.start_token)
    data, corr = _data(cfg, model)
    parts = saved["parts"]
    for name in PARTS:
        if name in parts:
            continue
        t0 = time.time()
        if name in ("all", "end", "s2"):
            parts[name] = _patch_part(model, data, corr, name)
        elif name == "scores":
            parts[name] = _scores_part(model, data)
        else:
            parts[name] = _path_part(model, data, corr, parts, "q" if name == "path" else "k")
        parts[name]["seconds"] = round(time.time() - t0, 1)
        write_json(file, saved, indent=None)
        log(f"{name}: {parts[name]['seconds']}s")
    write_text(out / "circuit.md", role_table(parts) + "\n")
    figure(parts, out / "circuit.html")
    return parts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_config_arguments(p, CircuitConfig)  # one flag per field, its help the field's docstring
    p.add_argument("--out", default="benchmarks/ioi_circuit", help="folder of circuit.json, circuit.md, circuit.html")
    a = p.parse_args(argv)
    cfg = CircuitConfig(**{f.name: getattr(a, f.name) for f in fields(CircuitConfig)})
    parts = run(cfg, Path(a.out))
    print(role_table(parts))


if __name__ == "__main__":
    main()
