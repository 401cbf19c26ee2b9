"""Build the embedded default model: a BPE tokenizer and a 2-layer GPT-NeoX LM trained on Shakespeare.

Usage (about 40 minutes on 2 CPU cores; every random choice is seeded)::

    python -m sae_lens_attn.training.build_default_model --corpus ../shared/corpus/shakespeare

The corpus is only read here; the package ships the result (``sae_lens_attn/assets/default_model``) and
the held-out plays' text (``sae_lens_attn/assets/sample_text.txt``), so nothing else needs the corpus.

The recipe (the settings, the synthetic warm-up and the rows, and why they look like this) is
:mod:`.default_model_recipe`; this module runs it: the tokenizer, the training loop, its evaluations and
the model card.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from sae_lens_attn.errors import MissingFileError

from .default_model_recipe import BuildConfig, make_batch

#: Plays held out of tokenizer and model training; their text ships as the package's sample.
HELD_OUT_PLAYS = (
    "hamlet",
    "macbeth",
    "tempest",
    "julius_caesar",
    "twelfth_night",
    "midsummer_nights_dream",
    "othello",
    "merchant_of_venice",
)
BOS = "<|endoftext|>"
EVAL_LENGTHS = (10, 30, 50, 100)


def read_plays(corpus: Path) -> tuple[list[str], list[str]]:
    files = sorted(corpus.glob("*_gut.txt"))
    if not files:
        raise MissingFileError(f"no '*_gut.txt' plays under {corpus}; pass --corpus the Shakespeare folder")
    train, held = [], []
    for f in files:
        name = f.name.removesuffix("_gut.txt")
        (held if name in HELD_OUT_PLAYS else train).append(f.read_text(encoding="utf-8", errors="replace"))
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=BOS)


def encode_stream(tokenizer, texts: list[str]) -> np.ndarray:
    ids: list[int] = []
    for t in texts:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer(t)["input_ids"])
    return np.asarray(ids, dtype=np.int64)




@torch.no_grad()
def head_scores(
    model, vocab: int, bos: int, length: int, n_seq: int = 32, seed: int = 1234, ids: np.ndarray | None = None
) -> dict:
    """Induction and previous-token scores of every head on ``BOS, r, r`` (r: ``length`` random tokens from
    the whole vocabulary, or from ``ids``)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(1, vocab, (n_seq, length), generator=g)
    if ids is not None:
        r = torch.as_tensor(ids)[r % len(ids)]
    toks = torch.cat([torch.full((n_seq, 1), bos), r, r], dim=1)
    out = model(toks, output_attentions=True)
    nll = -out.logits[:, :-1].log_softmax(-1).gather(-1, toks[:, 1:, None])[..., 0]
    second = torch.arange(length + 1, 2 * length + 1)
    ind, prev = [], []
    for att in out.attentions:  # [batch, head, query, key]
        ind.append(att[:, :, second, second - length + 1].mean(dim=(0, 2)).tolist())
        q = torch.arange(1, toks.shape[1])
        prev.append(att[:, :, q, q - 1].mean(dim=(0, 2)).tolist())
    return {"induction": ind, "previous_token": prev, "second_copy_loss": float(nll[:, length:].mean()),
            "first_copy_loss": float(nll[:, :length].mean())}


@torch.no_grad()
def held_out_ce(model, rows: torch.Tensor) -> float:
    losses = [model(chunk, labels=chunk).loss.item() for chunk in rows.split(16)]
    return float(np.mean(losses))


def unigram_entropy(ids: np.ndarray, vocab: int) -> float:
    counts = np.bincount(ids, minlength=vocab).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class BuildData(NamedTuple):
    """The tokenizer and the token streams a build trains and evaluates on."""

    tokenizer: object
    bos: int
    stream: np.ndarray
    """The training plays' tokens, each play after a BOS."""
    eval_rows: torch.Tensor
    """64 held-out rows of ``n_ctx`` tokens (BOS first): the held-out CE during training."""


def build(cfg: BuildConfig) -> dict:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model_dir = Path(cfg.out) / "default_model"
    model_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = prepare_data(cfg)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(data.tokenizer),
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_mlp,
        max_position_embeddings=cfg.n_ctx,
        rotary_pct=cfg.rotary_pct,
        use_parallel_residual=False,
        tie_word_embeddings=True,  # keeps the shipped weights under 12 MB in fp32
        bos_token_id=data.bos,
        eos_token_id=data.bos,
        attn_implementation="eager",
    ))
    history, warmup_end = train_model(model, cfg, rng, data, model_dir, t0)
    model.save_pretrained(model_dir)
    data.tokenizer.save_pretrained(model_dir)
    return write_card(model, cfg, model_dir, history, warmup_end, (time.time() - t0) / 60)


def prepare_data(cfg: BuildConfig) -> BuildData:
    """Train the tokenizer on the training plays, encode both sets, and write the held-out plays' text
    (``sample_text.txt``)."""
    out = Path(cfg.out)
    train_texts, held_texts = read_plays(Path(cfg.corpus))
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    bos = tokenizer.bos_token_id
    stream = encode_stream(tokenizer, train_texts)
    held_stream = encode_stream(tokenizer, held_texts)
    (out / "sample_text.txt").write_text("\n\n".join(held_texts), encoding="utf-8")
    n_held = (len(held_stream) - 1) // (cfg.n_ctx - 1)
    held_rows = torch.from_numpy(held_stream[: n_held * (cfg.n_ctx - 1)].reshape(n_held, cfg.n_ctx - 1))
    held_rows = torch.cat([torch.full((n_held, 1), bos), held_rows], dim=1)
    eval_rows = held_rows[torch.randperm(n_held, generator=torch.Generator().manual_seed(0))[:64]]
    # Unigram entropy of the held-out tokens (BOS excluded): the no-context baseline the CE must beat.
    h_unigram = unigram_entropy(held_stream[held_stream != bos], cfg.vocab_size)
    print(f"train tokens {len(stream):,}  held-out tokens {len(held_stream):,}  unigram entropy {h_unigram:.3f}")
    return BuildData(tokenizer, bos, stream, eval_rows)


def lr_at(step: int, cfg: BuildConfig) -> float:
    """Linear warm-up over 100 steps, then cosine decay to 10% of ``cfg.lr`` at ``cfg.steps``."""
    if step < 100:
        return cfg.lr * (step + 1) / 100
    frac = (step - 100) / max(1, cfg.steps - 100)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_model(model, cfg: BuildConfig, rng: np.random.Generator, data: BuildData, model_dir: Path,
                t0: float) -> tuple[list[dict], int]:
    """The training loop (AdamW, clipped gradients): the warm-up, then natural text; every ``eval_every``
    steps a record is printed and the model saved. Returns the records and the step the warm-up ended."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    history = []
    warm_ids = rng.permutation(np.arange(1, cfg.vocab_size))[: cfg.warmup_vocab]
    fmap = np.arange(cfg.vocab_size)
    if cfg.permuted_chain:
        fmap[warm_ids] = warm_ids[rng.permutation(len(warm_ids))]
    warmup_end = cfg.warmup_steps
    model.train()
    for step in range(cfg.stop_after or cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        in_warmup = step < warmup_end
        batch = make_batch(rng, cfg, data.stream, in_warmup, data.bos, warm_ids, fmap, step)
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            rec, copies = evaluate(model, cfg, data, warm_ids, step, in_warmup, loss.item(), t0)
            if copies:
                warmup_end = step + 1
            history.append(rec)
            print(json.dumps(rec), flush=True)
            model.save_pretrained(model_dir)
            data.tokenizer.save_pretrained(model_dir)
    return history, warmup_end


def evaluate(model, cfg: BuildConfig, data: BuildData, warm_ids: np.ndarray, step: int, in_warmup: bool,
             train_loss: float, t0: float) -> tuple[dict, bool]:
    """The record of ``step`` (held-out CE, best induction and previous-token scores), and, during the
    warm-up, whether the model already copies on the warm-up's own tokens (the warm-up then ends)."""
    model.eval()
    scores = head_scores(model, cfg.vocab_size, data.bos, 50)
    copies = False
    if in_warmup:  # has copying formed on the warm-up's own tokens?
        short = head_scores(model, cfg.vocab_size, data.bos, 30, ids=warm_ids)
        copies = (max(short["induction"][-1]) >= cfg.warmup_exit_induction
                  or short["second_copy_loss"] < cfg.warmup_exit_copy_loss)
    ce = held_out_ce(model, data.eval_rows)
    model.train()
    rec = {
        "step": step + 1,
        "tokens": (step + 1) * cfg.batch_rows * cfg.n_ctx,
        "train_loss": round(train_loss, 4),
        "held_out_ce": round(ce, 4),
        "best_induction_L1": round(max(scores["induction"][-1]), 3),
        "best_prev_token_L0": round(max(scores["previous_token"][0]), 3),
        "warmup": in_warmup,
        "minutes": round((time.time() - t0) / 60, 2),
    }
    return rec, copies


def write_card(model, cfg: BuildConfig, model_dir: Path, history: list[dict], warmup_end: int,
               minutes: float) -> dict:
    """Measure the model on the held-out plays and write ``model_card.json`` beside the weights."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    bos = tokenizer.bos_token_id
    train_texts, held_texts = read_plays(Path(cfg.corpus))
    held_stream = encode_stream(tokenizer, held_texts)
    n_held = (len(held_stream) - 1) // (cfg.n_ctx - 1)
    held_rows = torch.from_numpy(held_stream[: n_held * (cfg.n_ctx - 1)].reshape(n_held, cfg.n_ctx - 1))
    held_rows = torch.cat([torch.full((n_held, 1), bos), held_rows], dim=1)
    model.eval()
    steps = history[-1]["step"] if history else 0
    command = "python -m sae_lens_attn.training.build_default_model --corpus ../shared/corpus/shakespeare"
    if cfg.stop_after:
        command += f" --stop-after {cfg.stop_after}"
    card = {
        "build_command": command,
        "config": asdict(cfg) | {"corpus": "../shared/corpus/shakespeare"},
        "architecture": "GPT-NeoX (rotary on half of each head's dims, sequential residual, tied embeddings)",
        "held_out_plays": list(HELD_OUT_PLAYS),
        "train_tokens_in_corpus": int(len(encode_stream(tokenizer, train_texts))),
        "held_out_tokens": int(len(held_stream)),
        "steps_trained": steps,
        "tokens_seen": steps * cfg.batch_rows * cfg.n_ctx,
        "warmup_ended_at_step": warmup_end,
        "wall_time_minutes": round(minutes, 1),
        "held_out_ce": round(held_out_ce(model, held_rows), 4),
        "held_out_unigram_entropy": round(unigram_entropy(held_stream[held_stream != bos], cfg.vocab_size), 4),
        "head_scores_by_repeat_length": {L: head_scores(model, cfg.vocab_size, bos, L) for L in EVAL_LENGTHS},
        "history": history,
    }
    (model_dir / "model_card.json").write_text(json.dumps(card, indent=1))
    return card


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", default=BuildConfig.out)
    p.add_argument("--steps", type=int, default=BuildConfig.steps)
    p.add_argument("--warmup-steps", type=int, default=BuildConfig.warmup_steps)
    p.add_argument("--warmup-ctx", type=int, default=BuildConfig.warmup_ctx)
    p.add_argument("--alternating-steps", type=int, default=BuildConfig.alternating_steps)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--stop-after", type=int, default=None)
    p.add_argument("--card-from-log", default=None,
                   help="write the model card for the model already in OUT/default_model, with the history "
                        "and wall time of this build log (a run stopped early), instead of training")
    p.add_argument("--d-model", type=int, default=BuildConfig.d_model)
    p.add_argument("--d-mlp", type=int, default=BuildConfig.d_mlp)
    p.add_argument("--lr", type=float, default=BuildConfig.lr)
    p.add_argument("--eval-every", type=int, default=BuildConfig.eval_every)
    p.add_argument("--seed", type=int, default=BuildConfig.seed)
    a = p.parse_args(argv)
    cfg = BuildConfig(
        corpus=a.corpus, out=a.out, steps=a.steps, warmup_steps=a.warmup_steps, warmup_ctx=a.warmup_ctx, alternating_steps=a.alternating_steps, stop_after=a.stop_after, d_model=a.d_model,
        d_mlp=a.d_mlp, lr=a.lr, eval_every=a.eval_every, seed=a.seed,
    )
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.card_from_log:
        from transformers import GPTNeoXForCausalLM

        history = [json.loads(line) for line in Path(a.card_from_log).read_text().splitlines() if line.startswith("{")]
        model_dir = Path(cfg.out) / "default_model"
        model = GPTNeoXForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
        warm = [h["step"] for h in history if not h.get("warmup", True)]
        warmup_end = (warm[0] - cfg.eval_every) if warm else cfg.warmup_steps
        cfg.stop_after = history[-1]["step"]
        card = write_card(model, cfg, model_dir, history, warmup_end, history[-1]["minutes"])
    else:
        card = build(cfg)
    print(json.dumps({k: card[k] for k in ("tokens_seen", "wall_time_minutes", "held_out_ce",
                                          "held_out_unigram_entropy")}))


if __name__ == "__main__":
    main()
