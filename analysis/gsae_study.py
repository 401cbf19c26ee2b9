"""TopK vs gradient-aware SAEs (g-SAE, Olmo et al. 2024) on every layer of a model, at several k and seeds.

The question the g-SAE paper raises: at the same sparsity, does gradient-aware selection give
reconstructions that are more faithful downstream (CE loss recovered, KL), fewer dead latents, and better
steering than plain TopK? Everything here is measured on held-out rows with the same data for both rules:
one model pass (with gradients) is harvested once, and every SAE trains from those same activations.

Steering (the paper's measure, as we read it): for a latent i, its output direction is W_dec[i] mapped
through W_O (hook_z), u_i. Adding ``alpha * ||attn_out|| * u_i/||u_i||`` to the layer's attention output at
every non-BOS position changes the next-token distribution; the score is the increase in probability mass
on the latent's top-10 direct-logit tokens (``u_i @ W_U``), averaged over the ``n_steer`` most frequently
firing latents. Choices the paper leaves open are ours: alpha = 2 (in units of the mean attn_out norm),
10 tokens, 32 latents.

Run (about 25 minutes on 2 CPU cores with the defaults)::

    python -m sae_lens_attn.analysis.gsae_study --out benchmarks/gsae_study
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import einops
import torch

from sae_lens_attn.activations import epoch_batches, harvest_all
from sae_lens_attn.data import token_rows
from sae_lens_attn.evals import evaluate_sae
from sae_lens_attn.models import SAMPLE_TEXT, bos_token_id, load_model, model_device
from sae_lens_attn.sae import SAE, SAEConfig
from sae_lens_attn.sites import Site
from sae_lens_attn.training.trainer import OptimConfig, Trainer


def output_directions(model, sae: SAE, site: Site) -> torch.Tensor:
    """Each latent's direction in the residual stream: W_dec rows through W_O for hook_z sites."""
    if site.kind == "attn_out":
        return sae.W_dec.detach()
    W_O = model.W_O[site.layer]  # [head, d_head, d_model]
    dec = einops.rearrange(sae.W_dec.detach(), "f (h d) -> f h d", h=model.cfg.n_heads)
    return torch.einsum("fhd,hdm->fm", dec, W_O)


@torch.no_grad()
def steering_score(model, sae: SAE, site: Site, rows: torch.Tensor, density: torch.Tensor, alpha: float = 2.0,
                   n_latents: int = 32, n_tokens: int = 10) -> float:
    """Mean increase in next-token probability mass on each steered latent's top direct-logit tokens."""
    dirs = output_directions(model, sae, site)
    latents = density.argsort(descending=True)[:n_latents]
    bos = bos_token_id(model)
    rows = rows.to(model_device(model))
    keep = rows != bos
    hook = f"blocks.{site.layer}.hook_attn_out"
    norms = []
    with model.hooks(fwd_hooks=[(hook, lambda t, hook: norms.append(t[keep].norm(dim=-1).mean()))]):
        clean_probs = model(rows).softmax(-1)
    scale = alpha * float(torch.stack(norms).mean())
    deltas = []
    for i in latents.tolist():
        u = dirs[i] / dirs[i].norm().clamp_min(1e-8)
        top = (u @ model.W_U).topk(n_tokens).indices

        def add(t, hook, u=u):
            return t + scale * u * keep[..., None]

        with model.hooks(fwd_hooks=[(hook, add)]):
            probs = model(rows).softmax(-1)
        mask = keep[:, :-1]
        d = (probs[:, :-1, top].sum(-1) - clean_probs[:, :-1, top].sum(-1))[mask]
        deltas.append(float(d.mean()))
    return statistics.fmean(deltas)


def run_study(model_name: str | None, ks: list[int], seeds: list[int], tokens: int, batch_size: int,
              expansion: int, beta: float, context_size: int, eval_rows: int, out: Path) -> list[dict]:
    model = load_model(model_name, device="cpu")
    sites = [Site(layer) for layer in range(model.cfg.n_layers)]
    rows = token_rows(SAMPLE_TEXT, model.tokenizer, context_size, bos_token_id(model))
    rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))]
    eval_r, train_r = rows[:eval_rows], rows[eval_rows:]
    t0 = time.time()
    data = harvest_all(model, train_r, sites, with_grad=True)
    print(f"harvested {next(iter(data.values())).acts.shape[0]:,} tokens with gradients in {time.time() - t0:.0f}s")
    results = []
    for k in ks:
        for seed in seeds:
            for rule in ("topk", "gsae"):
                saes = {}
                for s in sites:
                    d_in = s.d_in(model.cfg)
                    sae = SAE(SAEConfig(d_in=d_in, d_sae=expansion * d_in, k=k, selection=rule, gsae_beta=beta),
                              init=False)
                    sae.reset_parameters(torch.Generator().manual_seed(1000 * seed + s.layer))
                    saes[s] = sae
                cfg = OptimConfig(lr=2e-3, steps=max(1, tokens // batch_size), warmup_steps=20, dead_tokens=100_000)
                t1 = time.time()
                trainer = Trainer(saes, cfg)
                trainer.fit(epoch_batches(data, batch_size, seed=seed))
                train_s = time.time() - t1
                for s, sae in saes.items():
                    m, density = evaluate_sae(model, sae, s, eval_r)
                    steer = steering_score(model, sae, s, eval_r[:16], density)
                    rec = {"rule": rule, "k": k, "seed": seed, "layer": s.layer, "train_s": round(train_s, 1),
                           "steering": steer, **m.as_dict()}
                    results.append(rec)
                    print(json.dumps({key: (round(v, 4) if isinstance(v, float) else v) for key, v in rec.items()
                                      if key in ("rule", "k", "seed", "layer", "l0", "fvu", "ce_recovered_zero",
                                                 "kl_spliced", "dead_fraction", "steering", "train_s")}), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def summarise(results: list[dict]) -> str:
    """Markdown table: mean ± std over seeds for each (layer, k, rule)."""
    keys = ("ce_recovered_zero", "ce_recovered_mean", "kl_spliced", "fvu", "dead_fraction", "steering", "l0")
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["layer"], r["k"], r["rule"]), []).append(r)
    head = "| layer | k | rule | seeds | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (4 + len(keys))]
    for (layer, k, rule), rs in sorted(groups.items()):
        cells = []
        for key in keys:
            vals = [r[key] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.fmean(vals):.4f} ± {sd:.4f}")
        lines.append(f"| {layer} | {k} | {rule} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(results: list[dict], path: Path) -> None:
    """CE loss recovered against L0, one trace per (rule, layer), error bars over seeds."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for rule in ("topk", "gsae"):
        for layer in sorted({r["layer"] for r in results}):
            pts = {}
            for r in results:
                if r["rule"] == rule and r["layer"] == layer:
                    pts.setdefault(r["k"], []).append(r)
            ks = sorted(pts)
            x = [statistics.fmean(r["l0"] for r in pts[k]) for k in ks]
            y = [statistics.fmean(r["ce_recovered_zero"] for r in pts[k]) for k in ks]
            e = [statistics.stdev([r["ce_recovered_zero"] for r in pts[k]]) if len(pts[k]) > 1 else 0 for k in ks]
            fig.add_trace(go.Scatter(x=x, y=y, error_y={"type": "data", "array": e}, mode="lines+markers",
                                     name=f"{rule} layer {layer}"))
    fig.update_layout(title="CE loss recovered (zero-ablation baseline) vs L0", xaxis_title="L0",
                      yaxis_title="CE loss recovered", xaxis_type="log")
    fig.write_html(path, include_plotlyjs="cdn")
    try:
        fig.write_image(path.with_suffix(".png"))
    except Exception:  # kaleido is optional
        pass


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="hub id or local dir (default: the embedded model)")
    p.add_argument("--ks", default="8,16,32")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per SAE")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--eval-rows", type=int, default=64)
    p.add_argument("--out", default="benchmarks/gsae_study")
    a = p.parse_args(argv)
    out = Path(a.out)
    results = run_study(a.model, [int(k) for k in a.ks.split(",")], [int(s) for s in a.seeds.split(",")], a.tokens,
                        a.batch_size, a.expansion, a.beta, a.context_size, a.eval_rows, out)
    table = summarise(results)
    (out / "table.md").write_text(table + "\n")
    figure(results, out / "ce_recovered_vs_l0.html")
    print(table)


if __name__ == "__main__":
    main()
