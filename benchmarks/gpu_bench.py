"""One prepared GPU check: our SAE step at GPT-2-small sizes against the bf16 GEMM roofline, and end-to-end
tokens/s, as one JSON document. On a machine without CUDA it prints ``{"cuda": false, "skipped": ...}`` and
exits 0, so it can be run anywhere.

Step rows (``SiteState.step``: forward, FVU + AuxK, backward, parallel-gradient removal, Adam, decoder
renormalisation), d_in 768, k 32, batch 4096 (``--batch``), d_sae 12288 and 24576:

* ``ours-fp32``: fp32 parameters, fp32 selection GEMM (TF32 off, PyTorch's default for matmul);
* ``ours-bf16-select``: fp32 parameters, selection GEMM in bf16 (``SAE.bf16_select``, the trainer's
  ``--bf16-encoder``);
* ``ours-bf16``: bf16 parameters (``SAEConfig(dtype="bfloat16")``), everything in bf16;
* ``ours-bf16-select-two-level``: ``ours-bf16-select`` with ``SAE_LENS_ATTN_TOPK=two_level`` (the CPU's
  two-level top-k on the GPU; ``auto`` uses ``torch.topk`` there until this row says otherwise);
* ``gemm-bf16`` / ``gemm-fp32``: one ``[batch, d_in] @ [d_in, d_sae]`` into a preallocated output, the floor
  measured in the same run (``ratio_to_bf16_gemm`` = step time / bf16 GEMM time).

Selection rows (``select``): ``torch.topk`` against the two-level top-k alone, on a [batch, d_sae] score
matrix in bf16 and fp32, k 32.

Times are CUDA-event medians of ``--steps`` steps after ``--warmup``; peak memory is
``torch.cuda.max_memory_allocated`` during the step rows (minus what was allocated before the SAE).

End to end (``--e2e``, on by default when transformer_lens can be imported): bench_e2e.run_case on the
GPT-2-small-shaped random model on the GPU, all 12 layers, d_sae 24576, TopK and g-SAE.

Usage on the lent machine (see gpu_check.sh, which also writes the JSON to $OUT)::

    python3 benchmarks/gpu_bench.py --json $OUT/gpu_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402

DEV = "cuda"


def cuda_time(fn, warmup: int, steps: int, torch) -> list[float]:
    if DEV != "cuda":  # --dry-run-cpu: the same code path, wall-clock timed
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return out


def gemm_row(name: str, dtype, d_in: int, d_sae: int, batch: int, args, torch) -> dict:
    x = torch.randn(batch, d_in, device=DEV, dtype=dtype)
    W = torch.randn(d_in, d_sae, device=DEV, dtype=dtype)
    out = torch.empty(batch, d_sae, device=DEV, dtype=dtype)
    times = cuda_time(lambda: torch.mm(x, W, out=out), args.warmup, max(args.steps, 10), torch)
    med = statistics.median(times)
    return {"tool": name, "d_sae": d_sae, "batch": batch, "median_s": med, "times_s": times,
            "tflops": 2 * batch * d_in * d_sae / med / 1e12}


def select_rows(d_sae: int, batch: int, args, torch) -> list[dict]:
    from sae_lens_attn.kernels import TOPK_GROUP, _topk_two_level

    out = []
    for dtype in (torch.bfloat16, torch.float32):
        scores = torch.randn(batch, d_sae, device=DEV).to(dtype)
        for name, fn in (("torch.topk", lambda s=scores: s.topk(args.k, dim=-1, sorted=False).indices),
                         ("two-level", lambda s=scores: _topk_two_level(s, args.k, TOPK_GROUP))):
            times = cuda_time(fn, args.warmup, max(args.steps, 10), torch)
            out.append({"tool": f"select {name}", "dtype": str(dtype).removeprefix("torch."), "d_sae": d_sae,
                        "batch": batch, "median_s": statistics.median(times), "times_s": times})
    return out


def step_row(name: str, d_in: int, d_sae: int, batch: int, args, torch, *, dtype="float32", bf16_select=False) -> dict:
    from sae_lens_attn.activations import SiteBatch
    from sae_lens_attn.sae import SAE, SAEConfig
    from sae_lens_attn.training.trainer import OptimConfig, SiteState

    cuda = DEV == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    g = torch.Generator(device=DEV).manual_seed(args.seed)
    xs = [torch.randn(batch, d_in, device=DEV, generator=g) * 2 + 0.5 for _ in range(2)]
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=args.k, dtype=dtype, device=DEV))
    sae.bf16_select = bf16_select
    state = SiteState(sae, OptimConfig(steps=10**6, warmup_steps=0, decay_fraction=0.0))
    i = [0]

    def step():
        st = state.step(SiteBatch(xs[i[0] % 2], None), i[0])
        i[0] += 1
        return st

    times = cuda_time(step, args.warmup, args.steps, torch)
    med = statistics.median(times)
    stats = step()
    return {"tool": name, "d_sae": d_sae, "batch": batch, "dtype": dtype, "bf16_select": bf16_select,
            "median_s": med, "times_s": times, "tokens_per_s": batch / med,
            "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None, "last_fvu": stats.fvu}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-sae", type=int, nargs="+", default=[12288, 24576])
    p.add_argument("--batch", type=int, nargs="+", default=[4096])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--e2e", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--e2e-batch", type=int, default=4096)
    p.add_argument("--e2e-steps", type=int, default=5)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="run the same code on the CPU (use tiny sizes): checks the script, measures nothing useful")
    p.add_argument("--e2e-d-sae", type=int, default=24576)
    p.add_argument("--e2e-gpt2", default="12,12,768,50257", help="n_layer,n_head,n_embd,vocab of the GPT-2-shaped model")
    p.add_argument("--e2e-context", type=int, default=128)
    args = p.parse_args(argv)

    import torch

    global DEV
    if args.dry_run_cpu:
        DEV = "cpu"

    doc: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available() and not args.dry_run_cpu:
        doc["skipped"] = "no CUDA device: gpu_bench.py only measures on a GPU (CPU numbers: bench_step.py, bench_e2e.py)"
        print(json.dumps(doc, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=2))
        return 0

    _common.ensure_ours_importable(str(REPO))
    if DEV == "cuda":
        doc.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   cuda_version=torch.version.cuda, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        doc.update(device="cpu (--dry-run-cpu: not a measurement)")
    doc["settings"] = {k: v for k, v in vars(args).items() if k != "json"}
    rows, errors = [], []
    t0 = time.perf_counter()
    for batch in args.batch:
        for d_sae in args.d_sae:
            floor = gemm_row("gemm-bf16", torch.bfloat16, args.d_in, d_sae, batch, args, torch)
            rows.append(floor)
            rows.append(gemm_row("gemm-fp32", torch.float32, args.d_in, d_sae, batch, args, torch))
            try:
                rows.extend(select_rows(d_sae, batch, args, torch))
            except Exception as err:
                errors.append({"tool": "select", "d_sae": d_sae, "batch": batch,
                               "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]})
            for name, kw in (("ours-fp32", {}), ("ours-bf16-select", {"bf16_select": True}),
                             ("ours-bf16-select-two-level", {"bf16_select": True}),
                             ("ours-bf16", {"dtype": "bfloat16"})):
                os.environ["SAE_LENS_ATTN_TOPK"] = "two_level" if name.endswith("two-level") else "auto"
                try:
                    r = step_row(name, args.d_in, d_sae, batch, args, torch, **kw)
                    r["ratio_to_bf16_gemm"] = r["median_s"] / floor["median_s"]
                    rows.append(r)
                except Exception as err:  # report and go on: one failing variant must not hide the rest
                    errors.append({"tool": name, "d_sae": d_sae, "batch": batch,
                                   "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]})
                finally:
                    os.environ.pop("SAE_LENS_ATTN_TOPK", None)
                print(f"[{time.perf_counter() - t0:.0f}s] batch {batch} d_sae {d_sae} {name} done", file=sys.stderr)
    doc["step"] = rows
    doc["errors"] = errors

    want_e2e = args.e2e == "on"
    if args.e2e == "auto":
        try:
            import transformer_lens  # noqa: F401

            want_e2e = True
        except ImportError:
            doc["e2e_skipped"] = "transformer_lens is not installed here (carry its wheels; see gpu_check.sh)"
    if want_e2e:
        import bench_e2e

        n_layer, n_head, n_embd, vocab = (int(v) for v in args.e2e_gpt2.split(","))
        ns = argparse.Namespace(
            d_sae=args.e2e_d_sae, d_sae_embedded=8192, k=args.k, batch=args.e2e_batch, warmup=1,
            steps=args.e2e_steps, context=args.e2e_context, model_batch_rows=max(1, args.e2e_batch // args.e2e_context),
            bf16_select=True, device=DEV, sae_dtype="float32", threads=0, seed=args.seed,
            gpt2_n_layer=n_layer, gpt2_n_head=n_head, gpt2_n_embd=n_embd, gpt2_vocab=vocab,
        )
        import tempfile

        cases = []
        with tempfile.TemporaryDirectory(prefix="gpu_e2e_") as tmp:
            try:
                model, rows_, d_sae = bench_e2e.load("gpt2", ns, Path(tmp))
                for sel in ("topk", "gsae"):
                    try:
                        cases.append(bench_e2e.run_case(model, rows_, "gpt2", sel, d_sae, ns))
                    except Exception as err:
                        cases.append({"model": "gpt2", "selection": sel, "error": f"{type(err).__name__}: {err}"})
            except Exception as err:
                cases.append({"model": "gpt2", "error": f"{type(err).__name__}: {err}",
                              "trace": traceback.format_exc()[-2000:]})
        doc["e2e"] = cases
        by = {c.get("selection"): c for c in cases if "error" not in c}
        if "topk" in by and "gsae" in by:
            doc["e2e_gsae_over_topk"] = by["gsae"]["s_per_token"] / by["topk"]["s_per_token"]
    doc["total_s"] = time.perf_counter() - t0
    text = json.dumps(doc, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
