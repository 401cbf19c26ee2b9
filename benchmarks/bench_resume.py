"""How much of the model's work a streamed run's ``--resume`` redoes, against replaying the stream.

A streamed run (activations too big for memory, no activation cache) resumed at batch S must rebuild its
shuffle buffer. Replaying harvests every chunk of rows poured before S; ``sae_lens_attn.stream`` harvests
only the chunks with vectors still to be served at S. Both numbers are exact and need no model: the
stream's schedule depends only on how many vectors each chunk keeps (here: rows of ``--context`` tokens,
the first one dropped, as a start token is). The model's share of a resume is then chunks x the time one
chunk's forward pass takes on your model and machine (SmolLM2-135M on the 2-core VM: about 12 s for 32 rows
of 128 tokens). Also printed: the seconds the model-free simulation itself takes.

    python benchmarks/bench_resume.py --skips 100,1000,10000,100000
"""

from __future__ import annotations

import argparse
import time

import torch

from sae_lens_attn.stream import _idle_chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skips", default="100,1000,10000", help="resume points (batches), comma-separated")
    ap.add_argument("--batch-size", type=int, default=4096, help="vectors per batch (the trainer's default)")
    ap.add_argument("--model-batch-rows", type=int, default=32, help="rows per harvest chunk (TrainConfig's)")
    ap.add_argument("--context", type=int, default=128, help="tokens per row")
    ap.add_argument("--buffer-tokens", type=int, default=65536, help="the shuffle buffer (the stream's default)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="token rows in the dataset (one epoch)")
    args = ap.parse_args()
    rows = torch.zeros(1, args.context, dtype=torch.long).expand(args.rows, -1)  # contents never read

    def keep(t: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(t, dtype=torch.bool)
        mask[:, 0] = False
        return mask

    capacity = max(args.buffer_tokens, 2 * args.batch_size)
    print(f"batch {args.batch_size}, chunks of {args.model_batch_rows} rows x {args.context} tokens, buffer "
          f"{args.buffer_tokens} (torch threads {torch.get_num_threads()})")
    print("| resume at batch | chunks a replay harvests | chunks harvested | replay / ours | simulation (s) |")
    print("|---|---|---|---|---|")
    for skip in (int(s) for s in args.skips.split(",")):
        t0 = time.perf_counter()
        idle, poured = _idle_chunks(rows, keep, args.batch_size, args.model_batch_rows, capacity, 0, None, skip)
        seconds = time.perf_counter() - t0
        ours = poured - len(idle)
        print(f"| {skip:,} | {poured:,} | {ours:,} | {poured / ours:.1f}x | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
