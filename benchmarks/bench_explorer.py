"""Latency of the explorer's main endpoint: ``POST /api/analyze`` on a 256-token prompt, every feature of
every SAE on every token, over real HTTP (uvicorn in a thread, ``urllib`` client, JSON decoded).

Each timed request sends a prompt the session has not seen (distinct 255-token windows of the embedded
model's held-out plays, BOS added: 256 tokens), so nothing comes from the prompt cache: one model pass
that stops after the last SAE's site (``harvest``), ``sae.encode`` of every feature, top-k per token, DFA
by head of the top features, the error term, and the JSON. The model and SAEs stay loaded across requests,
as in ``sae-lens-attn explore``. Prints the median (and spread) with the load average before and after.

    python benchmarks/bench_explorer.py --sae runs/latest/L0.z --sae runs/latest/L1.z --threads 2
    python benchmarks/bench_explorer.py --train-dir runs/bench_explorer   # trains layers 0 and 1 first if absent
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path


def _prompts(session, n: int, length: int) -> list[str]:
    from sae_lens_attn.models import SAMPLE_TEXT

    tok = session.model.tokenizer
    ids = tok(Path(SAMPLE_TEXT).read_text()[: 400 * length * n // 10 + 200_000], add_special_tokens=False)["input_ids"]
    out, i = [], 0
    while len(out) < n and i + length < len(ids):
        text = tok.decode(ids[i : i + length - 1])
        i += length
        if len(session.tokenize(text)) == length:  # re-tokenizes to exactly `length` tokens with BOS
            out.append(text)
    if len(out) < n:
        raise SystemExit(f"only {len(out)} prompts of {length} tokens found in the sample text")
    return out


def _saes(args) -> list[str]:
    if args.sae:
        return args.sae
    root = Path(args.train_dir)
    dirs = [root / "L0.z", root / "L1.z"]
    if not all((d / "cfg.json").exists() for d in dirs):
        from sae_lens_attn.training import TrainConfig, train

        train(TrainConfig(layers="all", k=16, tokens=args.train_tokens, out_dir=str(root)))
    return [str(d) for d in dirs]


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", action="append", default=[], help="SAE directory (repeat); default: --train-dir's")
    p.add_argument("--train-dir", default="runs/bench_explorer", help="where to train layer 0/1 SAEs when --sae is not given")
    p.add_argument("--train-tokens", type=int, default=300_000)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the target: 2 CPU cores)")
    p.add_argument("--tokens", type=int, default=256, help="prompt length in tokens, BOS included")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--runs", type=int, default=20, help="timed requests (distinct prompts)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from sae_lens_attn.frontends.explorer import ExplorerSession
    from sae_lens_attn.frontends.explorer.server import running

    session = ExplorerSession.from_paths(_saes(args), device="cpu")
    prompts = _prompts(session, args.warmup + args.runs, args.tokens)
    load_before = os.getloadavg()
    wall, server = [], []
    with running(session) as url:
        for i, text in enumerate(prompts):
            t0 = time.perf_counter()
            res = _post(url + "api/analyze", {"text": text, "top_k": args.top_k})
            dt = (time.perf_counter() - t0) * 1e3
            assert res["n_tokens"] == args.tokens
            if i >= args.warmup:
                wall.append(dt)
                server.append(res["elapsed_ms"])
    load_after = os.getloadavg()
    q = statistics.quantiles(wall, n=10)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {
        "median_ms": statistics.median(wall), "p10_ms": q[0], "p90_ms": q[-1], "min_ms": min(wall),
        "server_median_ms": statistics.median(server), "runs": len(wall), "tokens": args.tokens,
        "saes": [f"{e.id} ({e.sae.architecture}, d_sae {e.sae.cfg.d_sae})" for e in session.saes.values()],
        "top_k": args.top_k, "threads": args.threads, "cpu_count": os.cpu_count(), "cpu": _cpu(),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        "git": git, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(out, indent=1))
    print(f"\nPOST /api/analyze, {args.tokens} tokens, {len(session.saes)} SAEs, all features: median "
          f"{out['median_ms']:.0f} ms over {len(wall)} distinct prompts (p10 {q[0]:.0f}, p90 {q[-1]:.0f}; server "
          f"{out['server_median_ms']:.0f} ms); load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
