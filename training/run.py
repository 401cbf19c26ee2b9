"""The main job: model -> token rows -> activations at every site -> one SAE per site -> evals -> disk."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sae_lens_attn.activations import activation_batches, check_sites, epoch_batches, harvest_all
from sae_lens_attn.data import token_rows
from sae_lens_attn.evals import SAEMetrics, evaluate_sae, format_metrics_table
from sae_lens_attn.models import SAMPLE_TEXT, bos_token_id, load_model, model_name
from sae_lens_attn.sae import SAE, SAEConfig
from sae_lens_attn.sites import Site, parse_sites

from .config import TrainConfig
from .trainer import OptimConfig, Trainer

#: Harvest everything once and reuse it across epochs when the activations fit in this many bytes.
IN_MEMORY_BYTES = 2 * 1024**3


@dataclass
class TrainResult:
    saes: dict[Site, SAE]
    metrics: list[SAEMetrics]
    out_dir: Path

    def table(self) -> str:
        return format_metrics_table(self.metrics)


def build_saes(cfg: TrainConfig, model, sites: list[Site], context_size: int) -> dict[Site, SAE]:
    saes = {}
    for i, site in enumerate(sites):
        d_in = site.d_in(model.cfg)
        d_sae = cfg.d_sae or cfg.expansion_factor * d_in
        scfg = SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            k=cfg.k,
            selection=cfg.sae,
            gsae_beta=cfg.gsae_beta,
            device=str(_device(model)),
            reshape_activations="hook_z" if site.kind == "z" and site.head is None else "none",
            metadata={
                "model_name": model_name(model),
                "hook_name": site.hook_name,
                "hook_layer": site.layer,
                "hook_head_index": site.head,
                "context_size": context_size,
                "prepend_bos": True,
                "exclude_special_tokens": cfg.drop_bos,
                "dataset_path": cfg.dataset or "sae_lens_attn/assets/sample_text.txt",
                "training_tokens": cfg.tokens,
            },
        )
        sae = SAE(scfg, init=False)
        sae.reset_parameters(torch.Generator().manual_seed(cfg.seed * 1000 + i))
        sae.to(_device(model))
        saes[site] = sae
    return saes


def _device(model) -> torch.device:
    return next(iter(model.parameters())).device


def train(cfg: TrainConfig, log=print) -> TrainResult:
    """Train one SAE per requested site, evaluate them, and save them under ``cfg.out_dir``."""
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, device=cfg.device, dtype=getattr(torch, cfg.dtype))
    sites = parse_sites(cfg.layers, cfg.site, cfg.head, n_layers=model.cfg.n_layers)
    check_sites(model, sites)
    context_size = min(cfg.context_size, int(model.cfg.n_ctx))
    source = cfg.dataset or SAMPLE_TEXT
    rows = token_rows(source, model.tokenizer, context_size, bos_token_id(model), text_field=cfg.text_field)
    rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(cfg.seed))]
    n_eval = min(cfg.eval_rows, rows.shape[0] // 4)
    eval_rows, train_rows = rows[:n_eval], rows[n_eval:]
    if train_rows.shape[0] == 0:
        raise ValueError(f"dataset {source} is too small: no rows left for training after {n_eval} eval rows")

    saes = build_saes(cfg, model, sites, context_size)
    with_grad = cfg.sae == "gsae"
    width = sum(s.d_in(model.cfg) for s in sites) * (2 if with_grad else 1)
    est_bytes = train_rows.numel() * width * 4
    if est_bytes <= IN_MEMORY_BYTES:
        log(f"harvesting {train_rows.numel():,} tokens at {len(sites)} site(s) once (fits in memory)")
        data = harvest_all(model, train_rows, sites, model_batch_rows=cfg.model_batch_rows, with_grad=with_grad,
                           drop_bos=cfg.drop_bos)
        batches = epoch_batches(data, cfg.batch_size, cfg.seed, _device(model))
    else:
        batches = activation_batches(model, train_rows, sites, cfg.batch_size, model_batch_rows=cfg.model_batch_rows,
                                     with_grad=with_grad, drop_bos=cfg.drop_bos, seed=cfg.seed)

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    ocfg = OptimConfig(
        lr=cfg.lr, steps=cfg.steps, warmup_steps=cfg.warmup_steps, decay_fraction=cfg.decay_fraction,
        auxk_alpha=cfg.auxk_alpha, auxk_k=cfg.auxk_k, dead_tokens=cfg.dead_tokens, log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
    )
    trainer = Trainer(saes, ocfg, out_dir)
    bar = tqdm(total=ocfg.steps, disable=not cfg.progress, dynamic_ncols=True, desc=f"{cfg.sae} k={cfg.k}")

    def progress(step: int, stats) -> None:
        bar.update(1)
        if step % 5 == 0 or step == ocfg.steps:
            n = len(stats)
            bar.set_postfix(
                loss=f"{sum(s.loss for s in stats.values()) / n:.4f}",
                L0=f"{sum(s.l0 for s in stats.values()) / n:.1f}",
                FVU=f"{sum(s.fvu for s in stats.values()) / n:.3f}",
                dead=f"{sum(s.dead_fraction for s in stats.values()) / n:.1%}",
            )

    try:
        trainer.fit(batches, progress)
    finally:
        bar.close()

    metrics = []
    for site, state in trainer.states.items():
        path = state.sae.save(out_dir / site.label, state.log_sparsity())
        m, _ = evaluate_sae(model, state.sae, site, eval_rows)
        metrics.append(m)
        log(f"saved {site.label} -> {path}")
    (out_dir / "metrics.json").write_text(json.dumps([m.as_dict() for m in metrics], indent=2))
    return TrainResult(trainer.saes, metrics, out_dir)
