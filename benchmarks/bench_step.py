"""Time one full SAE training step of SAELens, sparsify and sae_lens_attn, beside the dense-GEMM floor.

Every (tool, d_sae) runs in its own subprocess (the peers in their own venvs, made by setup_peers.sh), so
each peak-memory figure belongs to that tool's step alone. Tools are interleaved: each repeat runs every
size, and the tool order is rotated from one repeat to the next, so slow drift of the machine (thermal,
a neighbour's job) is spread over all tools. Per (tool, size) the timed steps of all repeats are pooled
and their median is reported.

Typical use (from the repo root, our venv active)::

    bash benchmarks/setup_peers.sh                       # once
    nice -n 19 python benchmarks/bench_step.py --json benchmarks/results/step.json \\
        --markdown benchmarks/results/step.md

Quick check at toy sizes (seconds)::

    nice -n 19 python benchmarks/bench_step.py --d-in 64 --d-sae 512 --batch 256 --warmup 1 --steps 2 --repeats 1

Rows (``--tools``; default: all but the optional ones):

* ``gemm``: the floor, one fp32 ``[batch, d_in] @ [d_in, d_sae]`` into a preallocated output (gemm_floor.py);
* ``saelens``: SAELens' TopKTrainingSAE + SAETrainer step, its training defaults (peers/saelens_step.py);
* ``saelens-sparse``: the same with ``use_sparse_activations=True`` (and ``rescale_acts_by_decoder_norm=False``,
  which that mode needs on CPU);
* ``sparsify``: sparsify's SparseCoder step as its trainer runs it, with Adam (peers/sparsify_step.py);
* ``ours``: ``SiteState.step`` with the sparse kernels (ours_step.py);
* ``ours-reference``: the same with ``SAE_LENS_ATTN_KERNELS=reference`` (dense autograd twin);
* ``ours-bf16``: the same with ``bf16_select=True`` (selection GEMM in bf16);
* optional: ``ours-gsae`` (g-SAE step, random gradients), ``ours-auxk`` (half the latents dead: the AuxK
  path over gathered rows), ``ours-auxk-few`` (5% dead: AuxK as dense GEMMs over the dead columns),
  ``gemm-alloc`` (the GEMM with a fresh output each call), ``gemm-bf16`` (bf16 GEMM floor);
* allocator rows: our trainer tells glibc to keep freed large blocks (``kernels.keep_freed_host_memory``;
  otherwise every 75-400 MB block of a step comes back as fresh pages). ``ours-default-malloc`` turns that
  off (``SAE_LENS_ATTN_MALLOC=default``); ``saelens-sparse-malloc`` and ``sparsify-malloc`` give the peers
  the same setting from outside (``GLIBC_TUNABLES``), so the allocator's share of any ratio is visible;
* ``ours-torch-select``: ours with the selection in PyTorch ops (``SAE_LENS_ATTN_TOPK=two_level``), i.e.
  without the compiled top-k (``sae_lens_attn.ckernels``), as on a machine with no C compiler.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402
import _report  # noqa: E402

VENVS = HERE / ".venvs"

#: name -> (interpreter key, script, extra arguments)
TOOLS: dict[str, tuple[str, str, list[str]]] = {
    "gemm": ("ours", "gemm_floor.py", []),
    "saelens": ("saelens", "peers/saelens_step.py", []),
    "saelens-sparse": ("saelens", "peers/saelens_step.py", ["--sparse-activations", "--no-rescale"]),
    "sparsify": ("sparsify", "peers/sparsify_step.py", []),
    "ours": ("ours", "ours_step.py", []),
    "ours-reference": ("ours", "ours_step.py", ["--kernels", "reference", "--tool-name", "ours-reference"]),
    "ours-bf16": ("ours", "ours_step.py", ["--bf16-select", "--tool-name", "ours-bf16"]),
    # optional rows
    "ours-gsae": ("ours", "ours_step.py", ["--selection", "gsae", "--tool-name", "ours-gsae"]),
    "ours-auxk": ("ours", "ours_step.py", ["--dead-fraction", "0.5", "--tool-name", "ours-auxk"]),
    "ours-auxk-few": ("ours", "ours_step.py", ["--dead-fraction", "0.05", "--tool-name", "ours-auxk-few"]),
    "gemm-alloc": ("ours", "gemm_floor.py", ["--alloc", "--tool-name", "gemm-alloc"]),
    "gemm-bf16": ("ours", "gemm_floor.py", ["--dtype", "bfloat16", "--tool-name", "gemm-bf16"]),
    "ours-default-malloc": ("ours", "ours_step.py", ["--tool-name", "ours-default-malloc"]),
    "ours-torch-select": ("ours", "ours_step.py", ["--tool-name", "ours-torch-select"]),
    "saelens-sparse-malloc": ("saelens", "peers/saelens_step.py", ["--sparse-activations", "--no-rescale"]),
    "sparsify-malloc": ("sparsify", "peers/sparsify_step.py", []),
}
#: glibc keeps freed large blocks instead of unmapping them (what ``kernels.keep_freed_host_memory`` asks
#: for in our trainer), set from outside the process for the peers.
_KEEP_FREED = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"}
#: extra environment per row
TOOL_ENV: dict[str, dict[str, str]] = {
    "ours-default-malloc": {"SAE_LENS_ATTN_MALLOC": "default"},
    "ours-torch-select": {"SAE_LENS_ATTN_TOPK": "two_level"},
    "saelens-sparse-malloc": _KEEP_FREED,
    "sparsify-malloc": _KEEP_FREED,
}
DEFAULT_TOOLS = ["gemm", "saelens", "saelens-sparse", "sparsify", "ours", "ours-reference", "ours-bf16"]

#: (label, numerator tool, denominator tool, target, higher_is_better)
#: "ours vs X" is X's time / our time (a speed-up); "ours / GEMM" is our time / the floor's. ``name*``: the
#: fastest row of that peer (e.g. SAELens' sparse mode with the tuned allocator, if it was run).
TARGETS = [
    ("ours vs SAELens (speed-up)", "saelens*", "ours", 4.0, True),
    ("ours vs sparsify (speed-up)", "sparsify*", "ours", 1.3, True),
    ("ours / GEMM floor (slow-down)", "ours", "gemm", 1.4, False),
]


def interpreter(key: str, args) -> Path | None:
    if key == "ours":
        return Path(args.ours_python or sys.executable)
    p = Path(getattr(args, f"{key}_python") or VENVS / key / "bin" / "python")
    return p if p.exists() else None


def run_one(tool: str, d_sae: int, args) -> dict:
    key, script, extra = TOOLS[tool]
    py = interpreter(key, args)
    if py is None:
        return {"tool": tool, "d_sae": d_sae, "error": f"no venv for {key}: run `bash benchmarks/setup_peers.sh {key}`"}
    threads = _common.n_threads(args.threads)
    cmd = [str(py), str(HERE / script), "--d-in", str(args.d_in), "--d-sae", str(d_sae), "--k", str(args.k),
           "--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--threads", str(threads), "--seed", str(args.seed), *extra]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.pop("SAE_LENS_ATTN_KERNELS", None)  # each row sets its own
    env.pop("SAE_LENS_ATTN_MALLOC", None)
    env.pop("SAE_LENS_ATTN_TOPK", None)
    env.pop("GLIBC_TUNABLES", None)
    env.update(TOOL_ENV.get(tool, {}))
    if key != "ours":
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_MODE", "disabled")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"tool": tool, "d_sae": d_sae, "error": f"timed out after {args.timeout} s", "cmd": cmd}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(_common.RESULT_PREFIX):
            rec = json.loads(line[len(_common.RESULT_PREFIX):])
            rec.update(tool=tool, wall_s=wall, cmd=" ".join(cmd))
            return rec
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"tool": tool, "d_sae": d_sae, "error": f"exit {proc.returncode}: " + " | ".join(tail), "cmd": cmd}


def summarise(runs: list[dict], tools: list[str], sizes: list[int]) -> dict:
    out: dict[str, dict[str, dict]] = {}
    for d_sae in sizes:
        per = {}
        for tool in tools:
            rs = [r for r in runs if r["tool"] == tool and r["d_sae"] == d_sae]
            ok = [r for r in rs if "error" not in r]
            if not ok:
                per[tool] = {"error": rs[0]["error"] if rs else "not run"}
                continue
            times = [t for r in ok for t in r["times_s"]]
            med = statistics.median(times)
            peaks = [r["peak_mib"] for r in ok if r.get("peak_mib") is not None]
            per[tool] = {
                "median_s": med,
                "min_s": min(times),
                "max_s": max(times),
                "n_timed": len(times),
                "repeat_medians_s": [r["median_s"] for r in ok],
                "tokens_per_s": ok[0]["batch"] / med,
                "peak_mib": max(peaks) if peaks else None,
                "threads": ok[0]["threads"],
                "errors": [r["error"] for r in rs if "error" in r],
            }
        out[str(d_sae)] = per
    return out


def _time(per: dict, pattern: str) -> tuple[str, float] | None:
    """Median time of ``pattern`` (``name*``: the fastest row whose name starts with ``name``)."""
    if pattern.endswith("*"):
        cands = [(t, v["median_s"]) for t, v in per.items() if t.startswith(pattern[:-1]) and "median_s" in v]
        return min(cands, key=lambda c: c[1]) if cands else None
    v = per.get(pattern)
    return (pattern, v["median_s"]) if v and "median_s" in v else None


def ratios(summary: dict) -> dict:
    out = {}
    for d_sae, per in summary.items():
        rs = []
        for label, num, den, target, higher in TARGETS:
            a, b = _time(per, num), _time(per, den)
            if a is None or b is None:
                rs.append({"label": label, "value": None, "target": target, "pass": None})
                continue
            value = a[1] / b[1]
            ok = value >= target if higher else value <= target
            rs.append({"label": label, "numerator": a[0], "denominator": b[0], "value": value, "target": target,
                       "higher_is_better": higher, "pass": ok})
        # every peer variant, for the record
        ours = _time(per, "ours")
        if ours:
            for t, v in per.items():
                if "median_s" in v and (t.startswith("saelens") or t.startswith("sparsify")):
                    rs.append({"label": f"{t} / ours", "numerator": t, "denominator": "ours",
                               "value": v["median_s"] / ours[1], "target": None, "pass": None})
            for t in ("ours-bf16", "ours-reference", "ours-default-malloc", "ours-torch-select"):
                if t in per and "median_s" in per[t]:
                    rs.append({"label": f"{t} / ours", "numerator": t, "denominator": "ours",
                               "value": per[t]["median_s"] / ours[1], "target": None, "pass": None})
        out[d_sae] = rs
    return out


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _rows(summary: dict, tools: list[str]) -> list[list]:
    rows = []
    for d_sae, per in summary.items():
        ours = per.get("ours", {}).get("median_s")
        gemm = per.get("gemm", {}).get("median_s")
        for tool in tools:
            v = per.get(tool, {})
            if "median_s" not in v:
                rows.append([d_sae, tool, "error", None, None, None, None, v.get("error", "")[:120]])
                continue
            rows.append([
                d_sae, tool, _ms(v["median_s"]),
                _report.fmt(v["tokens_per_s"], ",.0f"),
                _report.fmt(v["peak_mib"], ",.0f"),
                _report.fmt(v["median_s"] / ours, ".2f") if ours else None,
                _report.fmt(v["median_s"] / gemm, ".2f") if gemm else None,
                f"n={v['n_timed']}, {_ms(v['min_s'])}-{_ms(v['max_s'])} ms",
            ])
    return rows


HEADERS = ["d_sae", "tool", "step ms (median)", "tokens/s", "peak MiB", "x ours", "x GEMM", "spread"]


def _ratio_lines(rat: dict, markdown: bool) -> list[str]:
    lines = []
    for d_sae, rs in rat.items():
        for r in rs:
            if r["target"] is None:
                continue
            if r["value"] is None:
                lines.append(f"d_sae {d_sae}: {r['label']}: n/a (a row is missing)")
                continue
            cmp = ">=" if r["higher_is_better"] else "<="
            verdict = "PASS" if r["pass"] else "FAIL"
            if markdown:
                verdict = f"**{verdict}**"
            lines.append(f"d_sae {d_sae}: {r['label']}: {r['value']:.2f}x ({r['numerator']} / {r['denominator']}; "
                         f"target {cmp} {r['target']}x) {verdict}")
    return lines


def render_text(result: dict) -> str:
    s = result["settings"]
    head = (f"one training step: d_in {s['d_in']}, k {s['k']}, batch {s['batch']}, fp32, CPU, "
            f"{s['threads']} thread(s); median of {s['steps']} timed steps x {s['repeats']} repeat(s) after "
            f"{s['warmup']} warm-up step(s)")
    body = _report.text_table(HEADERS, _rows(result["summary"], s["tools"]))
    return "\n".join([head, "", body, "", *_ratio_lines(result["ratios"], False)])


def render_markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    lines = [
        f"### One training step, d_in {s['d_in']}, k {s['k']}, batch {s['batch']}, fp32, CPU",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['host_cpu']} ({m['cpu_count']} cores; {', '.join(m['cpu_flags']) or 'no AVX flags seen'}), "
        f"{s['threads']} thread(s); load average at start {m['loadavg_at_start']}; {m['date']}; git {m['git']}.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}.",
        f"Median of {s['steps']} timed steps x {s['repeats']} repeat(s) per row, after {s['warmup']} warm-up step(s); "
        "tokens/s = batch / median; peak MiB = RSS high-water mark of the row's own process minus its RSS "
        "before the SAE was built; x ours / x GEMM = this row's time over ours / over the GEMM floor.",
        "",
        _report.markdown_table(HEADERS, _rows(result["summary"], s["tools"]), "llrrrrrl"),
        "",
        *[f"- {x}" for x in _ratio_lines(result["ratios"], True)],
    ]
    return "\n".join(lines) + "\n"


def versions(runs: list[dict]) -> dict:
    v = {}
    for r in runs:
        if "error" in r:
            continue
        if r["tool"].startswith("saelens"):
            v["sae-lens"] = r.get("peer_version")
        elif r["tool"].startswith("sparsify"):
            v["eai-sparsify"] = r.get("peer_version")
        v.setdefault(f"torch ({Path(r['executable']).parent.parent.name})", r.get("torch"))
    return v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-sae", type=int, nargs="+", default=[12288, 24576])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=2, help="runs per (tool, size), interleaved, tool order rotated")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every tool (0: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tools", nargs="+", default=DEFAULT_TOOLS, choices=list(TOOLS))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    p.add_argument("--ours-python", default=None, help="interpreter for our rows (default: this one)")
    p.add_argument("--saelens-python", default=None, help="default: benchmarks/.venvs/saelens/bin/python")
    p.add_argument("--sparsify-python", default=None, help="default: benchmarks/.venvs/sparsify/bin/python")
    p.add_argument("--json", default=None, metavar="PATH", help="write every run and the summary as JSON")
    p.add_argument("--markdown", default=None, metavar="PATH", help="write a markdown section for RESULTS.md")
    p.add_argument("--from-json", default=None, metavar="PATH", help="render a saved --json result; run nothing")
    args = p.parse_args(argv)

    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        print(render_text(result))
        if args.markdown:
            Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
            Path(args.markdown).write_text(render_markdown(result))
        return 0

    threads = _common.n_threads(args.threads)
    warning = _report.warn_if_busy(threads)
    if warning:
        print(warning, file=sys.stderr)
    runs: list[dict] = []
    t_start = time.perf_counter()
    n_total = args.repeats * len(args.d_sae) * len(args.tools)
    for rep in range(args.repeats):
        for d_sae in args.d_sae:
            shift = (rep + args.d_sae.index(d_sae)) % len(args.tools)
            order = args.tools[shift:] + args.tools[:shift]
            for tool in order:
                rec = run_one(tool, d_sae, args)
                rec["repeat"] = rep
                runs.append(rec)
                status = rec.get("error") or f"median {rec['median_s'] * 1e3:.0f} ms, peak {rec['peak_mib']:.0f} MiB"
                print(f"[{len(runs)}/{n_total} {time.perf_counter() - t_start:.0f}s] repeat {rep} d_sae {d_sae} "
                      f"{tool}: {status}", file=sys.stderr, flush=True)

    summary = summarise(runs, args.tools, args.d_sae)
    result = {
        "command": _report.command_line(),
        "settings": {"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "batch": args.batch, "warmup": args.warmup,
                     "steps": args.steps, "repeats": args.repeats, "threads": threads, "tools": args.tools,
                     "dtype": "float32", "device": "cpu"},
        "machine": _report.machine(str(REPO)),
        "busy_warning": warning,
        "versions": versions(runs),
        "summary": summary,
        "ratios": ratios(summary),
        "runs": runs,
        "total_wall_s": time.perf_counter() - t_start,
    }
    print(render_text(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(render_markdown(result))
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
