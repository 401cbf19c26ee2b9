"""Build the embedded default model: a BPE tokenizer and a 2-layer GPT-NeoX LM trained on Shakespeare.

Usage (about 40 minutes on 2 CPU cores; every random choice is seeded)::

    python -m sae_lens_attn.training.build_default_model --corpus ../shared/corpus/shakespeare

The corpus is only read here; the package ships the result (``sae_lens_attn/assets/default_model``) and
the held-out plays' text (``sae_lens_attn/assets/sample_text.txt``), so nothing else needs the corpus.

Why the recipe looks like this (see ``../shared/notes`` and the model card): induction heads are the
slow, plateau-bound part. Mixing random repeats into natural text from the start, or repeating at a fixed
period, failed in earlier trials (no copying, or fixed-offset copy heads). What we do instead:

1. a synthetic warm-up: rows made only of random segments, each shown twice, with segment lengths and the
   gap between the copies drawn at random, so only a content-based (induction) solution lowers the loss;
2. then natural text, with part of the rows still synthetic and part carrying a copied span of natural
   text, so the circuit survives and also fires on real tokens.

Segment lengths that are multiples of 10 never occur in training; the model card's induction scores are
measured at exactly those lengths (10, 30, 50, 100), so a fixed-offset copier would score nothing there.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sae_lens_attn.errors import MissingFileError

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


@dataclass
class BuildConfig:
    corpus: str
    """Folder of the Shakespeare plays (``*_gut.txt``)."""
    out: str = "sae_lens_attn/assets"
    """Where ``default_model/`` and ``sample_text.txt`` are written."""
    vocab_size: int = 4096
    """BPE vocabulary size, the BOS/EOS token included."""
    d_model: int = 256
    """Residual width."""
    n_heads: int = 8
    """Attention heads per layer (d_head = d_model / n_heads)."""
    n_layers: int = 2
    """Transformer blocks."""
    d_mlp: int = 1024
    """MLP hidden width."""
    rotary_pct: float = 0.5
    """Share of each head's dimensions that are rotated: half positional, half free for content."""
    n_ctx: int = 256
    """Context length of the model and of every training row."""
    batch_rows: int = 16
    """Rows per optimizer step."""
    warmup_steps: int = 1200
    """At most this many steps of purely synthetic repeated-segment rows before natural text."""
    warmup_ctx: int = 64
    """Row length during the warm-up (shorter rows: a stronger signal per row, as many tokens per step)."""
    warmup_vocab: int = 512
    """Warm-up segments draw from this many token ids (picked at random): each embedding is seen often, so
    the previous-token head forms in ~150 steps instead of not at all by step 200 with all 4095 ids."""
    repeat_share: float = 0.5
    """Share of synthetic rows that repeat one random segment until the row is full (its length drawn per
    row). Bursty rows: after the first copy every token is predictable, and copying "any earlier token"
    already pays, so the copying (OV) half of the induction head gets a gradient before its attention
    is right, which shortens the plateau (measured in the small trials recorded in the model card)."""
    warmup_alternating_share: float = 0.2
    """Warm-up share of alternating rows ``a b a b ...`` during the first ``alternating_steps`` steps:
    predicting x[t+1] = x[t-1] needs exactly a previous-token head in layer 0, which gives that head a
    gradient of its own instead of waiting for the induction head to need it (the chicken-and-egg plateau
    of trials 3-5). Kept on for the whole warm-up, layer 1 learned a *shifted* copy (attending two
    positions after the earlier occurrence and copying the previous-token head's output), which the
    standard induction score does not count; seeding the previous-token head for 150 steps only, or not at
    all, left layer 1 on the plateau for 800+ steps. The default keeps them for the whole warm-up and lets
    natural text reshape the circuit (see the model card's history)."""
    alternating_steps: int = 1200
    """Steps during which alternating rows are mixed in."""
    permuted_chain: bool = False
    """Alternating rows as skip-chains a, b, f(a), f(b), ... with f a random permutation (slower: no
    previous-token head after 400 steps)."""
    warmup_exit_induction: float = 0.3
    """The warm-up ends early once the best layer-1 induction score (repeat length 30, warm-up tokens)
    reaches this; natural text and whole-vocabulary segments then generalise the circuit."""
    warmup_exit_copy_loss: float = 1.5
    """... or once the loss on the second copy of ``BOS, r, r`` (repeat length 30, warm-up tokens) is below
    this (nats): the model copies, whatever the attention pattern."""
    steps: int = 3000
    """Total optimizer steps."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up over 100 steps, cosine decay to 10%)."""
    synthetic_share: float = 0.3
    """After the warm-up: share of rows that are purely synthetic."""
    copied_span_share: float = 0.3
    """After the warm-up: share of natural rows that carry a copied span of natural text."""
    seed: int = 0
    """Seeds numpy, torch and the tokenizer's corpus order."""
    eval_every: int = 250
    """Steps between held-out / induction evaluations."""
    stop_after: int | None = None
    """Stop after this many steps (the learning-rate schedule still spans ``steps``)."""


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


def train_lengths(rng: np.random.Generator, size: int) -> np.ndarray:
    """Segment lengths in [3, 96], never a multiple of 10 (those are kept for evaluation)."""
    out = rng.integers(3, 97, size=size)
    bad = out % 10 == 0
    out[bad] += 1
    return out


def synthetic_row(
    rng: np.random.Generator, n_ctx: int, vocab: int, bos: int, short: bool = False, ids: np.ndarray | None = None
) -> np.ndarray:
    row = [bos]
    while len(row) < n_ctx:
        (length,) = train_lengths(rng, 1)
        if short:  # keep two copies inside a short row
            length = 3 + length % max(1, n_ctx // 2 - 8)
            length += length % 10 == 0
        if ids is None:
            seg = rng.integers(1, vocab, size=int(length))
            gap = rng.integers(1, vocab, size=int(rng.integers(0, 12)))
        else:
            seg = rng.choice(ids, size=int(length))
            gap = rng.choice(ids, size=int(rng.integers(0, 12)))
        row.extend(seg)
        row.extend(gap)
        row.extend(seg)
    return np.asarray(row[:n_ctx], dtype=np.int64)


def repeated_row(rng: np.random.Generator, n_ctx: int, vocab: int, bos: int, ids: np.ndarray | None) -> np.ndarray:
    (length,) = train_lengths(rng, 1)
    length = 3 + int(length) % max(1, min(60, n_ctx // 2) - 3)
    length += length % 10 == 0
    seg = list(rng.integers(1, vocab, size=length) if ids is None else rng.choice(ids, size=length))
    row = [bos]
    while len(row) < n_ctx:
        row.extend(seg)
    return np.asarray(row[:n_ctx], dtype=np.int64)


def alternating_row(rng: np.random.Generator, n_ctx: int, bos: int, ids: np.ndarray, fmap: np.ndarray) -> np.ndarray:
    row = [bos]
    while len(row) < n_ctx:
        chain = list(rng.choice(ids, size=2, replace=False))
        for _ in range(int(rng.integers(2, 12))):
            chain.append(int(fmap[chain[-2]]))
        row.extend(chain)
    return np.asarray(row[:n_ctx], dtype=np.int64)


def natural_row(rng: np.random.Generator, stream: np.ndarray, n_ctx: int, bos: int, copy: bool) -> np.ndarray:
    start = int(rng.integers(0, len(stream) - n_ctx))
    row = stream[start : start + n_ctx].copy()
    row[0] = bos
    if copy:
        (length,) = train_lengths(rng, 1)
        length = min(int(length), n_ctx // 2 - 2)
        src = int(rng.integers(1, n_ctx - 2 * length))
        dst = int(rng.integers(src + length, n_ctx - length + 1))
        row[dst : dst + length] = row[src : src + length]
    return row


def make_batch(
    rng, cfg: BuildConfig, stream, in_warmup: bool, bos: int, warm_ids: np.ndarray, fmap: np.ndarray, step: int
) -> torch.Tensor:
    if in_warmup:
        n_rows = cfg.batch_rows * cfg.n_ctx // cfg.warmup_ctx
        rows = []
        for _ in range(n_rows):
            u = rng.random()
            if step < cfg.alternating_steps and u < cfg.warmup_alternating_share:
                rows.append(alternating_row(rng, cfg.warmup_ctx, bos, warm_ids, fmap))
            elif u < cfg.warmup_alternating_share + (1 - cfg.warmup_alternating_share) * cfg.repeat_share:
                rows.append(repeated_row(rng, cfg.warmup_ctx, cfg.vocab_size, bos, warm_ids))
            else:
                rows.append(synthetic_row(rng, cfg.warmup_ctx, cfg.vocab_size, bos, cfg.warmup_ctx < cfg.n_ctx, warm_ids))
        return torch.from_numpy(np.stack(rows))
    rows = []
    for _ in range(cfg.batch_rows):
        if rng.random() < cfg.synthetic_share:
            if rng.random() < cfg.repeat_share:
                rows.append(repeated_row(rng, cfg.n_ctx, cfg.vocab_size, bos, None))
            else:
                rows.append(synthetic_row(rng, cfg.n_ctx, cfg.vocab_size, bos))
        else:
            rows.append(natural_row(rng, stream, cfg.n_ctx, bos, rng.random() < cfg.copied_span_share))
    return torch.from_numpy(np.stack(rows))


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


def build(cfg: BuildConfig) -> dict:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.out)
    model_dir = out / "default_model"
    model_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

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

    hf_cfg = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_mlp,
        max_position_embeddings=cfg.n_ctx,
        rotary_pct=cfg.rotary_pct,
        use_parallel_residual=False,
        tie_word_embeddings=True,  # keeps the shipped weights under 12 MB in fp32
        bos_token_id=bos,
        eos_token_id=bos,
        attn_implementation="eager",
    )
    model = GPTNeoXForCausalLM(hf_cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < 100:
            return cfg.lr * (step + 1) / 100
        frac = (step - 100) / max(1, cfg.steps - 100)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    history = []
    warm_ids = rng.permutation(np.arange(1, cfg.vocab_size))[: cfg.warmup_vocab]
    fmap = np.arange(cfg.vocab_size)
    if cfg.permuted_chain:
        fmap[warm_ids] = warm_ids[rng.permutation(len(warm_ids))]
    warmup_end = cfg.warmup_steps
    model.train()
    for step in range(cfg.stop_after or cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        in_warmup = step < warmup_end
        batch = make_batch(rng, cfg, stream, in_warmup, bos, warm_ids, fmap, step)
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            scores = head_scores(model, cfg.vocab_size, bos, 50)
            if in_warmup:  # has copying formed on the warm-up's own tokens?
                short = head_scores(model, cfg.vocab_size, bos, 30, ids=warm_ids)
                if (max(short["induction"][-1]) >= cfg.warmup_exit_induction
                        or short["second_copy_loss"] < cfg.warmup_exit_copy_loss):
                    warmup_end = step + 1
            ce = held_out_ce(model, eval_rows)
            model.train()
            rec = {
                "step": step + 1,
                "tokens": (step + 1) * cfg.batch_rows * cfg.n_ctx,
                "train_loss": round(loss.item(), 4),
                "held_out_ce": round(ce, 4),
                "best_induction_L1": round(max(scores["induction"][-1]), 3),
                "best_prev_token_L0": round(max(scores["previous_token"][0]), 3),
                "warmup": in_warmup,
                "minutes": round((time.time() - t0) / 60, 2),
            }
            history.append(rec)
            print(json.dumps(rec), flush=True)
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)

    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return write_card(model, cfg, model_dir, history, warmup_end, (time.time() - t0) / 60)


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
