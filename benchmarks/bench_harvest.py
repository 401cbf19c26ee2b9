"""Harvest against the bare model: is the model pass the bottleneck only because it must be?

``harvest`` runs the model through TransformerLens' TransformerBridge with a hook at every requested site.
Its floor is the same model's forward pass without any of that: the Hugging Face module the bridge wraps,
called directly. This times, interleaved in one process on the same random-weight GPT-2-small-shaped model
(12 layers, 12 heads of 64, d_model 768, vocab 50257; made as in bench_e2e.py) and the same token rows:

* ``hf``: ``GPT2Model`` forward (the 12 blocks, no LM head) under ``torch.inference_mode``;
* ``harvest``: ``sae_lens_attn.activations.harvest`` of ``hook_z`` at all 12 layers (TopK's harvest:
  inference mode, the pass ends as soon as the last site's hook has fired, activations copied out per site);
* ``bridge-stop-at-layer``: the bridge's own ``model(tokens, return_type=None, stop_at_layer=12)`` without
  hooks, which is how harvest ran before it ended the pass itself (the bridge still runs the unembedding
  when ``stop_at_layer`` is the model's depth);
* ``hf-grad``: ``GPT2LMHeadModel`` forward with the LM loss, then ``torch.autograd.grad`` of the loss with
  respect to the input embeddings (a backward pass through every block, no parameter gradients);
* ``harvest-grad``: ``harvest(..., with_grad=True)``, the g-SAE's harvest (activations and dL/dx at all 12
  sites from one forward and one backward pass).

Reported: median seconds per call, tokens/s and the ratios harvest / hf and harvest-grad / hf-grad (1.0
means the harvest costs exactly the bare model's pass). Typical use::

    nice -n 19 python benchmarks/bench_harvest.py --json benchmarks/results/harvest.json \\
        --markdown benchmarks/results/harvest.md

Quick check: ``--n-layer 2 --n-embd 64 --n-head 4 --vocab 1000 --reps 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _report  # noqa: E402
from bench_e2e import make_gpt2_dir  # noqa: E402  (also sets the offline environment)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--rows", type=int, default=16, help="token rows per call (the trainer's model_batch_rows)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--reps", type=int, default=6, help="timed calls per row (after one warm-up call)")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--markdown", default=None, metavar="PATH")
    args = p.parse_args(argv)

    import torch
    from transformers import GPT2LMHeadModel

    from sae_lens_attn import load_model
    from sae_lens_attn.activations import harvest
    from sae_lens_attn.models import bos_token_id
    from sae_lens_attn.sites import parse_sites

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    warning = _report.warn_if_busy(threads)
    if warning:
        print(warning, file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        d = make_gpt2_dir(Path(tmp) / "gpt2_random", args.n_layer, args.n_head, args.n_embd, args.vocab,
                          args.context, args.seed)
        model = load_model(d, device="cpu")
        hf = GPT2LMHeadModel.from_pretrained(d).eval()
    hf.requires_grad_(False)
    sites = parse_sites("all", "z", n_layers=model.cfg.n_layers)
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(1, args.vocab, (args.rows, args.context), generator=g)
    tokens[:, 0] = bos_token_id(model)

    def hf_forward():
        with torch.inference_mode():
            hf.transformer(input_ids=tokens)

    def bridge_stop():
        with torch.inference_mode():
            model(tokens, return_type=None, stop_at_layer=model.cfg.n_layers)

    def hf_grad():
        emb = hf.transformer.wte(tokens).detach().requires_grad_(True)
        loss = hf(inputs_embeds=emb, labels=tokens).loss * tokens.numel()
        torch.autograd.grad(loss, emb)

    cases = {
        "hf": hf_forward,
        "harvest": lambda: harvest(model, tokens, sites),
        "bridge-stop-at-layer": bridge_stop,
        "hf-grad": hf_grad,
        "harvest-grad": lambda: harvest(model, tokens, sites, with_grad=True),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for f in cases.values():
        f()
    for r in range(args.reps):
        order = list(cases)[r % len(cases):] + list(cases)[: r % len(cases)]  # rotate against drift
        for name in order:
            t0 = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - t0)
    n_tok = tokens.numel()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "settings": vars(args) | {"threads": threads, "tokens_per_call": n_tok},
        "machine": _report.machine(str(HERE.parent)),
        "command": _report.command_line(),
        "rows": {k: {"median_s": med[k], "times_s": times[k], "tokens_per_s": n_tok / med[k]} for k in cases},
        "ratios": {"harvest / hf": med["harvest"] / med["hf"], "harvest-grad / hf-grad": med["harvest-grad"] / med["hf-grad"]},
    }
    headers = ["row", "s per call (median)", "tokens/s", "spread"]
    table_rows = [[k, f"{med[k]:.3f}", f"{n_tok / med[k]:,.0f}", f"n={len(v)}, {min(v):.3f}-{max(v):.3f} s"]
                  for k, v in times.items()]
    ratio_lines = [f"{k}: {v:.2f}x" for k, v in result["ratios"].items()]
    head = (f"Harvest vs the bare model, GPT-2-shaped random model ({args.n_layer} layers, d_model {args.n_embd}), "
            f"{args.rows} rows x {args.context} tokens per call, hook_z at every layer, {threads} thread(s)")
    print(head + "\n\n" + _report.text_table(headers, table_rows) + "\n\n" + "\n".join(ratio_lines))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.markdown:
        m = result["machine"]
        md = "\n".join([
            f"### {head}", "", f"Command: `{result['command']}`", "",
            f"Machine: {m['host_cpu']} ({m['cpu_count']} cores); load average at start {m['loadavg_at_start']}; "
            f"{m['date']}; git {m['git']}.", "",
            _report.markdown_table(headers, table_rows, "lrrl"), "", *[f"- {x}" for x in ratio_lines],
        ]) + "\n"
        Path(args.markdown).write_text(md)
    return result


if __name__ == "__main__":
    main()
