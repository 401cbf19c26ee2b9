"""One tokenization policy from the tokenizer's own special tokens, used by packing, harvesting, evals and
analysis; the loading side effects a researcher would trip over (logger level, newly initialised weights)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site, load_model
from sae_lens_attn.activations import harvest
from sae_lens_attn.data import token_rows
from sae_lens_attn.models import token_policy
from sae_lens_attn.objective import MASK_SHARE, loss_input, mask_positions
from sae_lens_attn.spec import model_spec
from sae_lens_attn.tokens import _WARNED, TokenPolicy

from .families import build


@pytest.fixture(scope="module")
def fam_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_families")
    return {name: build(name, root / name) for name in ("bert", "bert_no_head", "qwen2")}


@pytest.fixture(scope="module")
def bert(fam_dirs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(fam_dirs["bert"], device="cpu")


def test_bert_rows_are_cls_text_sep_and_unk_is_text(bert, tmp_path):
    policy = token_policy(bert)
    tok = bert.tokenizer
    assert policy.rule == "cls-sep" and policy.start == tok.cls_token_id and policy.end == tok.sep_token_id
    unk = tok.unk_token_id
    assert policy.start != unk and unk not in policy.special  # the bridge's BOS fallback is [UNK]; not ours
    f = tmp_path / "t.txt"
    f.write_text("to be or not to be \u2603 that is the question " * 30)  # the snowman is out of vocabulary
    rows = token_rows(f, tok, 12, policy)
    assert (rows[:, 0] == policy.start).all() and (rows[:, -1] == policy.end).all()
    assert (rows[:, 1:-1] != policy.start).all()
    assert (rows == unk).any(), "the test text must contain [UNK] tokens"
    h = harvest(bert, rows[:4], [Site(0)])
    assert not h.mask[:, 0].any() and not h.mask[:, -1].any()
    assert h.mask[rows[:4] == unk].all(), "real [UNK] tokens are text, never dropped as BOS"


def test_encoder_loss_masks_a_share_of_text_positions(bert):
    spec = model_spec(bert)
    g = torch.Generator().manual_seed(0)
    toks = torch.stack([torch.tensor(spec.tokens.wrap(r.tolist())) for r in torch.randint(5, 60, (3, 20), generator=g)])
    where = mask_positions(toks, spec)
    n_text = 20
    assert (where.sum(1) == int(-(-n_text * MASK_SHARE // 1))).all()  # ceil(15% of 20) = 3 per row
    assert not where[:, 0].any() and not where[:, -1].any()  # [CLS] / [SEP] never masked
    inp = loss_input(toks, spec)
    assert (inp.tokens[where] == spec.tokens.mask).all() and (inp.tokens[~where] == toks[~where]).all()
    assert (inp.targets[where] == toks[where]).all() and (inp.targets[~where] == -100).all()
    assert torch.equal(where, mask_positions(toks, spec)), "the masking is seeded"


def test_qwen2_without_bos_uses_eos_and_says_so(fam_dirs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(fam_dirs["qwen2"], device="cpu")
    policy = token_policy(model)
    assert model.tokenizer.bos_token_id is not None  # the bridge filled it in ...
    assert policy.rule == "eos-as-bos" and policy.start == model.tokenizer.eos_token_id  # ... the policy says why


def test_newly_initialised_head_is_reported_and_logger_left_alone(fam_dirs):
    tf = logging.getLogger("transformers")
    old = tf.level
    try:
        tf.setLevel(logging.WARNING)
        with pytest.warns(UserWarning, match=r"newly initialised at load \(cls\.predictions"):
            model = load_model(fam_dirs["bert_no_head"], device="cpu")
        assert tf.level == logging.WARNING, "load_model must leave the transformers logger as it found it"
        tf.setLevel(logging.NOTSET)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_model(fam_dirs["bert"], device="cpu")
        assert tf.level == logging.NOTSET
    finally:
        tf.setLevel(old)
    spec = model_spec(model)
    assert spec.new_weights and all(k.startswith("cls.predictions") for k in spec.new_weights)
    assert "newly initialised" in spec.lm_refusal


def test_text_is_tokenized_by_the_policy_and_bare_tokens_warn(default_model):
    from sae_lens_attn.analysis import dfa

    model = default_model
    sae = SAE(SAEConfig(d_in=256, d_sae=64, k=4, metadata={"hook_name": "blocks.1.attn.hook_z", "prepend_bos": True}))
    text = " To be, or not to be"
    bare = model.to_tokens(text)  # GPT-NeoX: TransformerBridge prepends no BOS (default_prepend_bos False)
    start = token_policy(model).start
    assert bare[0, 0] != start
    _WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_text = dfa(model, sae, text, [1, 2])
        assert not caught
        dfa(model, sae, bare, [1, 2])
        dfa(model, sae, bare, [1, 2])
    msgs = [str(w.message) for w in caught if "do not start with the token" in str(w.message)]
    assert len(msgs) == 1, "warn once"
    with_bos = torch.tensor([token_policy(model).encode(model.tokenizer, text)])
    assert with_bos[0, 0] == start
    assert torch.equal(from_text.pre, dfa(model, sae, with_bos, [1, 2]).pre)


def test_legacy_bos_id_still_packs_like_before(tiny_neox, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("word " * 200)
    a = token_rows(f, tiny_neox.tokenizer, 16, 0)
    b = token_rows(f, tiny_neox.tokenizer, 16, TokenPolicy("bos", 0, None, 0, None, None, frozenset({0})))
    assert torch.equal(a, b) and (a[:, 0] == 0).all()
