"""Latency of one QK attribution (``analysis.qk_attribution``) on a 256-token prompt of the embedded model:
all upstream components, the contrast, and two SAEs' features (layer 0 ``hook_z`` and ``hook_attn_out``,
each its own feature view on both sides), for an induction head of layer 1.

Two measurements, each a median over prompts the code has not seen (distinct 255-token windows of the
shipped held-out plays, BOS added: 256 tokens): the direct call, and the explorer's ``POST /api/qk`` over
real HTTP (uvicorn in a thread, ``urllib`` client, JSON decoded) after the page's ``/api/analyze`` of the same
prompt, as a click on a DFA cell follows an analysis (the analyze call is not timed). The query is the last
token, the key a fixed earlier position; the contrast source is chosen by the head's own attention.

    python benchmarks/bench_qk.py --sae runs/qk/L0.z --sae runs/qk/L0.attn_out --sae runs/qk/L1.z
    python benchmarks/bench_qk.py --train-dir runs/bench_qk     # trains the three SAEs first if absent
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from bench_explorer import _cpu, _post, _prompts


def _saes(args) -> list[str]:
    if args.sae:
        return args.sae
    root = Path(args.train_dir)
    want = {"z": [root / "z" / "L0.z", root / "z" / "L1.z"], "attn_out": [root / "attn_out" / "L0.attn_out"]}
    for site, dirs in want.items():
        if not all((d / "cfg.json").exists() for d in dirs):
            from sae_lens_attn.training import TrainConfig, train

            layers = "all" if site == "z" else "0"
            train(TrainConfig(layers=layers, site=site, k=16, tokens=args.train_tokens, out_dir=str(root / site)))
    return [str(d) for dirs in want.values() for d in dirs]


def _median(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=10)
    return {"median_ms": statistics.median(xs), "p10_ms": q[0], "p90_ms": q[-1], "min_ms": min(xs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", action="append", default=[], help="SAE directory (repeat); default: --train-dir's")
    p.add_argument("--train-dir", default="runs/bench_qk")
    p.add_argument("--train-tokens", type=int, default=300_000)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the target: 2 CPU cores)")
    p.add_argument("--tokens", type=int, default=256, help="prompt length in tokens, BOS included")
    p.add_argument("--head", type=int, default=4, help="layer-1 head attributed (L1H4: an induction head)")
    p.add_argument("--runs", type=int, default=20, help="timed prompts per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from sae_lens_attn.analysis import qk_attribution
    from sae_lens_attn.frontends.explorer import ExplorerSession
    from sae_lens_attn.frontends.explorer.server import running

    session = ExplorerSession.from_paths(_saes(args), device="cpu")
    ups = [e.sae for e in session.saes.values() if e.site.layer < 1]
    if len(ups) < 2:
        raise SystemExit("give two SAEs at layer 0 (and one at layer 1 for the explorer)")
    n = args.warmup + args.runs
    prompts = _prompts(session, 2 * n, args.tokens)
    t, s = args.tokens - 1, args.tokens // 2
    load_before = os.getloadavg()
    direct, terms = [], 0
    for i, text in enumerate(prompts[:n]):
        tokens = torch.tensor([session.tokenize(text)])
        t0 = time.perf_counter()
        res = qk_attribution(session.model, tokens, 1, args.head, t, s, saes=ups)
        dt = (time.perf_counter() - t0) * 1e3
        if i >= args.warmup:
            direct.append(dt)
            terms = max(terms, sum(len(v.query_names) for v in res.features))
    routed = []
    with running(session) as url:
        for i, text in enumerate(prompts[n:]):
            _post(url + "api/analyze", {"text": text, "top_k": 8})  # the page analyzes before a cell is clicked
            t0 = time.perf_counter()
            out = _post(url + "api/qk", {"text": text, "layer": 1, "head": args.head, "pos": t, "source": s})
            dt = (time.perf_counter() - t0) * 1e3
            assert len(out["features"]) == len(ups) and out["contrast"] is not None, out.get("refused")
            if i >= args.warmup:
                routed.append(dt)
    load_after = os.getloadavg()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "direct": _median(direct), "http": _median(routed), "runs": len(direct), "tokens": args.tokens,
        "head": f"L1H{args.head}", "query_pos": t, "key_pos": s, "max_query_terms_both_views": terms,
        "saes": [f"{e.id} ({e.sae.architecture}, d_sae {e.sae.cfg.d_sae})" for e in session.saes.values()],
        "threads": args.threads, "cpu_count": os.cpu_count(), "cpu": _cpu(),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        "git": git, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(result, indent=1))
    print(f"\nQK attribution, {args.tokens} tokens, L1H{args.head}, components + contrast + 2 SAE views: median "
          f"{result['direct']['median_ms']:.0f} ms direct, {result['http']['median_ms']:.0f} ms over HTTP "
          f"(p90 {result['http']['p90_ms']:.0f}); load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
