"""Shared fixtures: tiny random Hugging Face models made on the fly, and the embedded default model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles, and by opposing end them. "
)


def make_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def random_rows(model, rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """[rows, n] seeded random token ids (never 0) with BOS at position 0."""
    t = torch.randint(1, model.cfg.d_vocab, (rows, n), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = model.tokenizer.bos_token_id
    return t


def make_tiny_model(path, arch: str = "gpt_neox", seed: int = 0) -> str:
    """A random 2-layer model in Hugging Face format: the same files a hub download gives."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    tok = make_tokenizer()
    tok.save_pretrained(path)
    if arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5, use_parallel_residual=False,
            bos_token_id=0, eos_token_id=0,
        )
        model = GPTNeoXForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-zero biases so tests see them (HF initialises them to 0)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_neox"), "gpt_neox")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_neox(tiny_neox_dir):
    from sae_lens_attn import load_model

    return load_model(tiny_neox_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    from sae_lens_attn import load_model

    return load_model(tiny_gpt2_dir, device="cpu")


@pytest.fixture(scope="session")
def default_model():
    from sae_lens_attn import load_model

    return load_model(device="cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
