"""The SAE trainer: consumes an iterator of activation batches, one SAE per site.

It knows nothing about models: ``Trainer.fit`` takes ``{site: SiteBatch}`` dicts (random data in tests,
harvested activations in ``run.py``) and trains every site's SAE on its own batch each step
(:class:`~sae_lens_attn.training.step.SiteState`: the objective, AuxK and the Adam update).

Checkpoints (``checkpoints/step_N``, :mod:`~sae_lens_attn.training.checkpoints`) hold everything needed to
continue bit for bit: the SAEs, the optimizer, step, dead-latent counters, RNG states and the data position
of every rank, and the run id; :meth:`Trainer.restore` verifies one against its manifest first. On SIGINT
or SIGTERM (:mod:`~sae_lens_attn.training.preempt`) the trainer finishes the current step, writes a
checkpoint and raises :class:`TrainingInterrupted`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from sae_lens_attn.activations import NonFiniteActivationError, SiteBatch
from sae_lens_attn.errors import InputError
from sae_lens_attn.files import append_text, ensure_dir
from sae_lens_attn.interop import check_version
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site

# Re-exported: ``from sae_lens_attn.training.trainer import ...`` keeps working for all of these.
from .checkpoints import (  # noqa: F401
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    MANIFEST_FILENAME,
    STATE_FILENAME,
    CheckpointError,
    CheckpointWriteError,
    checkpoint_run_id,
    latest_checkpoint,
    load_trainer_state,
    remove_partial_checkpoints,
    rng_state,
    set_rng_state,
    verify_checkpoint,
    write_checkpoint,
)
from .distributed import Dist
from .preempt import StopSignals, TrainingInterrupted
from .step import LayoutAwareAdam, OptimConfig, SiteState, StepStats, lr_factor  # noqa: F401


class Trainer:
    """Trains one SAE per site from a shared stream of batches.

    ``dist``: the process group (``Dist()`` for one process). In ``dp`` mode every rank passes the same
    SAEs and its own share of each batch; in ``sites`` mode each rank passes only its own sites' SAEs.
    ``loggers``: callables receiving each JSONL log record (e.g. Weights & Biases), on rank 0 only.
    ``run_id``: recorded in every checkpoint; :meth:`restore` refuses a checkpoint of another run.
    """

    def __init__(
        self,
        saes: Mapping[Site, SAE],
        cfg: OptimConfig,
        out_dir: str | os.PathLike | None = None,
        dist: Dist | None = None,
        loggers: Sequence[Callable[[dict], None]] = (),
        run_id: str | None = None,
    ):
        if not saes:
            raise InputError("Trainer needs at least one SAE")
        self.cfg = cfg
        self.dist = dist or Dist()
        group = self.dist if self.dist.data_parallel else Dist()
        self.states = {site: SiteState(sae, cfg, group) for site, sae in saes.items()}
        self.step_idx = 0
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.loggers = list(loggers)
        self.run_id = run_id
        self.batches_consumed = 0
        """Batches taken from the iterator so far (restored from a checkpoint): the data position."""
        self.extra: dict = {}
        """Stored in every checkpoint (``run.py`` records how its batches are made)."""

    @property
    def saes(self) -> dict[Site, SAE]:
        return {s: st.sae for s, st in self.states.items()}

    @property
    def _writes(self) -> bool:
        return self.out_dir is not None and self.dist.is_main

    def fit(self, batches: Iterator[Mapping[Site, SiteBatch]], progress=None) -> dict[Site, StepStats]:
        """Run until ``cfg.steps`` steps are done or ``batches`` ends; returns the last step's stats.

        After :meth:`restore`, ``batches`` must start at the checkpoint's data position
        (``batches_consumed``), which is what ``run.py`` arranges. A SIGINT or SIGTERM meanwhile ends the
        current step, writes a checkpoint and raises :class:`TrainingInterrupted` (see ``preempt.py``).
        """
        last: dict[Site, StepStats] = {}
        t0 = time.perf_counter()
        if self._writes:
            ensure_dir(self.out_dir)
        with StopSignals() as stop:
            while self.step_idx < self.cfg.steps:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                missing = [s.label for s in self.states if s not in batch]
                if missing:
                    raise KeyError(f"batch lacks sites {missing}")
                try:
                    last = {site: st.step(batch[site], self.step_idx) for site, st in self.states.items()}
                except (NonFiniteActivationError, FloatingPointError) as err:
                    kept = self._last_checkpoint()
                    where = f"; the last good checkpoint is {kept} (resume from it with --resume)" if kept else ""
                    raise type(err)(f"{err}{where}") from err
                self.step_idx += 1
                self.batches_consumed += 1
                if progress is not None:
                    progress(self.step_idx, last)
                if self.step_idx % self.cfg.log_every == 0 or self.step_idx == self.cfg.steps:
                    self._write_log(last, time.perf_counter() - t0)
                written = None
                if self.cfg.checkpoint_every and self.step_idx % self.cfg.checkpoint_every == 0:
                    written = self.checkpoint()
                self._stop_if_signalled(stop, written)
        return last

    def _stop_if_signalled(self, stop: StopSignals, written: Path | None) -> None:
        """After a complete step: on a signal (on any rank), checkpoint this step and raise."""
        signum = stop.signum
        if self.dist.world_size > 1:  # a collective on every rank, every step: all ranks stop at the same step
            someone = not self.dist.all_agree(stop.signum is None)
            signum = signum or (signal.SIGTERM if someone else None)
        if signum is None:
            return
        ckpt = written if written is not None else self.checkpoint()
        raise TrainingInterrupted(signum, self.step_idx, ckpt)

    def _write_log(self, stats: Mapping[Site, StepStats], elapsed: float) -> None:
        if self.dist.mode == "sites" and self.dist.world_size > 1:
            parts = self.dist.gather_object({s.label: st._asdict() for s, st in stats.items()})
            merged = {k: v for part in parts or [] for k, v in part.items()}
        else:
            merged = {s.label: st._asdict() for s, st in stats.items()}
        if not self.dist.is_main:
            return
        lines = []
        for label in sorted(merged, key=lambda lab: Site.parse(lab)):
            rec = {"step": self.step_idx, "site": label, "elapsed_s": round(elapsed, 3), **merged[label]}
            note = self.cfg.dead_note(self.step_idx)
            if note:
                rec.update(dead_fraction=None, dead_note=note)
            lines.append(json.dumps(rec) + "\n")
            for logger in self.loggers:
                logger(rec)
        if self.out_dir is not None:
            append_text(self.out_dir / "log.jsonl", "".join(lines))

    # --- checkpoints ----------------------------------------------------------------------------------
    def _site_payloads(self) -> dict[str, dict]:
        """Everything a checkpoint holds for this rank's sites, as CPU objects."""
        out = {}
        for site, st in self.states.items():
            out[site.label] = {
                "cfg": dataclasses.replace(st.sae.cfg, device="cpu"),
                "params": {n: p.detach().cpu().clone() for n, p in st.sae.named_parameters()},
                "log_sparsity": st.log_sparsity(),
                "state": st.state_dict(),
            }
        return out

    def gather_saes(self) -> dict[Site, SAE]:
        """Every site's SAE on rank 0 (collective in ``sites`` mode); other ranks get their own SAEs."""
        if not (self.dist.mode == "sites" and self.dist.world_size > 1):
            return self.saes
        parts = self.dist.gather_object(
            {s.label: (dataclasses.replace(st.sae.cfg, device="cpu"), st.sae.state_dict()) for s, st in self.states.items()}
        )
        if not self.dist.is_main:
            return self.saes
        device = next(iter(self.states.values())).sae.W_dec.device
        out: dict[Site, SAE] = {}
        for part in parts or []:
            for label, (cfg, sd) in part.items():
                sae = SAE(dataclasses.replace(cfg, device=str(device)), init=False)
                sae.load_state_dict(sd)
                out[Site.parse(label)] = sae
        return dict(sorted(out.items()))

    def gather_log_sparsity(self) -> dict[Site, torch.Tensor]:
        """Every site's log10 firing frequency on rank 0 (collective in ``sites`` mode)."""
        local = {s.label: st.log_sparsity() for s, st in self.states.items()}
        if not (self.dist.mode == "sites" and self.dist.world_size > 1):
            return {Site.parse(k): v for k, v in local.items()}
        parts = self.dist.gather_object(local) or []
        return {Site.parse(k): v for part in parts for k, v in part.items()}

    def checkpoint(self, extra: dict | None = None) -> Path | None:
        """Write ``checkpoints/step_N`` atomically (a collective: every rank calls it; rank 0 writes).

        Raises :class:`CheckpointWriteError` on every rank when rank 0 cannot write (e.g. a full disk); the
        partial directory is removed and the earlier checkpoints are untouched.
        """
        if self.out_dir is None:
            return None
        rank_info = {"rank": self.dist.rank, "rng": rng_state(), "batches_consumed": self.batches_consumed,
                     "extra": {**self.extra, **(extra or {})}}
        multi = self.dist.world_size > 1
        sites_mode = self.dist.mode == "sites" and multi
        payload_parts = self.dist.gather_object(self._site_payloads()) if sites_mode else None
        ranks = self.dist.gather_object(rank_info) if multi else [rank_info]
        final, error = None, None
        if self.dist.is_main:
            payloads = (
                {k: v for part in payload_parts or [] for k, v in part.items()} if sites_mode else self._site_payloads()
            )
            try:
                final = self._write_checkpoint(payloads, ranks or [rank_info])
            except Exception as err:  # every rank learns of it below, then each raises
                error = err
        ok = self.dist.all_agree(error is None)
        if error is not None:
            raise error
        if not ok:
            raise CheckpointWriteError(self.out_dir / "checkpoints", "rank 0 could not write the checkpoint",
                                       what=f"the checkpoint of step {self.step_idx}", fix="see rank 0's error")
        return final

    def _write_checkpoint(self, payloads: dict[str, dict], ranks: list[dict]) -> Path:
        state = {
            "sites": {label: p["state"] for label, p in payloads.items()},
            "world_size": self.dist.world_size,
            "mode": self.dist.mode,
            "ranks": ranks,
            # Kept for checkpoints read by older code: rank 0's RNG and extra.
            "torch_rng": ranks[0]["rng"]["torch"],
            "extra": ranks[0]["extra"],
        }
        return write_checkpoint(self.out_dir, self.step_idx, payloads, state, run_id=self.run_id)

    def _last_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.out_dir) if self.out_dir is not None else None

    def restore(self, ckpt: str | os.PathLike) -> dict:
        """Load this rank's SAE weights and trainer state from a checkpoint directory; returns its ``extra``.

        The checkpoint is verified first (manifest sizes and sha256, format version, and the run id when this
        trainer has one); any problem raises :class:`CheckpointError` naming the file. Sets ``step_idx`` and
        ``batches_consumed``.
        """
        ckpt = Path(ckpt)
        verify_checkpoint(ckpt)
        state = load_trainer_state(ckpt)
        if self.run_id is not None and state.get("run_id") != self.run_id:
            raise CheckpointError(
                f"{ckpt} belongs to run {state.get('run_id')!r}, not to this run {self.run_id!r}; resume a "
                "checkpoint of this run, or train into a new --out-dir"
            )
        missing = [s.label for s in self.states if s.label not in state["sites"]]
        if missing:
            raise CheckpointError(
                f"{ckpt / STATE_FILENAME} has no state for site(s) {missing} (it holds {sorted(state['sites'])}); "
                "resume with the same --layers/--site/--head, or start in a new --out-dir"
            )
        for site, st in self.states.items():
            check_version(ckpt / site.label)
            loaded = SAE.load(ckpt / site.label, device=st.sae.W_dec.device)
            if (loaded.cfg.d_in, loaded.cfg.d_sae, loaded.cfg.k) != (st.sae.cfg.d_in, st.sae.cfg.d_sae, st.sae.cfg.k):
                raise CheckpointError(
                    f"{ckpt / site.label}: the checkpoint's SAE has d_in={loaded.cfg.d_in}, d_sae={loaded.cfg.d_sae}, "
                    f"k={loaded.cfg.k}, but this run builds d_in={st.sae.cfg.d_in}, d_sae={st.sae.cfg.d_sae}, "
                    f"k={st.sae.cfg.k}; resume with the original settings"
                )
            with torch.no_grad():
                for name, p in st.sae.named_parameters():
                    p.copy_(getattr(loaded, name))
            st.load_state_dict(state["sites"][site.label])
        self.step_idx = int(state["step"])
        ranks = state.get("ranks") or [{"rng": {"torch": state["torch_rng"]}, "batches_consumed": self.step_idx,
                                        "extra": state.get("extra", {})}]
        mine = ranks[self.dist.rank] if len(ranks) == self.dist.world_size else ranks[0]
        self.batches_consumed = int(mine.get("batches_consumed", self.step_idx))
        set_rng_state(mine.get("rng", {}))
        return dict(mine.get("extra") or {}, world_size=int(state.get("world_size", 1)),
                    mode=str(state.get("mode", "none")))
