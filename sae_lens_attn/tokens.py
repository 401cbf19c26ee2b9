"""One tokenization policy, read from the tokenizer's own special tokens, used everywhere text becomes tokens.

The policy decides the structural tokens every row and every prompt carries:

* **causal LM with a BOS token** (GPT-2, Llama, Gemma, the embedded model, ...): ``[BOS] text``; packed
  documents are joined with BOS (GPT-2 / Pythia packing).
* **causal LM with an EOS but no BOS** (Qwen2): EOS plays BOS's part (``[EOS] text``), as GPT-2's
  ``<|endoftext|>`` does; the rule is named ``eos-as-bos`` so it is visible in metadata and messages.
* **encoder with CLS and SEP** (BERT family): ``[CLS] text [SEP]``; packed documents are joined with SEP.
* **neither**: no structural token; rows are plain token runs (``prepend_bos`` is then False in metadata).

Structural tokens are never trained on and never evaluated (they are attention sinks, not text): the
:meth:`TokenPolicy.keep` mask drops exactly them. Other special tokens that occur in text (``[UNK]``) are
kept. The policy reads the tokenizer as it was saved, not after TransformerBridge's boot, which sets a
missing BOS/EOS to ``<|endoftext|>`` (``[UNK]`` in a BERT vocabulary).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from .errors import InputError

Rule = Literal["bos", "eos-as-bos", "cls-sep", "none", "token"]

#: ``start_token`` values that are not token names: the tokenizer's own rule, or no start token.
START_DEFAULT, START_NONE = "bos", "none"


@dataclass(frozen=True)
class TokenPolicy:
    """Which structural tokens a model's rows and prompts carry (see the module docstring)."""

    rule: Rule
    """``bos``, ``eos-as-bos``, ``cls-sep`` or ``none``."""
    start: int | None = None
    """First token of every row and prompt (BOS, EOS-as-BOS or CLS); None: none."""
    end: int | None = None
    """Last token of every row and prompt (SEP for encoders); None: none."""
    separator: int | None = None
    """Between packed documents (BOS for causal LMs, SEP for encoders)."""
    mask: int | None = None
    """Encoders: the mask token of the masked-token loss."""
    pad: int | None = None
    """The tokenizer's pad token (used only to right-pad prompts of different lengths)."""
    special: frozenset[int] = field(default_factory=frozenset)
    """Structural ids: dropped from training data and evaluations."""
    start_name: str | None = None
    """Rule ``token``: the start token's text, as the user named it (``--start-token``)."""

    @property
    def prepend_bos(self) -> bool:
        """SAELens' ``metadata.prepend_bos``: whether rows start with a structural token."""
        return self.start is not None

    @property
    def n_structural(self) -> int:
        """Structural tokens around each row's body (0, 1 or 2)."""
        return int(self.start is not None) + int(self.end is not None)

    def wrap(self, ids: Sequence[int]) -> list[int]:
        """``[start] ids [end]`` (each only where the policy has it)."""
        head = [self.start] if self.start is not None else []
        tail = [self.end] if self.end is not None else []
        return [*head, *[int(i) for i in ids], *tail]

    def encode(self, tokenizer, text: str) -> list[int]:
        """``text`` as token ids by this policy (the tokenizer's own special tokens are not added)."""
        return self.wrap(tokenizer(text, add_special_tokens=False)["input_ids"])

    def keep(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bool mask, True on text tokens (False on the structural ones)."""
        if not self.special:
            return torch.ones_like(tokens, dtype=torch.bool)
        ids = torch.tensor(sorted(self.special), device=tokens.device, dtype=tokens.dtype)
        return ~torch.isin(tokens, ids)

    def describe(self) -> str:
        parts = {"bos": "[BOS] text", "eos-as-bos": "[EOS] text (no BOS token; EOS stands in)",
                 "cls-sep": "[CLS] text [SEP]", "none": "text (no structural tokens)",
                 "token": f"{self.start_name} text (start token chosen with --start-token)"}
        return parts[self.rule]

    @property
    def start_token(self) -> str:
        """The ``start_token`` choice that gives this policy: ``bos`` (the tokenizer's own rule), ``none``
        or the chosen token's text (recorded in SAE metadata so analysis loads the model the same way)."""
        return self.start_name if self.rule == "token" else START_NONE if self.rule == "none" else START_DEFAULT


def policy_from_tokenizer(tokenizer, encoder: bool) -> TokenPolicy:
    """The policy of a tokenizer *as saved* (not after TransformerBridge changed its BOS/EOS)."""
    bos, eos = _id(tokenizer, "bos"), _id(tokenizer, "eos")
    cls, sep, mask, pad = _id(tokenizer, "cls"), _id(tokenizer, "sep"), _id(tokenizer, "mask"), _id(tokenizer, "pad")
    if encoder and cls is not None and sep is not None:
        return TokenPolicy("cls-sep", cls, sep, sep, mask, pad, frozenset({cls, sep} | ({pad} if pad is not None else set())))
    if bos is not None:
        return TokenPolicy("bos", bos, None, bos, mask, pad, frozenset({bos}))
    if eos is not None:
        return TokenPolicy("eos-as-bos", eos, None, eos, mask, pad, frozenset({eos}))
    return TokenPolicy("none", None, None, None, mask, pad, frozenset())


def with_start_token(policy: TokenPolicy, tokenizer, choice: str | None, encoder: bool = False) -> TokenPolicy:
    """``policy`` with the start token the user chose: ``bos`` (or None) keeps the tokenizer's rule,
    ``none`` drops the start token, any other value must be one token of the vocabulary (e.g.
    ``<|endoftext|>`` for SmolLM2-Instruct, whose ``bos_token`` is the chat-turn token ``<|im_start|>``).
    The chosen token starts every row and prompt and separates packed documents."""
    if choice is None or choice == START_DEFAULT:
        return policy
    if encoder:
        raise InputError(f"start_token {choice!r}: encoders keep their [CLS] text [SEP] framing; the start token "
                         "is a choice for causal LMs only (leave --start-token at 'bos')")
    if choice == START_NONE:
        return TokenPolicy("none", None, None, None, policy.mask, policy.pad, frozenset())
    tid = tokenizer.convert_tokens_to_ids(choice)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (tid == unk and choice != getattr(tokenizer, "unk_token", None)):
        ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
        raise InputError(
            f"start_token {choice!r} is not one token of this tokenizer's vocabulary (it encodes as {len(ids)} "
            f"token(s) {ids[:8]}); pass 'bos' (the tokenizer's {getattr(tokenizer, 'bos_token', None)!r}), 'none', "
            "or the exact text of one special token such as the EOS token "
            f"{getattr(tokenizer, 'eos_token', None)!r}"
        )
    tid = int(tid)
    return TokenPolicy("token", tid, None, tid, policy.mask, policy.pad, frozenset({tid}), start_name=choice)


def causal_policy(bos: int | None) -> TokenPolicy:
    """A causal-LM policy with ``bos`` as start and separator (None: no structural tokens)."""
    if bos is None:
        return TokenPolicy("none")
    return TokenPolicy("bos", int(bos), None, int(bos), None, None, frozenset({int(bos)}))


def _id(tokenizer, name: str) -> int | None:
    if getattr(tokenizer, f"{name}_token", None) is None:
        return None
    tid = getattr(tokenizer, f"{name}_token_id", None)
    return int(tid) if tid is not None else None


_WARNED: set[tuple] = set()


def warn_once(key: tuple, message: str) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, UserWarning, stacklevel=3)


def check_start_token(tokens: torch.Tensor, policy: TokenPolicy, metadata: dict | None, what: str = "the SAE") -> None:
    """Warn once when ``tokens`` lack the start token ``what`` was trained with (``metadata.prepend_bos``).

    A prompt tokenized without it (``model.to_tokens`` on GPT-NeoX, Qwen2 and Phi prepends nothing) puts an
    ordinary token at position 0, where the model's attention sink was during training; features there
    are artefacts.
    """
    chosen = (metadata or {}).get("start_token")
    if chosen is not None and chosen != policy.start_token:
        warn_once(
            ("start-choice", chosen, policy.start_token, what),
            f"{what} was trained with start_token {chosen!r} but the model was loaded with {policy.start_token!r}; "
            f"load it with load_model(..., start_token={chosen!r}) (--start-token {chosen!r}) so rows and prompts "
            "start as they did in training",
        )
    trained_with = (metadata or {}).get("prepend_bos", True)
    if not trained_with or policy.start is None or tokens.numel() == 0:
        return
    if bool((tokens[..., 0] != policy.start).any()):
        warn_once(
            ("start", policy.start, what),
            f"these tokens do not start with the token {what} was trained with (id {policy.start}, rule "
            f"{policy.rule}: {policy.describe()}); position 0 then holds an attention-sink artefact. Pass text "
            "(tokenized by the project's policy) or tokens from sae_lens_attn.tokens.TokenPolicy.encode",
        )
