"""TopK vs gradient-aware SAEs (g-SAE, Olmo et al. 2024) on every layer's hook_z, at several k, betas and seeds.

The question the g-SAE paper raises: at the same sparsity, does gradient-aware selection give
reconstructions that are more faithful downstream (CE loss recovered, KL), fewer dead latents, and better
steering than plain TopK? One model pass with gradients over the training rows is harvested once, and every
SAE trains from those same activations; each g-SAE is paired with the TopK SAE of the same (layer, k, seed),
which has the same initialisation and sees the same batches in the same order. All SAEs are evaluated on the
same held-out rows, with TopK selection (no gradient at evaluation: a trained g-SAE is used as a TopK SAE,
which is how it is saved). Metrics and steering: :mod:`.gsae_study_eval`; paired differences with 95%
intervals, table and figure: :mod:`.gsae_study_stats`.

The g-SAE rule is :meth:`sae_lens_attn.sae.SAE.gsae_scores`: select the k largest
``z_i * (1 + beta * |W_dec[i] . g|)``, z = ReLU(pre), g = dL/dx at the site for the summed next-token cross
entropy (detached); kept values are the plain activations; latents with pre <= 0 keep their raw
pre-activation as score, so beta = 0 is TopK exactly.

Resumable: every finished (layer, k, seed, rule, beta) is written at once to ``results.json`` and its per-row
sums to ``eval_rows.json`` (each written to a temp file and renamed over the old one); a rerun with the same
settings skips what is there. The training text is the shipped sample (about 333k tokens); ``--tokens``
beyond what is left after the evaluation rows is reached by further epochs, each in a fresh order.

Run (the committed results; hours on one CPU thread)::

    python -m sae_lens_attn.frontends.gsae_study --tokens 1000000 --betas 0.5,1,2,4 --out benchmarks/gsae_study

and on 1M distinct tokens (``--dataset``: a folder of the model's training texts, without the held-out plays)::

    python -m sae_lens_attn.frontends.gsae_study --tokens 1000000 --ks 8,16 --betas 1,4 --dataset <folder> \
        --out benchmarks/gsae_study_distinct
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae_lens_attn.activations import epoch_batches, harvest_all
from sae_lens_attn.analysis.commands import HelpFormatter
from sae_lens_attn.data import token_rows
from sae_lens_attn.errors import InputError
from sae_lens_attn.files import ensure_dir, write_json, write_text
from sae_lens_attn.models import SAMPLE_TEXT, load_model, token_policy
from sae_lens_attn.sae import SAE, SAEConfig
from sae_lens_attn.sites import Site
from sae_lens_attn.spec import UnsupportedModelError, model_spec
from sae_lens_attn.training.commands import add_config_arguments, int_list
from sae_lens_attn.training.config import OptimSettings
from sae_lens_attn.training.trainer import OptimConfig, Trainer

from .gsae_study_eval import SteerConfig, sae_eval, site_eval
from .gsae_study_stats import METRICS, figure, paired, row_metrics, run_key, table

RESULTS, ROWS, PAIRED = "results.json", "eval_rows.json", "paired.json"

#: The study's optimiser settings: shorter warm-up and dead window than ``train``'s, for runs of a few
#: hundred steps (the committed studies used these).
STUDY_OPTIM = OptimSettings(warmup_steps=20, dead_tokens=100_000)


@dataclass
class StudyConfig:
    """Everything a result depends on besides (layer, k, seed, rule, beta); a rerun must match it to resume."""

    model: str | None = None
    """Hub id or local dir; None: the embedded model."""
    tokens: int = 1_000_000
    """Training tokens per SAE (at least: whole batches, rounded up)."""
    batch_size: int = 4096
    """Activation vectors (tokens) per optimizer step."""
    expansion: int = 8
    """d_sae = expansion * d_in."""
    context_size: int = 128
    """Tokens per model row (the start token included)."""
    eval_rows: int = 128
    """Held-out rows (the first of a seed-0 shuffle of the sample text's rows); the rest train."""
    optim: OptimSettings = field(default_factory=lambda: dataclasses.replace(STUDY_OPTIM))
    """The optimiser settings, as ``train`` takes them (flags ``--lr``, ``--warmup-steps``, ...)."""
    steer: SteerConfig = field(default_factory=SteerConfig)
    """The steering measure's choices (flags ``--steer-alpha``, ``--steer-rows``, ...)."""
    dataset: str | None = None
    """Training text (file or folder; see :func:`~sae_lens_attn.data.token_rows`) instead of the rest of the
    sample: about ``tokens`` distinct tokens, one epoch. The evaluation rows stay the sample's held-out rows,
    so the dataset must not contain the sample's plays (unless ``eval_from_dataset``)."""
    eval_from_dataset: bool | None = None
    """Hold the evaluation rows out of ``dataset`` (a seed-0 shuffle of its rows, the first ``eval_rows``; as
    ``train`` does) instead of the sample's: for a model other than the embedded one, whose evaluation text
    should be the training distribution. None/False: the sample's held-out rows."""
    harvest_tokens: int | None = None
    """With ``eval_from_dataset``: distinct training tokens harvested (model pass with gradients, the costly
    part); the budget ``tokens`` is reached by further epochs over them, each in a fresh order. None: as many as
    the budget."""
    layers: list[int] | None = None
    """Layers whose hook_z the SAEs are trained on; None: every layer."""
    start_token: str | None = None
    """The model's start-token rule (``load_model(start_token=)``); None: the tokenizer's own."""

    def __post_init__(self) -> None:
        self.eval_from_dataset = self.eval_from_dataset or None  # False and None: the sample's rows, saved alike
        for name in ("tokens", "batch_size", "expansion", "context_size", "eval_rows"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.eval_from_dataset and not self.dataset:
            raise InputError("eval_from_dataset needs a dataset to hold the evaluation rows out of; pass --dataset")
        if self.steer.rows > self.eval_rows:
            raise InputError(f"steer rows ({self.steer.rows}) exceed eval_rows ({self.eval_rows}); lower --steer-rows")

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.batch_size)

    def settings(self) -> dict:
        """What a result depends on, as saved in results.json: the optimiser settings at the top level (as
        studies before the nesting saved lr, warmup_steps and dead_tokens), the steering ones under ``steer``."""
        flat = dataclasses.asdict(self)
        return {**{k: v for k, v in flat.items() if k != "optim"}, **flat["optim"]}


class Store:
    """``results.json`` (one record per SAE) and ``eval_rows.json`` (their per-row sums) in ``out``."""

    def __init__(self, out: Path, settings: dict):
        self.out = out
        ensure_dir(out)
        self.results = {"settings": settings, "runs": []}
        self.rows = {"settings": settings, "sites": {}, "saes": {}}
        if (out / RESULTS).exists():
            old = json.loads((out / RESULTS).read_text())
            if not isinstance(old, dict) or "settings" not in old:
                raise InputError(f"{out / RESULTS} has no settings (an older study's file); move it away or use another --out")
            # settings saved before the optimiser's were all flags used OptimSettings' defaults for the rest
            was = {**{k: v for k, v in dataclasses.asdict(OptimSettings()).items() if k in settings}, **old["settings"]}
            diff = sorted(k for k in settings.keys() | was.keys() if settings.get(k) != was.get(k))
            if diff:  # a setting added since (absent there) counts as its default, None
                raise InputError(f"{out / RESULTS} was made with other settings ({', '.join(diff)}); rerun with its "
                                 "settings to resume, or use another --out")
            self.results = old
            if (out / ROWS).exists():
                self.rows = json.loads((out / ROWS).read_text())

    def done(self, key: str) -> bool:
        return key in self.rows["saes"] and any(r["key"] == key for r in self.results["runs"])

    def add(self, records: list[dict], rows: dict[str, dict], sites: dict[str, dict]) -> None:
        self.rows["sites"] = sites
        self.rows["saes"].update(rows)
        keys = {r["key"] for r in records}
        self.results["runs"] = [r for r in self.results["runs"] if r["key"] not in keys] + records
        self._write(ROWS, self.rows)  # rows first: a record without its rows is redone
        self._write(RESULTS, self.results)

    def _write(self, name: str, obj: dict) -> None:
        write_json(self.out / name, obj, indent=None if name == ROWS else 1)


def _record(key: str, layer: int, k: int, seed: int, rule: str, beta: float | None, d_sae: int, site: dict,
            rows: dict) -> dict:
    ones = torch.ones(1, len(site["n_tok"]), dtype=torch.float64)
    m = row_metrics(site, rows, d_sae, ones, torch.ones(1, len(rows["steer"]), dtype=torch.float64))
    n_tok = sum(site["n_tok"])
    return {"key": key, "layer": layer, "k": k, "seed": seed, "rule": rule, "beta": beta, "d_sae": d_sae,
            **{name: float(v[0]) for name, v in m.items()}, "l0": sum(rows["l0"]) / n_tok,
            "ce_clean": sum(site["ce_clean"]) / sum(site["n_pred"]), "ce_spliced": sum(rows["ce_spliced"]) / sum(site["n_pred"])}


def _grid(ks: list[int], seeds: list[int], betas: list[float]) -> list[tuple[int, int, str, float | None]]:
    """Seed-major, so an interrupted run holds whole seeds; per (seed, k) TopK first, then each beta."""
    return [(seed, k, rule, beta) for seed in seeds for k in ks
            for rule, beta in [("topk", None), *(("gsae", b) for b in betas)]]


def _study_rows(cfg: StudyConfig, model) -> tuple[torch.Tensor, torch.Tensor]:
    """(evaluation rows, training rows): a seed-0 shuffle of the sample's rows, the first ``eval_rows`` held
    out; the training rows come from ``cfg.dataset`` instead when it is given."""
    if cfg.eval_from_dataset:
        return _dataset_rows(cfg, model)
    rows = token_rows(SAMPLE_TEXT, model.tokenizer, cfg.context_size, token_policy(model))
    rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))]
    if rows.shape[0] <= cfg.eval_rows:
        raise InputError(f"the text gives {rows.shape[0]} rows, not more than eval_rows={cfg.eval_rows}; lower --eval-rows")
    eval_r, train_r = rows[: cfg.eval_rows], rows[cfg.eval_rows :]
    if cfg.dataset is not None:
        per_row = cfg.context_size - token_policy(model).n_structural
        train_r = token_rows(cfg.dataset, model.tokenizer, cfg.context_size, token_policy(model),
                             max_rows=math.ceil(cfg.steps * cfg.batch_size / per_row))
    return eval_r, train_r


def _dataset_rows(cfg: StudyConfig, model) -> tuple[torch.Tensor, torch.Tensor]:
    """(evaluation rows, training rows) from ``cfg.dataset`` alone: enough rows for the budget plus the held-out
    rows, shuffled by row with seed 0, the first ``eval_rows`` held out."""
    per_row = cfg.context_size - token_policy(model).n_structural
    need = cfg.eval_rows + math.ceil((cfg.harvest_tokens or cfg.steps * cfg.batch_size) / per_row)
    rows = token_rows(cfg.dataset, model.tokenizer, cfg.context_size, token_policy(model), max_rows=need)
    if rows.shape[0] <= cfg.eval_rows:
        raise InputError(f"{cfg.dataset} gives {rows.shape[0]} rows, not more than eval_rows={cfg.eval_rows}")
    rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))]
    return rows[: cfg.eval_rows], rows[cfg.eval_rows :]


def _train_saes(cfg: StudyConfig, model, sites: list[Site], data, seed: int, k: int, rule: str,
                beta: float | None) -> dict[Site, SAE]:
    """One SAE per site for one (seed, k, rule, beta), trained on the harvested ``data``. Both rules get the
    same initialisation and the same batch order for a seed."""
    saes = {}
    for s in sites:
        d_in = s.d_in(model.cfg)
        sae = SAE(SAEConfig(d_in=d_in, d_sae=cfg.expansion * d_in, k=k, selection=rule,
                            gsae_beta=1.0 if beta is None else beta), init=False)
        sae.reset_parameters(torch.Generator().manual_seed(1000 * seed + s.layer))  # same init for both rules
        saes[s] = sae
    optim = OptimConfig.of(cfg.optim, steps=cfg.steps, batch_size=cfg.batch_size)
    Trainer(saes, optim).fit(epoch_batches(data, cfg.batch_size, seed=seed))  # same batch order for both rules
    return saes


def _evaluate(cfg: StudyConfig, model, saes: dict[Site, SAE], bases, sites_json: dict, grid_point,
              train_s: float) -> tuple[list[dict], dict]:
    """Each SAE's evaluation: its result record and its per-row sums."""
    seed, k, rule, beta = grid_point
    records, rows_json = [], {}
    for s, sae in saes.items():
        t2 = time.time()
        key = run_key(s.layer, k, seed, rule, beta)
        rows_json[key] = sae_eval(model, sae, bases[s], cfg.steer).as_json()
        rec = _record(key, s.layer, k, seed, rule, beta, sae.cfg.d_sae, sites_json[str(s.layer)], rows_json[key])
        rec.update(train_s=round(train_s, 1), eval_s=round(time.time() - t2, 1), threads=torch.get_num_threads(),
                   load_1min=round(os.getloadavg()[0], 2), train_tokens=cfg.steps * cfg.batch_size,
                   finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        records.append(rec)
    return records, rows_json


def _print_progress(records: list[dict], i: int, todo: list, spent: dict[str, list[float]], t1: float) -> None:
    seed, k, rule, beta = todo[i]
    left = sum(_mean(spent[r] or spent["topk"] or spent["gsae"]) for _, _, r, _ in todo[i + 1 :])
    for rec in records:
        print(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in rec.items()
                          if key in ("key", "l0", "fvu", "ce_recovered_zero", "kl_spliced", "dead_fraction",
                                     "steering", "train_s", "eval_s", "load_1min")}), flush=True)
    print(f"[{i + 1}/{len(todo)}] {rule} beta={beta} k={k} seed={seed}: {time.time() - t1:.0f}s; "
          f"about {left / 60:.0f} min left", flush=True)


def run_study(cfg: StudyConfig, ks: list[int], seeds: list[int], betas: list[float], out: Path) -> Store:
    model = load_model(cfg.model, device="cpu", start_token=cfg.start_token)
    if model_spec(model).kind != "causal":
        raise UnsupportedModelError(
            f"the g-SAE study needs a causal LM (next-token loss, its gradient and CE recovered); {cfg.model} is "
            "an encoder: train and evaluate g-SAEs on it with sae-lens-attn train --sae gsae (masked-token loss) instead")
    sites = [Site(layer) for layer in (cfg.layers if cfg.layers is not None else range(model.cfg.n_layers))]
    eval_r, train_r = _study_rows(cfg, model)
    store = Store(out, cfg.settings())
    grid = _grid(ks, seeds, betas)
    todo = [g for g in grid if not all(store.done(run_key(s.layer, g[1], g[0], g[2], g[3])) for s in sites)]
    print(f"{len(grid) - len(todo)} of {len(grid)} trainings already in {out}; {len(todo)} to run", flush=True)
    if not todo:
        return store
    t0 = time.time()
    bases = {}
    for s in sites:
        bases[s] = site_eval(model, s, eval_r, cfg.steer, clean_logits=next(iter(bases.values())).clean_logits if bases else None)
    sites_json = {str(s.layer): b.as_json() for s, b in bases.items()}
    print(f"evaluation baselines in {time.time() - t0:.0f}s", flush=True)
    t0 = time.time()
    data = harvest_all(model, train_r, sites, with_grad=True)
    n_train = next(iter(data.values())).acts.shape[0]
    print(f"harvested {n_train:,} tokens with gradients in {time.time() - t0:.0f}s; {cfg.steps} steps of "
          f"{cfg.batch_size} = {cfg.steps * cfg.batch_size:,} tokens per SAE ({cfg.steps * cfg.batch_size / n_train:.2f} epochs)",
          flush=True)
    spent: dict[str, list[float]] = {"topk": [], "gsae": []}
    for i, (seed, k, rule, beta) in enumerate(todo):
        t1 = time.time()
        saes = _train_saes(cfg, model, sites, data, seed, k, rule, beta)
        records, rows_json = _evaluate(cfg, model, saes, bases, sites_json, (seed, k, rule, beta), time.time() - t1)
        store.add(records, rows_json, sites_json)
        spent[rule].append(time.time() - t1)
        _print_progress(records, i, todo, spent, t1)
    return store


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def report(out: Path, n_boot: int = 2000) -> str:
    """paired.json, table.md and the figure from the files in ``out``; returns the table."""
    results = json.loads((out / RESULTS).read_text())
    rows = json.loads((out / ROWS).read_text()) if (out / ROWS).exists() else None
    entries = paired(results, rows, n_boot=n_boot)
    if not entries:
        raise InputError(f"{out / RESULTS} has no g-SAE run with its TopK pair; run the study first")
    write_json(out / PAIRED, {"n_boot": n_boot, "metrics": [m[0] for m in METRICS], "entries": entries}, indent=1)
    text = ("Paired difference g-SAE - TopK (same layer, k, seed), mean over seeds [95% t-interval over seeds, "
            "df = n - 1]; * where the interval excludes 0.\n\n" + table(entries, "t95"))
    if rows is not None:
        text += ("\n\nThe same differences with a 95% paired bootstrap over evaluation rows (SAEs fixed; "
                 f"{n_boot} resamples, percentile interval): evaluation noise only.\n\n" + table(entries, "boot95"))
    write_text(out / "table.md", text + "\n")
    png = figure(entries, out / "gsae_vs_topk.html")
    print(f"wrote {out / PAIRED}, {out / 'table.md'}, {out / 'gsae_vs_topk.html'}" + (f", {png}" if png else " (no PNG: kaleido absent)"))
    return text


def _parser() -> argparse.ArgumentParser:
    """The grid and run flags, then one flag per field of StudyConfig, OptimSettings and SteerConfig (help: the
    field docstrings)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--ks", type=int_list, default="8,16,32", help="TopK k values")
    p.add_argument("--seeds", type=int_list, default="0,1,2")
    p.add_argument("--betas", default="0.5,1,2,4", help="g-SAE betas; each g-SAE is paired with the TopK SAE")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: $OMP_NUM_THREADS, else torch's)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the second interval")
    p.add_argument("--report-only", action="store_true", help="only rebuild paired.json, table.md and the figure")
    p.add_argument("--out", default="benchmarks/gsae_study")
    add_config_arguments(p, StudyConfig)
    add_config_arguments(p, OptimSettings, defaults=STUDY_OPTIM)
    add_config_arguments(p, SteerConfig, prefix="steer_")
    return p


def config_from_args(a: argparse.Namespace) -> StudyConfig:
    """The StudyConfig the flags give (nested settings by their fields, no field named by hand)."""
    def of(cls, prefix: str = ""):
        return {f.name: getattr(a, prefix + f.name) for f in dataclasses.fields(cls) if f.name not in ("optim", "steer")}

    return StudyConfig(**of(StudyConfig), optim=OptimSettings(**of(OptimSettings)),
                       steer=SteerConfig(**of(SteerConfig, "steer_")))


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    threads = a.threads or (int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS") else None)
    if threads:
        torch.set_num_threads(threads)
    out = Path(a.out)
    if not a.report_only:
        t0 = time.time()
        run_study(config_from_args(a), a.ks, a.seeds, [float(b) for b in a.betas.split(",") if b], out)
        print(f"study done in {time.time() - t0:.0f}s on {torch.get_num_threads()} thread(s)", flush=True)
    print(report(out, a.n_boot))


if __name__ == "__main__":
    main()
