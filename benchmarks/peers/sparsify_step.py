"""One full EleutherAI sparsify (eai-sparsify 1.3.3) TopK training step, as ``sparsify.Trainer.fit`` does it.

Runs in benchmarks/.venvs/sparsify (see setup_peers.sh). ``sparsify.Trainer`` wants a Hugging Face model and
a token dataset and trains inside forward hooks, so this script replays the per-SAE body of its hook and
its step, with the package's own functions, for ``loss_fn="fvu"``, ``grad_acc_steps = micro_acc_steps = 1``:

* ``sparsify.SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), dtype=torch.float32)``: its TopK
  SAE (``normalize_decoder=True``, ``multi_topk=False``, no skip connection), built as the trainer builds it.
* first step only: ``b_dec <- batch mean`` (the trainer's initialisation);
* ``sae.set_decoder_norm_to_unit_norm()`` (the trainer renormalises at the start of every step, before the
  forward);
* ``dead_mask = num_tokens_since_fired > dead_feature_threshold`` (10M tokens, its default);
* ``total_variance = (x - x.mean(0)).pow(2).sum()``;
* ``out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)``: ``fused_encoder`` (dense
  ``F.linear``, ReLU, TopK, sparse ``index_add`` backward), ``decode`` (``embedding_bag``; Triton is absent
  on CPU so sparsify uses its eager decoder), FVU, AuxK over dead latents;
* ``did_fire[...] = True``; ``float(out.fvu)``, ``float(out.auxk_loss)`` (its logging accumulators);
* ``(out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()``;
* ``sae.remove_gradient_parallel_to_decoder_directions()``;
* ``optimizer.step(); optimizer.zero_grad(); scheduler.step()``;
* ``num_tokens_since_fired += N; [did_fire] = 0; did_fire.zero_()``.

That is one full step: decoder renormalisation, forward, FVU + AuxK loss, backward, parallel-gradient
removal, optimizer step.

Deviations from sparsify's defaults, to compare like with like (the brief asks for the same optimizer in
all three tools):
* optimizer: ``torch.optim.Adam`` (sparsify's ``optimizer="adam"`` branch, with its default LR
  ``2e-4 / sqrt(d_sae / 2**14)`` and ``get_linear_schedule_with_warmup``) instead of sparsify's default
  ``signum`` (ScheduleFree SignSGD); sparsify would use bitsandbytes' 8-bit Adam if installed; it is not;
* ``auxk_alpha = 1/32`` (sparsify's default is 0, which skips AuxK bookkeeping) so that its AuxK path is
  live as in SAELens and ours; with no dead latents after a few steps it does not fire in any of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _common  # noqa: E402


def main(argv=None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--auxk-alpha", type=float, default=1 / 32)
    p.add_argument("--dead-feature-threshold", type=int, default=10_000_000)
    p.add_argument("--lr-warmup-steps", type=int, default=1000, help="sparsify's TrainConfig default")
    p.add_argument("--tool-name", default=None)
    args = p.parse_args(argv)
    torch = _common.setup_torch(args)

    import importlib.metadata

    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    xs = _common.make_batches(args, torch)
    total = args.warmup + args.steps

    meter = _common.Meter()
    meter.start()
    sae = SparseCoder(args.d_in, SparseCoderConfig(num_latents=args.d_sae, k=args.k), "cpu", dtype=torch.float32)
    lr = 2e-4 / (sae.num_latents / (2**14)) ** 0.5
    opt = torch.optim.Adam([dict(params=sae.parameters(), lr=lr)])
    sched = get_linear_schedule_with_warmup(opt, args.lr_warmup_steps, total)
    num_tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
    logs = {"fvu": 0.0, "auxk": 0.0}

    def step(i: int):
        x = xs[i % len(xs)]
        n_tokens = x.shape[0]
        if i == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = num_tokens_since_fired > args.dead_feature_threshold if args.auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        logs["fvu"] = float(out.fvu.detach())
        if args.auxk_alpha > 0:
            logs["auxk"] = float(out.auxk_loss.detach())
        loss = out.fvu + args.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            num_tokens_since_fired.add_(n_tokens)
            num_tokens_since_fired[did_fire] = 0
            did_fire.zero_()
        return out

    warm, timed, _ = _common.time_steps(step, args.warmup, args.steps)
    return _common.emit(args.tool_name or "sparsify", args, warm, timed, meter, {
        "peer_version": importlib.metadata.version("eai-sparsify"),
        "optimizer": type(opt).__name__,
        "last_fvu": logs["fvu"],
        "last_auxk": logs["auxk"],
        "dead_latents": int((num_tokens_since_fired > args.dead_feature_threshold).sum()),
    })


if __name__ == "__main__":
    main()
