"""One full SAELens (sae-lens 6.54.12) TopK training step, run by SAELens' own trainer.

Runs in benchmarks/.venvs/saelens (see setup_peers.sh). What it calls, all from the installed package:

* ``sae_lens.saes.topk_sae.TopKTrainingSAE(TopKTrainingSAEConfig(d_in, d_sae, k, dtype="float32",
  device="cpu"))``: SAELens' TopK *training* SAE with its training defaults (``rescale_acts_by_decoder_norm=True``,
  ``aux_loss_coefficient=1.0``, ``decoder_init_norm=0.1``, ``use_sparse_activations=False``).
* ``sae_lens.training.sae_trainer.SAETrainer(SAETrainerConfig(...), sae, data_provider)``: the trainer that
  ``LanguageModelSAETrainingRunner`` builds; its optimizer is ``torch.optim.Adam`` (SAELens' only optimizer),
  constant LR schedule, no autocast (SAELens' default), no wandb.
* Per step, exactly what ``SAETrainer.fit`` does in its loop, minus the progress bar and the wandb/checkpoint
  branches (both off by default): ``trainer.maybe_reset_sparsity()``, ``trainer.step(batch)`` and
  ``trainer.n_training_steps += 1``. ``SAETrainer.step`` -> ``_train_step``:
  ``sae.training_forward_pass`` (``encode_with_hidden_pre``: dense ``(x - b_dec) @ W_enc + b_enc``, times the
  decoder norms, dense TopK; ``decode`` divides by the decoder norms; MSE; ``calculate_topk_aux_loss`` over
  dead latents), firing statistics, ``loss.backward()``, ``clip_grad_norm_(..., 1.0)`` (always on in SAELens'
  trainer), ``optimizer.step()``, ``zero_grad()``, LR and coefficient schedulers.

That is one full step: forward, loss (MSE + AuxK), backward, gradient clipping, Adam step. SAELens' TopK
training does not renormalise the decoder after the step: with ``rescale_acts_by_decoder_norm=True`` it
divides by ``W_dec.norm`` inside every forward instead (that work is in the timed step).

AuxK: SAELens counts a latent dead after ``dead_feature_window`` (1000) steps without firing, so, as for the
other tools, AuxK does not fire in a benchmark of a few steps.

Extra row ``saelens-sparse`` (``--sparse-activations --no-rescale``): ``use_sparse_activations=True`` (COO
activations and ``torch.sparse.mm`` in the decoder), which SAELens' docstring recommends for fp32 without
autocast, so SAELens is also compared at its fastest setting. With the training default
``rescale_acts_by_decoder_norm=True`` it fails in backward on CPU with torch 2.13 (``NotImplementedError:
aten::view ... SparseCPU``: ``decode`` multiplies the COO tensor by ``1 / W_dec.norm``), so that row also sets
``rescale_acts_by_decoder_norm=False``; SAELens then does no decoder-norm handling at all (less work than
the other tools, which favours SAELens).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _common  # noqa: E402


def main(argv=None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--sparse-activations", action="store_true",
                   help="use_sparse_activations=True; needs --no-rescale on CPU (see the docstring)")
    p.add_argument("--no-rescale", action="store_true", help="rescale_acts_by_decoder_norm=False")
    p.add_argument("--lr", type=float, default=3e-4, help="LanguageModelSAERunnerConfig's default")
    p.add_argument("--tool-name", default=None)
    args = p.parse_args(argv)
    torch = _common.setup_torch(args)

    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    xs = _common.make_batches(args, torch)
    total = args.warmup + args.steps

    meter = _common.Meter()
    meter.start()
    cfg = TopKTrainingSAEConfig(
        d_in=args.d_in, d_sae=args.d_sae, k=args.k, dtype="float32", device="cpu",
        use_sparse_activations=args.sparse_activations,
        rescale_acts_by_decoder_norm=not args.no_rescale,
    )
    sae = TopKTrainingSAE(cfg)
    tcfg = SAETrainerConfig(
        total_training_samples=total * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr / 10,  # what LanguageModelSAERunnerConfig fills in
        device="cpu",
    )
    trainer = SAETrainer(tcfg, sae, data_provider=iter(()))
    trainer.sae.to(tcfg.device)  # as fit() does

    def step(i: int):
        trainer.maybe_reset_sparsity()
        out = trainer.step(xs[i % len(xs)])
        trainer.n_training_steps += 1
        return out

    warm, timed, out = _common.time_steps(step, args.warmup, args.steps)
    losses = {k: float(v.detach()) for k, v in out.losses.items()}
    name = args.tool_name or ("saelens-sparse" if args.sparse_activations else "saelens")
    if args.no_rescale and not args.tool_name:
        name += "-norescale" if not args.sparse_activations else ""
    return _common.emit(name, args, warm, timed, meter, {
        "peer_version": sae_lens.__version__,
        "use_sparse_activations": args.sparse_activations,
        "rescale_acts_by_decoder_norm": not args.no_rescale,
        "optimizer": type(trainer.optimizer).__name__,
        "last_loss": float(out.loss.detach()),
        "last_losses": losses,
        "dead_latents": int(trainer.dead_neurons.sum()),
    })


if __name__ == "__main__":
    main()
