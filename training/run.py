"""The main job: model -> token rows -> activations at every site -> one SAE per site -> evals -> disk.

Where the activation batches come from (``make_batches``), and how ``--resume`` finds its place in them:

* **in memory** (the harvest fits in ``IN_MEMORY_BYTES``): every kept token is harvested once, then served in
  a fresh permutation per epoch (the order of :func:`~sae_lens_attn.activations.epoch_batches`). Resuming
  re-harvests (the activations are not saved) and then *skips* to the checkpoint's batch cheaply: only the
  skipped epochs' permutations are drawn, no batch is built.
* **activation cache** (``--activation-cache``): shards on disk, read back memory-mapped
  (:meth:`CachedActivations.batches`). Resuming skips the consumed batches without the model (the batches
  are views of the shuffled windows, never copied to the device while skipped).
* **streaming** (too big for memory, no cache): :func:`~sae_lens_attn.stream.activation_batches` harvests
  as it goes. Its shuffle buffer depends on everything harvested before, so resuming replays the stream's
  schedule without the model and harvests only the chunks of rows with vectors still to be served at the
  checkpoint's position (about 110 chunks with the defaults, however late the checkpoint; see
  :mod:`sae_lens_attn.stream`); the batches from there on are the uninterrupted run's.

Several processes (``torchrun``; ``training/distributed.py``): in ``dp`` mode each rank takes every
``world``-th token row (in memory / streaming) and a batch of ``batch_size / world`` vectors per step, or
its slice of each global cache batch (so a cached run equals the single-process run batch for batch); in
``sites`` mode each rank harvests and trains only its own sites, from the same stream as one process would.
Only rank 0 writes files, logs and the progress bar.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from sae_lens_attn.activations import SiteBatch, check_sites, harvest_all
from sae_lens_attn.cache import CachedActivations, write_cache
from sae_lens_attn.data import check_text_source
from sae_lens_attn.devices import check_device
from sae_lens_attn.errors import InputError
from sae_lens_attn.evals import SITE_METRICS, SAEMetrics, evaluate_sae, format_metrics_table
from sae_lens_attn.files import write_json, write_text
from sae_lens_attn.models import SAMPLE_TEXT, describe_tokens, load_model, model_name, token_policy
from sae_lens_attn.sae import SAE, SAEConfig
from sae_lens_attn.sites import Site, parse_sites
from sae_lens_attn.stream import activation_batches

from .config import TrainConfig
from .distributed import Dist, rank_device, shard_sites
from .rows import read_rows
from .rundir import RESUME_MAY_CHANGE, RunStart, holds_run_dir, prepare_run_dir, truncate_log, write_config  # noqa: F401
from .trainer import OptimConfig, Trainer, remove_partial_checkpoints

#: Harvest everything once and reuse it across epochs when the activations fit in this many bytes.
IN_MEMORY_BYTES = 2 * 1024**3


@dataclass
class TrainResult:
    saes: dict[Site, SAE]
    metrics: list[SAEMetrics]
    out_dir: Path

    def table(self) -> str:
        return format_metrics_table(self.metrics)


def build_saes(
    cfg: TrainConfig, model, sites: list[Site], context_size: int, only: list[Site] | None = None
) -> dict[Site, SAE]:
    """One SAE per site (only those in ``only``, when given), seeded by the site's index in ``sites`` so
    a site's SAE is the same whichever process builds it."""
    saes = {}
    for i, site in enumerate(sites):
        if only is not None and site not in only:
            continue
        d_in = site.d_in(model.cfg)
        d_sae = cfg.d_sae or cfg.expansion_factor * d_in
        if cfg.k > d_sae:
            raise InputError(
                f"TrainConfig.k ({cfg.k}) exceeds the {d_sae} latents of site {site.label} (expansion_factor "
                f"{cfg.expansion_factor} x d_in {d_in}); lower --k or raise --expansion-factor / --d-sae"
            )
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
                "prepend_bos": token_policy(model).prepend_bos,
                "token_policy": token_policy(model).rule,
                "exclude_special_tokens": cfg.drop_bos,
                "dataset_path": cfg.dataset or "sae_lens_attn/assets/sample_text.txt",
                "training_tokens": cfg.steps * cfg.batch_size,  # what is trained: whole batches, at least one
                "start_token": token_policy(model).start_token,
            },
        )
        sae = SAE(scfg, init=False)
        sae.reset_parameters(torch.Generator().manual_seed(cfg.seed * 1000 + i))
        sae.to(_device(model))
        sae.bf16_select = cfg.bf16_encoder
        saes[site] = sae
    return saes


def _device(model) -> torch.device:
    return next(iter(model.parameters())).device


# --------------------------------------------------------------------------------------------- batches


def memory_batches(
    data: dict[Site, SiteBatch], batch_size: int, seed: int = 0, device: str | torch.device = "cpu", start: int = 0
) -> Iterator[dict[Site, SiteBatch]]:
    """:func:`~sae_lens_attn.activations.epoch_batches` from batch ``start`` on, reached without building
    the skipped batches: the same generator draws (one permutation per epoch), so the stream is identical
    (``tests/test_resume.py`` checks it against ``epoch_batches``)."""
    n = next(iter(data.values())).acts.shape[0]
    if n < batch_size:
        raise InputError(f"only {n} activation vectors, fewer than one batch of {batch_size}; use more text")
    per_epoch = n // batch_size
    gen = torch.Generator().manual_seed(seed)
    skip_epochs, first = divmod(start, per_epoch)
    for _ in range(skip_epochs):
        torch.randperm(n, generator=gen)
    while True:
        perm = torch.randperm(n, generator=gen)
        for b in range(first, per_epoch):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            yield {
                s: SiteBatch(d.acts[idx].to(device), d.grads[idx].to(device) if d.grads is not None else None)
                for s, d in data.items()
            }
        first = 0


def _rank_slice(batches: Iterator[dict[Site, SiteBatch]], dist: Dist) -> Iterator[dict[Site, SiteBatch]]:
    """Rank r's contiguous share of each global batch (the single-process batch, split in world parts)."""
    for batch in batches:
        out = {}
        for s, b in batch.items():
            n = b.acts.shape[0]
            lo, hi = n * dist.rank // dist.world_size, n * (dist.rank + 1) // dist.world_size
            out[s] = SiteBatch(b.acts[lo:hi], b.grads[lo:hi] if b.grads is not None else None)
        yield out


def _to_device(batches: Iterator[dict[Site, SiteBatch]], device) -> Iterator[dict[Site, SiteBatch]]:
    for batch in batches:
        yield {
            s: SiteBatch(b.acts.to(device), b.grads.to(device) if b.grads is not None else None)
            for s, b in batch.items()
        }


class BatchSource:
    """The batches for this rank, already at data position ``start``, and how they were made."""

    def __init__(self, batches: Iterator[dict[Site, SiteBatch]], kind: str, layout: str):
        self.batches = batches
        self.kind = kind
        """``memory``, ``cache`` or ``stream``."""
        self.layout = layout
        """What a resume must reproduce: ``full`` (every site sees the single-process stream) or ``dpN``."""


def make_batches(
    cfg: TrainConfig, model, train_rows: torch.Tensor, all_sites: list[Site], sites: list[Site], dist: Dist,
    start: int = 0, log=print,
) -> BatchSource:
    """This rank's batches of its ``sites``, starting at batch ``start`` (see the module docstring)."""
    with_grad = cfg.sae == "gsae"
    device = _device(model)
    dp = dist.data_parallel
    layout = f"dp{dist.world_size}" if dp else "full"
    if cfg.activation_cache:
        # Rank 0 writes (or completes) the cache for every site; the others wait, then all read it.
        if dist.is_main:
            cache = write_cache(model, train_rows, all_sites, cfg.activation_cache, with_grad=with_grad,
                                drop_bos=cfg.drop_bos, model_batch_rows=cfg.model_batch_rows)
            log(f"activation cache {cfg.activation_cache}: {cache.n_tokens:,} tokens")
        dist.barrier()
        stream = CachedActivations(cfg.activation_cache, sites).batches(cfg.batch_size, seed=cfg.seed, device="cpu")
        if start:
            log(f"resume: skipping {start} cached batches (no model passes)")
        stream = itertools.islice(stream, start, None)
        if dp:
            stream = _rank_slice(stream, dist)
        return BatchSource(_to_device(stream, device), "cache", layout)
    rows = train_rows[dist.rank :: dist.world_size] if dp else train_rows
    batch_size = cfg.batch_size // dist.world_size if dp else cfg.batch_size
    width = sum(s.d_in(model.cfg) for s in sites) * (2 if with_grad else 1)
    if rows.numel() * width * 4 <= IN_MEMORY_BYTES:
        log(f"harvesting {rows.numel():,} tokens at {len(sites)} site(s) once (fits in memory)")
        data = harvest_all(model, rows, sites, model_batch_rows=cfg.model_batch_rows, with_grad=with_grad,
                           drop_bos=cfg.drop_bos)
        return BatchSource(memory_batches(data, batch_size, cfg.seed, device, start=start), "memory", layout)
    if start:
        log(f"resume: passing over {start} streamed batches (the model runs only on rows with tokens still to "
            "be served)")
    stream = activation_batches(model, rows, sites, batch_size, model_batch_rows=cfg.model_batch_rows,
                                with_grad=with_grad, drop_bos=cfg.drop_bos, seed=cfg.seed, skip=start, log=log)
    return BatchSource(stream, "stream", layout)


# ---------------------------------------------------------------------------------------------- resume


def set_deterministic() -> None:
    """Deterministic kernels (``torch.use_deterministic_algorithms``). On CPU every op this package uses
    has a deterministic kernel (CSR matmul, index_add_, embedding_bag included); on CUDA cuBLAS also needs
    a fixed workspace, set here before the first CUDA matmul."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


class WandbLogger:
    """Optional Weights & Biases logging of the JSONL records (rank 0). The run id is kept in out_dir so a
    ``--resume`` continues the same W&B run. ``WANDB_MODE=offline`` works without a network."""

    def __init__(self, cfg: TrainConfig, out_dir: Path):
        try:
            import wandb
        except ImportError:
            raise InputError(
                "TrainConfig.wandb_project needs the wandb package (pip install wandb); the JSONL log in "
                "out_dir is written without it"
            ) from None
        id_file = out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if cfg.resume and id_file.exists() else uuid.uuid4().hex[:12]
        write_text(id_file, run_id)
        self.run = wandb.init(project=cfg.wandb_project, config=asdict(cfg), dir=str(out_dir), id=run_id,
                              resume="allow", name=out_dir.name)

    def __call__(self, rec: dict) -> None:
        site = rec["site"]
        self.run.log({f"{site}/{k}": v for k, v in rec.items() if k not in ("step", "site")}, step=rec["step"])

    def summary(self, metrics: list[SAEMetrics]) -> None:
        for m in metrics:
            for k, v in m.as_dict().items():
                if k != "site":
                    self.run.summary[f"{m.site}/eval/{k}"] = v

    def finish(self) -> None:
        self.run.finish()


# ------------------------------------------------------------------------------------------------- run


def _start_run(cfg: TrainConfig, dist: Dist, log) -> RunStart:
    """Rank 0 checks and prepares out_dir (``rundir.py``); every rank gets its decision, or its error."""
    start, error = None, None
    if dist.is_main:
        try:
            start = prepare_run_dir(cfg, log)
        except Exception as err:  # raised on every rank below, so none waits for the others
            error = err
    start, error = dist.broadcast_object((start, error)) if dist.world_size > 1 else (start, error)
    if error is not None:
        raise error
    return start


class _Setup(NamedTuple):
    """What a run has before its first step: the model, the sites (all, and this rank's), the rows, the SAEs."""

    model: object
    all_sites: list[Site]
    sites: list[Site]
    eval_rows: torch.Tensor
    train_rows: torch.Tensor | None
    saes: dict[Site, SAE]


def _setup(cfg: TrainConfig, dist: Dist, device, log) -> _Setup:
    """Load the model, resolve the sites, read the rows and build the SAEs, each checked before the next."""
    if cfg.deterministic:
        set_deterministic()
    torch.manual_seed(cfg.seed)
    check_text_source(cfg.dataset or SAMPLE_TEXT, cfg.encoding)  # a binary or mis-encoded file, before the model
    model = load_model(cfg.model, device=device, dtype=getattr(torch, cfg.dtype), start_token=cfg.start_token)
    log(describe_tokens(model))
    all_sites = parse_sites(cfg.layers, cfg.site, cfg.head, n_layers=model.cfg.n_layers)
    check_sites(model, all_sites)
    sites = shard_sites(all_sites, dist)
    if dist.data_parallel and cfg.batch_size % dist.world_size:
        raise InputError(
            f"TrainConfig.batch_size ({cfg.batch_size}) must be divisible by the {dist.world_size} processes in "
            "data-parallel mode (each trains on batch_size / world vectors per step)"
        )
    context_size = min(cfg.context_size, int(model.cfg.n_ctx))
    eval_rows, train_rows = read_rows(cfg, model, context_size, dist, log)
    saes = build_saes(cfg, model, all_sites, context_size, only=sites)
    return _Setup(model, all_sites, sites, eval_rows, train_rows, saes)


def _resume(trainer: Trainer, ckpt: Path, layout: str, out_dir: Path, dist: Dist, log) -> None:
    """Restore the trainer from ``ckpt``, refusing a checkpoint of another data layout."""
    extra = trainer.restore(ckpt)
    saved_layout = extra.get("data_layout", "full")
    if saved_layout != layout:
        raise InputError(
            f"--resume: {ckpt} was written with data layout {saved_layout!r} but this run uses {layout!r} "
            "(data-parallel runs must resume with the same number of processes); resume with the original "
            "torchrun --nproc-per-node, or train into a new --out-dir"
        )
    if dist.is_main:
        truncate_log(out_dir, trainer.step_idx)
        remove_partial_checkpoints(out_dir)
    log(f"resumed from {ckpt} at step {trainer.step_idx}/{trainer.cfg.steps}")


def _fit(cfg: TrainConfig, trainer: Trainer, batches, dist: Dist) -> None:
    """Run the training steps behind a progress bar (rank 0, ``--progress``) of mean loss, L0, FVU, dead."""
    ocfg = trainer.cfg
    bar = tqdm(total=ocfg.steps, initial=trainer.step_idx, disable=not (cfg.progress and dist.is_main),
               dynamic_ncols=True, desc=f"{cfg.sae} k={cfg.k}")

    def progress(step: int, stats) -> None:
        bar.update(1)
        if step % 5 == 0 or step == ocfg.steps:
            n = len(stats)
            dead = f"{sum(s.dead_fraction for s in stats.values()) / n:.1%}"
            bar.set_postfix(
                loss=f"{sum(s.loss for s in stats.values()) / n:.4f}",
                L0=f"{sum(s.l0 for s in stats.values()) / n:.1f}",
                FVU=f"{sum(s.fvu for s in stats.values()) / n:.3f}",
                dead="n/a" if ocfg.dead_note(step) else dead,
            )

    try:
        trainer.fit(batches, progress)
    finally:
        bar.close()


def _save_and_evaluate(model, all_saes: dict[Site, SAE], sparsity, eval_rows, out_dir: Path, wandb_logger,
                       log) -> list[SAEMetrics]:
    """Rank 0: save each SAE, evaluate it on the held-out rows, write its metrics beside it and in metrics.json."""
    metrics = []
    for site, sae in all_saes.items():
        path = sae.save(out_dir / site.label, sparsity[site])
        m, _ = evaluate_sae(model, sae, site, eval_rows)
        write_json(path / SITE_METRICS, m.as_dict(), indent=2)  # travels with the SAE folder
        metrics.append(m)
        log(f"saved {site.label} -> {path}")
    write_json(out_dir / "metrics.json", [m.as_dict() for m in metrics], indent=2)
    if wandb_logger is not None:
        wandb_logger.summary(metrics)
        wandb_logger.finish()
    return metrics


@holds_run_dir  # the run directory's lock (taken in prepare_run_dir) is released when train ends
def train(cfg: TrainConfig, log=print, dist: Dist | None = None) -> TrainResult:
    """Train one SAE per requested site, evaluate them, and save them under ``cfg.out_dir``.

    ``dist``: the process group under torchrun (``Dist()``, one process, by default). Every rank calls
    this; rank 0 alone writes files and returns the metrics.
    """
    dist = dist or Dist()
    out_dir = Path(cfg.out_dir)
    device = check_device(rank_device(cfg.device, dist))  # checked before the model loads: fails in a second
    start = _start_run(cfg, dist, log)
    run = _setup(cfg, dist, device, log)
    if dist.is_main:
        write_config(cfg, out_dir, start.run_id)
    ocfg = OptimConfig.of(cfg)  # the optimiser settings, steps, cadence and batch size, by field name
    wandb_logger = WandbLogger(cfg, out_dir) if cfg.wandb_project and dist.is_main else None
    trainer = Trainer(run.saes, ocfg, out_dir, dist, loggers=[wandb_logger] if wandb_logger else [],
                      run_id=start.run_id)
    if start.checkpoint is not None:
        _resume(trainer, start.checkpoint, f"dp{dist.world_size}" if dist.data_parallel else "full", out_dir,
                dist, log)
    data = make_batches(cfg, run.model, run.train_rows, run.all_sites, run.sites, dist,
                        start=trainer.batches_consumed, log=log)
    trainer.extra = {"data_layout": data.layout, "batch_source": data.kind}
    _fit(cfg, trainer, data.batches, dist)
    if ocfg.dead_note(trainer.step_idx):
        log(f"training's dead-latent statistic: {ocfg.dead_note(trainer.step_idx)}; the table's 'dead' is counted on "
            "the evaluation tokens")
    all_saes = trainer.gather_saes()
    for sae in all_saes.values():
        sae.reuse_pre_buffer = False  # handed to the caller: every encode returns its own pre
    sparsity = trainer.gather_log_sparsity()
    metrics = (_save_and_evaluate(run.model, all_saes, sparsity, run.eval_rows, out_dir, wandb_logger, log)
               if dist.is_main else [])
    return TrainResult(all_saes, metrics, out_dir)
