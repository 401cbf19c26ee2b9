"""Tiny random models of every family in the conformance matrix, built from ``transformers`` configs.

Nothing is shipped or downloaded: each model is made with ``AutoModelFor*.from_config`` and saved with
``save_pretrained`` beside a tokenizer (the embedded model's BPE for causal LMs, with an EOS-only variant for
Qwen2; a WordPiece tokenizer with [CLS]/[SEP]/[MASK] trained here for BERT), the layout a hub download has.
Biases and norm weights are randomised (Hugging Face initialises them to 0 and 1, which would hide them).

For the reference computations each family also names its modules: the attention output projection (its
input is z, its output attn_out) and how to read the value vectors from the Hugging Face model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_lens_attn.models import DEFAULT_MODEL_DIR

D_MODEL, N_LAYERS, N_HEADS, D_HEAD, FFN, N_POS = 32, 2, 4, 8, 64, 64
TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles, and by opposing end them. "
)


@dataclass(frozen=True)
class Family:
    name: str
    config: Callable[[int], object]
    """vocab size -> a transformers config."""
    o_proj: str
    """Path of layer ``{i}``'s attention output projection in the Hugging Face model."""
    values: str
    """How value vectors are read: ``v_proj:<path>``, ``fused_gpt2:<path>``, ``fused_neox:<path>``,
    ``fused_phi3:<path>`` (the projection's output, split as the family does)."""
    n_kv: int = N_HEADS
    tokenizer: str = "bpe"
    """``bpe`` (embedded model's, BOS = EOS), ``bpe_eos_only`` (no BOS token), ``wordpiece`` (BERT)."""
    encoder: bool = False
    head: bool = True
    """Encoders: saved with the masked-LM head (False: a bare BertModel, as sentence-embedding models are)."""
    conv1d: bool = False
    """GPT-2's Conv1D stores weights as [in, out]."""


def _t():
    import transformers

    return transformers


def _cfgs() -> dict[str, Family]:
    T = _t()
    L = "model.layers.{i}.self_attn."
    common = dict(hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, intermediate_size=FFN,
                  max_position_embeddings=N_POS)
    fams = [
        Family("gpt2", lambda v: T.GPT2Config(vocab_size=v, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS,
                                              n_positions=N_POS), "transformer.h.{i}.attn.c_proj",
               "fused_gpt2:transformer.h.{i}.attn.c_attn", conv1d=True),
        Family("gpt_neox", lambda v: T.GPTNeoXConfig(vocab_size=v, rotary_pct=0.5, **common),
               "gpt_neox.layers.{i}.attention.dense", "fused_neox:gpt_neox.layers.{i}.attention.query_key_value"),
        Family("gptj", lambda v: T.GPTJConfig(vocab_size=v, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS,
                                              n_positions=N_POS, rotary_dim=4), "transformer.h.{i}.attn.out_proj",
               "v_proj:transformer.h.{i}.attn.v_proj"),
        Family("opt", lambda v: T.OPTConfig(vocab_size=v, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
                                            num_attention_heads=N_HEADS, ffn_dim=FFN, max_position_embeddings=N_POS,
                                            word_embed_proj_dim=D_MODEL), "model.decoder.layers.{i}.self_attn.out_proj",
               "v_proj:model.decoder.layers.{i}.self_attn.v_proj"),
        Family("phi", lambda v: T.PhiConfig(vocab_size=v, partial_rotary_factor=0.5, **common), L + "dense",
               "v_proj:" + L + "v_proj"),
        Family("phi3", lambda v: T.Phi3Config(vocab_size=v, num_key_value_heads=2, pad_token_id=0, eos_token_id=0,
                                              bos_token_id=0, **common), L + "o_proj", "fused_phi3:" + L + "qkv_proj",
               n_kv=2),
        Family("llama", lambda v: T.LlamaConfig(vocab_size=v, num_key_value_heads=2, **common), L + "o_proj",
               "v_proj:" + L + "v_proj", n_kv=2),
        Family("mistral", lambda v: T.MistralConfig(vocab_size=v, num_key_value_heads=2, sliding_window=6, **common),
               L + "o_proj", "v_proj:" + L + "v_proj", n_kv=2),
        Family("qwen2", lambda v: T.Qwen2Config(vocab_size=v, num_key_value_heads=2, **common), L + "o_proj",
               "v_proj:" + L + "v_proj", n_kv=2, tokenizer="bpe_eos_only"),
        Family("gemma", lambda v: T.GemmaConfig(vocab_size=v, num_key_value_heads=1, head_dim=D_HEAD, **common),
               L + "o_proj", "v_proj:" + L + "v_proj", n_kv=1),
        Family("gemma2", lambda v: T.Gemma2Config(vocab_size=v, num_key_value_heads=2, head_dim=D_HEAD, sliding_window=6,
                                                  query_pre_attn_scalar=D_HEAD, attn_logit_softcapping=2.0,
                                                  final_logit_softcapping=5.0, **common),
               L + "o_proj", "v_proj:" + L + "v_proj", n_kv=2),
        Family("bert", lambda v: T.BertConfig(vocab_size=v, **common), "bert.encoder.layer.{i}.attention.output.dense",
               "v_proj:bert.encoder.layer.{i}.attention.self.value", tokenizer="wordpiece", encoder=True),
        Family("bert_no_head", lambda v: T.BertConfig(vocab_size=v, **common),
               "bert.encoder.layer.{i}.attention.output.dense", "v_proj:bert.encoder.layer.{i}.attention.self.value",
               tokenizer="wordpiece", encoder=True, head=False),
    ]
    return {f.name: f for f in fams}


FAMILIES = _cfgs()
NAMES = tuple(FAMILIES)


def make_tokenizer(kind: str):
    from transformers import PreTrainedTokenizerFast

    bpe = str(DEFAULT_MODEL_DIR / "tokenizer.json")
    if kind == "bpe":
        return PreTrainedTokenizerFast(tokenizer_file=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>")
    if kind == "bpe_eos_only":  # Qwen2's tokenizers have an EOS and a pad token but no BOS
        return PreTrainedTokenizerFast(tokenizer_file=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([TEXT] * 20, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials,
                                                                   show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def build(name: str, path: str | Path, seed: int = 0) -> str:
    """Write family ``name``'s tiny random model and tokenizer to ``path``; returns the path."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    fam = FAMILIES[name]
    path = Path(path)
    torch.manual_seed(seed)
    tok = make_tokenizer(fam.tokenizer)
    cfg = fam.config(len(tok.get_vocab()))
    if not fam.encoder:
        eos = tok.eos_token_id
        cfg.bos_token_id = tok.bos_token_id if tok.bos_token_id is not None else eos
        cfg.eos_token_id = eos
    if fam.encoder:
        cfg.pad_token_id = tok.pad_token_id
        model = (AutoModelForMaskedLM if fam.head else AutoModel).from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in pname.lower() and pname.endswith("weight"):
                p.normal_(0.0 if name.startswith("gemma") else 1.0, 0.1)  # Gemma applies 1 + w
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return str(path)


def reference_model(fam: Family, path: str):
    """A fresh Hugging Face model from ``path`` (eager attention, so attention probabilities are returned)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForMaskedLM if fam.encoder else AutoModelForCausalLM
    return cls.from_pretrained(path, attn_implementation="eager").eval()
