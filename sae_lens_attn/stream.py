"""Shuffled training batches harvested as they are needed, and a cheap way back to batch ``skip``.

:func:`activation_batches` harvests ``model_batch_rows`` token rows at a time (a *chunk*), pours each
chunk's kept vectors into a shuffle buffer, and whenever the buffer holds ``buffer_tokens`` it serves half
of it in shuffled batches and keeps the rest to mix with the next chunks (the usual activation-store
scheme, as SAELens' and sparsify's stores do). Every site's batch holds the same tokens, in the same order,
so many SAEs train from one pass.

**Resuming at batch ``skip``.** The buffer's contents at batch ``skip`` depend on every chunk poured in
before, so the plain way back replays the stream and runs the model on every chunk again. But the shuffle's
random draws depend only on *how many* vectors each chunk keeps, which the tokens alone decide (the
tokenization policy's mask). So the stream is first simulated with each vector replaced by its chunk's
number (no model), which tells which chunks have every kept vector served before batch ``skip``; those
chunks are poured in as zero placeholders of the same size instead of being harvested. The draws are the
same, every chunk still needed is harvested with the same rows in the same order, and the placeholders are
only ever inside skipped batches, so batches from ``skip`` on are bit-identical to the replay's
(``tests/test_stream.py``). A vector stays in the buffer through each drain with probability 1/2, so a
chunk of n vectors is served in full only about log2(n) + 1 drains after it was poured: with the defaults
(chunks of 32 rows of 128 tokens, a 64k buffer, batches of 4,096) a resume harvests about 110 chunks
(0.45M tokens) however late it is, where a replay harvests every chunk before it
(``benchmarks/bench_resume.py``: 1.1x fewer at batch 100, 94x at 10,000, 884x at 100,000).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from jaxtyping import Int

from . import activations
from .activations import SiteBatch, kept_vectors
from .errors import InputError
from .models import model_device
from .sites import Site
from .spec import model_spec

#: The simulation's one "site": its vectors are chunk numbers.
_CHUNK = "chunk"


def activation_batches(
    model,
    rows: Int[torch.Tensor, "rows pos"],
    sites: Sequence[Site],
    batch_size: int,
    *,
    model_batch_rows: int = 32,
    buffer_tokens: int = 65536,
    with_grad: bool = False,
    drop_bos: bool = True,
    seed: int = 0,
    epochs: int | None = None,
    device: str | torch.device | None = None,
    skip: int = 0,
    log: Callable[[str], None] | None = None,
) -> Iterator[dict[Site, SiteBatch]]:
    """Shuffled training batches from token ``rows``, cycling over them (``epochs`` times, or forever),
    starting at batch ``skip`` (the batches before it are neither built nor, where the module docstring
    says, harvested; ``log`` is told how many chunks of rows that spares)."""
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise InputError(f"rows must be a non-empty [rows, pos] token tensor, got shape {tuple(rows.shape)}")
    if skip < 0:
        raise InputError(f"skip must be >= 0 batches, got {skip}")
    keep = _keep_mask(model, drop_bos)
    capacity = max(buffer_tokens, 2 * batch_size)
    idle: set[int] = set()
    if skip:
        idle, poured = _idle_chunks(rows, keep, batch_size, model_batch_rows, capacity, seed, epochs, skip)
        if log is not None:
            log(f"resume at batch {skip}: {poured - len(idle)} of the {poured} chunks of {model_batch_rows} rows "
                "poured before it still hold vectors to serve and are harvested again; the rest are not")
    out_device = torch.device(device) if device is not None else model_device(model)
    buf = _ShuffleBuffer(list(sites), with_grad, batch_size, torch.Generator().manual_seed(seed), out_device)
    buf.discard = skip
    widths = {s: s.d_in(model.cfg) for s in sites}

    def pour(chunk: int, idx: torch.Tensor) -> None:
        if chunk in idle:
            buf.add_placeholder(int(keep(rows[idx]).sum()), widths)
        else:  # looked up on the module at call time, so a wrapper there (bench_e2e's clock) sees every call
            buf.add(kept_vectors(activations.harvest(model, rows[idx], sites, with_grad, drop_bos), sites))

    for batch in _shuffled(rows.shape[0], model_batch_rows, buf, capacity, epochs, pour):
        if batch is not None:
            yield batch


def _keep_mask(model, drop_bos: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The [rows, pos] mask of the tokens a harvest keeps (the same rule as :func:`harvest`'s)."""
    policy = model_spec(model).tokens
    return policy.keep if drop_bos else (lambda t: torch.ones_like(t, dtype=torch.bool))


def _shuffled(
    n_rows: int, model_batch_rows: int, buf: _ShuffleBuffer, capacity: int, epochs: int | None,
    pour: Callable[[int, torch.Tensor], None],
) -> Iterator[dict | None]:
    """The stream's schedule: a permutation of the rows per epoch, chunk by chunk into ``buf``, which serves
    half of itself whenever it holds ``capacity`` vectors (the rest at the end of the last epoch)."""
    chunk, epoch = 0, 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(n_rows, generator=buf.gen)
        for start in range(0, len(order), model_batch_rows):
            pour(chunk, order[start : start + model_batch_rows])
            chunk += 1
            if buf.have >= capacity:
                yield from buf.drain(final=False)
        epoch += 1
    if buf.have >= buf.batch_size:
        yield from buf.drain(final=True)


def _idle_chunks(
    rows: torch.Tensor, keep: Callable, batch_size: int, model_batch_rows: int, capacity: int, seed: int,
    epochs: int | None, skip: int,
) -> tuple[set[int], int]:
    """The chunks every kept vector of which is served in the first ``skip`` batches, and how many chunks
    were poured by then: the stream run with chunk numbers for vectors (same draws, no model)."""
    buf = _ShuffleBuffer([_CHUNK], False, batch_size, torch.Generator().manual_seed(seed), torch.device("cpu"))
    sizes: dict[int, int] = {}

    def pour(chunk: int, idx: torch.Tensor) -> None:
        sizes[chunk] = int(keep(rows[idx]).sum())
        buf.add({_CHUNK: SiteBatch(torch.full((sizes[chunk], 1), chunk), None)})

    served = torch.zeros(1024, dtype=torch.long)  # per chunk, grown as chunks appear
    for i, batch in enumerate(_shuffled(rows.shape[0], model_batch_rows, buf, capacity, epochs, pour)):
        if i == skip:
            break
        chunks, n = torch.unique(batch[_CHUNK].acts[:, 0], return_counts=True)
        if len(sizes) > len(served):
            served = torch.cat([served, torch.zeros(2 * len(sizes) - len(served), dtype=torch.long)])
        served.index_add_(0, chunks, n)
    got = served.tolist()
    return {c for c, n in sizes.items() if got[c] == n}, len(sizes)


class _ShuffleBuffer:
    """Harvested vectors of every site, kept in the same token order across sites until served."""

    def __init__(self, keys: list, with_grad: bool, batch_size: int, gen: torch.Generator,
                 out_device: torch.device):
        self.keys, self.with_grad, self.batch_size, self.gen, self.out_device = keys, with_grad, batch_size, gen, out_device
        self.store: dict = {s: [] for s in keys}
        self.gstore: dict = {s: [] for s in keys}
        self.have = 0
        self.discard = 0
        """Batches still to pass over: their indices are drawn, no tensor is built (None is yielded)."""
        self.dtype = torch.float32
        """The harvests' dtype (placeholders take it; the first harvest corrects earlier ones)."""

    def add(self, kept: dict) -> None:
        dtype = kept[self.keys[0]].acts.dtype
        if dtype != self.dtype and dtype.is_floating_point:
            self.dtype = dtype  # only placeholders can be held in another dtype (zeros): recast them
            self.store = {s: [t.to(dtype) for t in ts] for s, ts in self.store.items()}
            self.gstore = {s: [t.to(dtype) for t in ts] for s, ts in self.gstore.items()}
        for s in self.keys:
            self.store[s].append(kept[s].acts)
            if self.with_grad:
                self.gstore[s].append(kept[s].grads)
        self.have += len(kept[self.keys[0]].acts)

    def add_placeholder(self, n: int, widths: dict) -> None:
        """``n`` zero vectors per site, standing for a chunk whose vectors are all in discarded batches."""
        zeros = {s: torch.zeros(n, widths[s], dtype=self.dtype) for s in self.keys}
        self.add({s: SiteBatch(z, z if self.with_grad else None) for s, z in zeros.items()})

    def drain(self, final: bool) -> Iterator[dict | None]:
        """Shuffle what is held and serve whole batches: all of it when ``final``, else half (the rest
        stays to mix with the next harvest)."""
        keys, dev = self.keys, self.out_device
        cat = {s: torch.cat(self.store[s]) for s in keys}
        gcat = {s: torch.cat(self.gstore[s]) for s in keys} if self.with_grad else None
        perm = torch.randperm(self.have, generator=self.gen)
        n_batches = (self.have if final else self.have // 2) // self.batch_size
        for b in range(n_batches):
            if self.discard:
                self.discard -= 1
                yield None
                continue
            idx = perm[b * self.batch_size : (b + 1) * self.batch_size]
            yield {
                s: SiteBatch(
                    cat[s][idx].to(dev, non_blocking=True),
                    gcat[s][idx].to(dev, non_blocking=True) if gcat is not None else None,
                )
                for s in keys
            }
        rest = perm[n_batches * self.batch_size :]
        for s in keys:
            self.store[s] = [cat[s][rest]]
            if gcat is not None:
                self.gstore[s] = [gcat[s][rest]]
        self.have = len(rest)
