"""The floor: one dense GEMM of the encoder's shape, ``[batch, d_in] @ [d_in, d_sae]`` (fp32, CPU).

Any TopK training step must at least compute every pre-activation once to choose the k latents, so one
GEMM of this shape is the least a step can cost. Timed like the tools (warm-up, then median), in its own
process, writing into a preallocated output (``torch.mm(..., out=)``) so that only the multiply is timed.
``--alloc`` times ``x @ W`` with a fresh output each time instead (adds the page faults of a new
[batch, d_sae] buffer, as an SAE step that allocates its pre-activations pays them).
``--dtype bfloat16`` gives the bf16 floor (for comparing with ``ours --bf16-select``).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402


def main(argv=None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--alloc", action="store_true", help="allocate the output every call (x @ W)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--tool-name", default=None)
    args = p.parse_args(argv)
    torch = _common.setup_torch(args)
    dtype = getattr(torch, args.dtype)
    xs = [x.to(dtype) for x in _common.make_batches(args, torch)]

    meter = _common.Meter()
    meter.start()
    W = (torch.randn(args.d_in, args.d_sae) / args.d_in**0.5).to(dtype)
    out = None if args.alloc else torch.empty(args.batch, args.d_sae, dtype=dtype)

    def step(i: int):
        x = xs[i % len(xs)]
        if out is None:
            return x @ W
        return torch.mm(x, W, out=out)

    warm, timed, _ = _common.time_steps(step, args.warmup, args.steps)
    flops = 2 * args.batch * args.d_in * args.d_sae
    import statistics

    med = statistics.median(timed) if timed else float("nan")
    return _common.emit(args.tool_name or "gemm", args, warm, timed, meter, {
        "dtype": args.dtype,
        "alloc": args.alloc,
        "gflops": flops / med / 1e9 if timed else None,
    })


if __name__ == "__main__":
    main()
