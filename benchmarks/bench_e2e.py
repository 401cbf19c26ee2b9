"""End to end: tokens/s of harvest plus training, TopK and g-SAE, one SAE per layer (all layers at once).

For each model and each selection rule this runs the real pipeline: ``stream.activation_batches`` (which calls
``harvest`` on ``model_batch_rows`` token rows at a time, with ``with_grad=True`` for the g-SAE, and shuffles
through its token buffer) feeding ``Trainer.fit`` with one SAE per layer at ``hook_z`` (all heads). After
``--warmup`` steps (b_dec initialisation, Adam state, allocator), ``--steps`` steps are timed and split into

* harvest: time spent inside ``harvest`` (the model's forward, and backward for g-SAE), counted by wrapping
  ``sae_lens_attn.activations.harvest`` (the pipeline's own function, only timed), over the tokens it
  produced;
* buffer: the rest of the time in ``next(batches)`` (concatenating, shuffling and indexing the buffer);
* train: the rest of ``Trainer.fit`` (every site's ``SiteState.step``), over the tokens trained on.

Reported: harvest tokens/s, train tokens/s (tokens trained per second of training, all sites together),
combined tokens/s (tokens trained / wall time of the timed steps), and the g-SAE / TopK ratio of the time
per trained token (the issue's target: at most 2.5x). The harvest keeps about one batch in its buffer, so
the harvested token count is close to, not exactly, the trained one.

Models:

* ``embedded``: ``sae_lens_attn.load_model()`` (the shipped 2-layer model) on the sample text;
* ``gpt2``: a GPT-2-small-shaped model with random weights (12 layers, 12 heads of 64, d_model 768, vocab
  50257), made with transformers' ``GPT2Config``/``GPT2LMHeadModel``, saved to a temporary directory with a
  small BPE tokenizer, and loaded with ``sae_lens_attn.load_model(dir)``; its rows are random tokens.

Quick check (seconds)::

    nice -n 19 python benchmarks/bench_e2e.py --d-sae 512 --d-sae-embedded 512 --batch 256 --steps 1 \\
        --context 32 --gpt2-n-layer 2 --gpt2-n-embd 64 --gpt2-n-head 4 --gpt2-vocab 1000

Full CPU run (a few minutes on 2 cores; d_sae 24576 on GPT-2 shape, 8192 = 32 x 256 on the embedded model)::

    nice -n 19 python benchmarks/bench_e2e.py --json benchmarks/results/e2e.json --markdown benchmarks/results/e2e.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import _report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def make_gpt2_dir(path: Path, n_layer: int, n_head: int, n_embd: int, vocab: int, n_ctx: int, seed: int) -> Path:
    """A GPT-2-shaped model with random weights, in Hugging Face format, plus a small BPE tokenizer (the
    rows are random token ids, so the tokenizer only supplies BOS/EOS)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from sae_lens_attn.models import SAMPLE_TEXT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 1000), special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([Path(SAMPLE_TEXT).read_text()[:200_000]], trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                     unk_token="<|endoftext|>")
    hf_tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=max(1024, n_ctx),
                     bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


class HarvestClock:
    """Wraps ``sae_lens_attn.activations.harvest`` (looked up by ``activation_batches`` at call time) to
    count its time and the tokens it kept."""

    def __init__(self):
        from sae_lens_attn import activations

        self.mod = activations
        self.orig = activations.harvest
        self.seconds = 0.0
        self.tokens = 0
        self.calls = 0

        def timed(*a, **kw):
            t0 = time.perf_counter()
            h = self.orig(*a, **kw)
            self.seconds += time.perf_counter() - t0
            self.tokens += int(h.mask.sum())
            self.calls += 1
            return h

        activations.harvest = timed

    def reset(self):
        self.seconds, self.tokens, self.calls = 0.0, 0, 0

    def close(self):
        self.mod.harvest = self.orig


class TimedIter:
    """Time spent in ``next()`` of the batch iterator (harvest + buffer work)."""

    def __init__(self, it):
        self.it = it
        self.seconds = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.seconds += time.perf_counter() - t0


def run_case(model, rows, label: str, selection: str, d_sae: int, args) -> dict:
    import torch

    from sae_lens_attn.sae import SAE, SAEConfig
    from sae_lens_attn.sites import parse_sites
    from sae_lens_attn.stream import activation_batches
    from sae_lens_attn.training.trainer import OptimConfig, Trainer

    sites = parse_sites("all", "z", n_layers=model.cfg.n_layers)
    saes = {}
    for i, site in enumerate(sites):
        sae = SAE(SAEConfig(d_in=site.d_in(model.cfg), d_sae=d_sae, k=args.k, selection=selection,
                            dtype=args.sae_dtype), init=False)
        sae.reset_parameters(torch.Generator().manual_seed(args.seed * 1000 + i))
        sae.to(args.device)
        sae.bf16_select = args.bf16_select
        saes[site] = sae
    total = args.warmup + args.steps
    ocfg = OptimConfig(steps=args.warmup, warmup_steps=0, decay_fraction=0.0, log_every=10**9)
    trainer = Trainer(saes, ocfg)
    clock = HarvestClock()
    try:
        batches = TimedIter(activation_batches(
            model, rows, sites, args.batch, model_batch_rows=args.model_batch_rows,
            buffer_tokens=2 * args.batch, with_grad=(selection == "gsae"), seed=args.seed,
        ))
        t0 = time.perf_counter()
        if args.warmup:
            trainer.fit(batches)
        warm_s = time.perf_counter() - t0
        clock.reset()
        batches.seconds = 0.0
        ocfg.steps = total
        t0 = time.perf_counter()
        last = trainer.fit(batches)
        wall = time.perf_counter() - t0
    finally:
        clock.close()
    steps_done = trainer.step_idx - args.warmup
    trained = steps_done * args.batch
    harvest_s, next_s = clock.seconds, batches.seconds
    train_s = wall - next_s
    d_in = sites[0].d_in(model.cfg)
    return {
        "model": label,
        "selection": selection,
        "sites": len(sites),
        "d_in": d_in,
        "d_sae": d_sae,
        "k": args.k,
        "batch": args.batch,
        "timed_steps": steps_done,
        "warmup_steps": args.warmup,
        "warmup_s": warm_s,
        "wall_s": wall,
        "harvest_s": harvest_s,
        "harvest_calls": clock.calls,
        "harvest_tokens": clock.tokens,
        "buffer_s": next_s - harvest_s,
        "train_s": train_s,
        "trained_tokens": trained,
        "harvest_tokens_per_s": clock.tokens / harvest_s if harvest_s > 0 else None,
        "train_tokens_per_s": trained / train_s if train_s > 0 else None,
        "combined_tokens_per_s": trained / wall if wall > 0 else None,
        "s_per_token": wall / trained if trained else None,
        "train_s_per_step_per_site": train_s / max(1, steps_done) / len(sites),
        "last_fvu_mean": sum(s.fvu for s in last.values()) / len(last) if last else None,
    }


def load(label: str, args, tmp: Path):
    import torch

    from sae_lens_attn import load_model
    from sae_lens_attn.data import token_rows
    from sae_lens_attn.models import SAMPLE_TEXT, bos_token_id

    if label == "embedded":
        model = load_model(device=args.device)
        n_ctx = min(args.context, int(model.cfg.n_ctx))
        rows = token_rows(SAMPLE_TEXT, model.tokenizer, n_ctx, bos_token_id(model))
        return model, rows, args.d_sae_embedded
    d = make_gpt2_dir(tmp / "gpt2_random", args.gpt2_n_layer, args.gpt2_n_head, args.gpt2_n_embd, args.gpt2_vocab,
                      args.context, args.seed)
    model = load_model(d, device=args.device)
    g = torch.Generator().manual_seed(args.seed)
    n_rows = max(args.model_batch_rows * 4, (args.warmup + args.steps + 3) * args.batch // max(1, args.context - 1) + 1)
    rows = torch.randint(1, args.gpt2_vocab, (n_rows, args.context), generator=g)
    rows[:, 0] = bos_token_id(model)
    return model, rows, args.d_sae


def render(result: dict, markdown: bool) -> str:
    headers = ["model", "sites x d_in", "d_sae", "rule", "harvest tok/s", "train tok/s", "combined tok/s",
               "harvest s", "buffer s", "train s", "train s/step/site"]
    rows = []
    for r in result["cases"]:
        if "error" in r:
            rows.append([r["model"], None, None, r["selection"], "error: " + r["error"][:100]] + [None] * 6)
            continue
        rows.append([r["model"], f"{r['sites']} x {r['d_in']}", r["d_sae"], r["selection"],
                     _report.fmt(r["harvest_tokens_per_s"], ",.0f"), _report.fmt(r["train_tokens_per_s"], ",.0f"),
                     _report.fmt(r["combined_tokens_per_s"], ",.0f"), _report.fmt(r["harvest_s"], ".1f"),
                     _report.fmt(r["buffer_s"], ".2f"), _report.fmt(r["train_s"], ".1f"),
                     _report.fmt(r["train_s_per_step_per_site"], ".2f")])
    table = (_report.markdown_table(headers, rows, "lllllrrrrrr") if markdown else _report.text_table(headers, rows))
    lines = []
    for label, rr in result["ratios"].items():
        if rr.get("gsae_over_topk") is None:
            continue
        verdict = "PASS" if rr["pass"] else "FAIL"
        if markdown:
            verdict = f"**{verdict}**"
        lines.append(f"{label}: g-SAE / TopK time per token {rr['gsae_over_topk']:.2f}x (target <= 2.5x) {verdict}; "
                     f"harvest {rr['harvest_ratio']:.2f}x, train {rr['train_ratio']:.2f}x")
    s, m = result["settings"], result["machine"]
    head = (f"End to end (harvest + training, all layers, hook_z), k {s['k']}, batch {s['batch']}, "
            f"SAE {s.get('sae_dtype', 'float32')}{', bf16 selection' if s.get('bf16_select') else ''}, "
            f"{s.get('device', 'cpu')}, "
            f"{s['threads']} thread(s); {s['steps']} timed step(s) after {s['warmup']} warm-up step(s)")
    if not markdown:
        return "\n".join([head, "", table, "", *lines])
    return "\n".join([
        f"### {head}", "", f"Command: `{result['command']}`", "",
        f"Machine: {m['host_cpu']} ({m['cpu_count']} cores); load average at start {m['loadavg_at_start']}; "
        f"{m['date']}; git {m['git']}.", "", table, "", *[f"- {x}" for x in lines],
    ]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", nargs="+", default=["embedded", "gpt2"], choices=["embedded", "gpt2"])
    p.add_argument("--selections", nargs="+", default=["topk", "gsae"], choices=["topk", "gsae"])
    p.add_argument("--d-sae", type=int, default=24576, help="d_sae on the GPT-2-shaped model")
    p.add_argument("--d-sae-embedded", type=int, default=8192, help="d_sae on the embedded model (32 x its d_in 256)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=2048, help="tokens per training step (every site)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--model-batch-rows", type=int, default=16)
    p.add_argument("--bf16-select", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda (gpu_bench.py uses cuda)")
    p.add_argument("--sae-dtype", default="float32", help="SAE parameter dtype")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpt2-n-layer", type=int, default=12)
    p.add_argument("--gpt2-n-head", type=int, default=12)
    p.add_argument("--gpt2-n-embd", type=int, default=768)
    p.add_argument("--gpt2-vocab", type=int, default=50257)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--markdown", default=None, metavar="PATH")
    args = p.parse_args(argv)

    import torch

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # progress bars are cosmetic
        pass
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    warning = _report.warn_if_busy(threads)
    if warning:
        print(warning, file=sys.stderr)
    cases = []
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        for label in args.models:
            model, rows, d_sae = load(label, args, Path(tmp))
            for sel in args.selections:
                print(f"{label} {sel}: {model.cfg.n_layers} sites, d_sae {d_sae}, batch {args.batch} ...",
                      file=sys.stderr, flush=True)
                try:
                    r = run_case(model, rows, label, sel, d_sae, args)
                except Exception as err:  # keep the other cases
                    r = {"model": label, "selection": sel, "error": f"{type(err).__name__}: {err}"}
                print(f"  {json.dumps({k: v for k, v in r.items() if not isinstance(v, float) or v == v})}",
                      file=sys.stderr, flush=True)
                cases.append(r)
            del model
    ratios = {}
    for label in args.models:
        by = {c["selection"]: c for c in cases if c["model"] == label and "error" not in c}
        if "topk" in by and "gsae" in by:
            t, g = by["topk"], by["gsae"]
            ratio = g["s_per_token"] / t["s_per_token"]
            ratios[label] = {
                "gsae_over_topk": ratio,
                "harvest_ratio": (g["harvest_s"] / max(1, g["harvest_tokens"])) / (t["harvest_s"] / max(1, t["harvest_tokens"])),
                "train_ratio": (g["train_s"] / g["trained_tokens"]) / (t["train_s"] / t["trained_tokens"]),
                "target": 2.5,
                "pass": ratio <= 2.5,
            }
    result = {
        "command": _report.command_line(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")} | {"threads": threads},
        "machine": _report.machine(str(REPO)),
        "busy_warning": warning,
        "torch": torch.__version__,
        "cases": cases,
        "ratios": ratios,
    }
    print(render(result, markdown=False))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(render(result, markdown=True))
    return 0 if all("error" not in c for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
