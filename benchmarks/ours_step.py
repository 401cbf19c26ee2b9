"""One full training step of sae_lens_attn's TopK SAE, as the trainer runs it.

Calls ``sae_lens_attn.training.trainer.SiteState(sae, OptimConfig(...)).step(SiteBatch(x, None), step)``, which is the
per-site body of ``Trainer.fit``:

* forward: ``TopKSAE.encode_sparse`` (selection GEMM outside autograd, TopK, the k kept values with a sparse
  CSR backward; ``kernels.selected_pre``) and ``SAE.decode_sparse`` (``embedding_bag``, CSR backward);
* loss: normalised MSE (FVU) plus ``auxk_alpha`` * AuxK over dead latents;
* ``loss.backward()``, ``remove_parallel_decoder_grad``, Adam step (``LayoutAwareAdam``: torch's fused Adam),
  ``normalize_decoder``;
* dead-latent and firing-count bookkeeping, ``.item()`` of the stats.

AuxK: it is live code in every step, but only fires once some latent has not fired for
``dead_tokens`` (default 250k) tokens. A warm-up of a few steps of 4096 tokens cannot make latents dead,
and in a healthy run almost none are, so the timed steps are the common case: no AuxK work. SAELens and
sparsify behave the same way (their AuxK also needs dead latents, with larger windows). Pass
``--dead-fraction F`` to mark a fraction of latents dead and time the AuxK path too.

Variants (extra rows): ``--kernels reference`` sets ``SAE_LENS_ATTN_KERNELS=reference`` (dense autograd
twin); ``--bf16-select`` runs the selection GEMM in bf16 (``SAE.bf16_select``); ``--selection gsae`` trains
a g-SAE on random gradients.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402


def main(argv=None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--kernels", choices=["auto", "reference"], default="auto")
    p.add_argument("--bf16-select", action="store_true")
    p.add_argument("--selection", choices=["topk", "gsae"], default="topk")
    p.add_argument("--dead-fraction", type=float, default=0.0,
                   help="mark this fraction of latents dead before each step (exercises AuxK); default 0")
    p.add_argument("--tool-name", default=None)
    args = p.parse_args(argv)
    if args.kernels == "reference":
        os.environ["SAE_LENS_ATTN_KERNELS"] = "reference"
    torch = _common.setup_torch(args)

    from sae_lens_attn.activations import SiteBatch
    from sae_lens_attn.kernels import kernels_enabled
    from sae_lens_attn.sae import SAE, SAEConfig
    from sae_lens_attn.training.trainer import OptimConfig, SiteState

    xs = _common.make_batches(args, torch)
    gs = None
    if args.selection == "gsae":
        g = torch.Generator().manual_seed(args.seed + 1)
        gs = [torch.randn(x.shape, generator=g) * 1e-2 for x in xs]

    meter = _common.Meter()
    meter.start()
    sae = SAE(SAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k, selection=args.selection))
    sae.bf16_select = args.bf16_select
    total = args.warmup + args.steps
    state = SiteState(sae, OptimConfig(steps=total, warmup_steps=0, decay_fraction=0.0))
    n_dead = int(round(args.dead_fraction * args.d_sae))

    def step(i: int):
        if n_dead:
            state.tokens_since_fired[:n_dead] = state.cfg.dead_tokens
        j = i % len(xs)
        return state.step(SiteBatch(xs[j], gs[j] if gs is not None else None), i)

    warm, timed, stats = _common.time_steps(step, args.warmup, args.steps)
    name = args.tool_name or "ours"
    return _common.emit(name, args, warm, timed, meter, {
        "kernels": "sparse" if kernels_enabled() else "reference",
        "bf16_select": args.bf16_select,
        "selection": args.selection,
        "dead_fraction": args.dead_fraction,
        "last_loss": stats.loss,
        "last_fvu": stats.fvu,
        "last_auxk": stats.auxk,
        "last_dead_fraction": stats.dead_fraction,
    })


if __name__ == "__main__":
    main()
