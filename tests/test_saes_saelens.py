"""SAELens 6.54 itself loads the files we write, for every architecture, and computes our encodings.

SAELens pins transformer-lens < 4, so it runs in its own venv (``bash benchmarks/setup_peers.sh saelens``)
as a subprocess; without that venv the test is skipped.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_lens_attn.sae import SAE, SAEConfig

ROOT = Path(__file__).resolve().parents[1]
LENS_PY = ROOT / "benchmarks" / ".venvs" / "saelens" / "bin" / "python"
FIXTURES = Path(__file__).parent / "fixtures" / "saelens"

_SCRIPT = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
report = {}
for d in sys.argv[1:]:
    lens = SAE.load_from_disk(d)
    x = load_file(d + "/input.safetensors")["x"]
    with torch.no_grad():
        save_file({"encode": lens.encode(x).contiguous(), "forward": lens(x).contiguous()}, d + "/lens.safetensors")
    report[d] = {"class": type(lens).__name__, "hook_name": lens.cfg.metadata.hook_name}
print(json.dumps(report))
"""

#: SAELens' class for each of our architectures (BatchTopK runs as JumpReLU at inference, as SAELens saves it).
LENS_CLASS = {"topk": "TopKSAE", "batchtopk": "JumpReLUSAE", "jumprelu": "JumpReLUSAE", "standard": "StandardSAE",
              "gated": "GatedSAE"}


def _ours(tmp_path: Path) -> dict[str, tuple[SAE, torch.Tensor]]:
    saes = {}
    for d in sorted(p for p in FIXTURES.iterdir() if (p / "cfg.json").exists()):
        saes[d.name] = (SAE.load(d), load_file(str(d / "expected.safetensors"))["x"])
    g = SAE(SAEConfig(d_in=32, d_sae=40, k=6, selection="gsae", reshape_activations="hook_z",
                      metadata={"hook_name": "blocks.1.attn.hook_z", "model_name": "m"}), init=False)
    g.reset_parameters(torch.Generator().manual_seed(3))
    with torch.no_grad():
        g.b_enc.normal_(generator=torch.Generator().manual_seed(4))
    saes["ours_gsae"] = (g, torch.randn(2, 5, 4, 8, generator=torch.Generator().manual_seed(5)))
    return saes


@pytest.mark.slow
@pytest.mark.skipif(not LENS_PY.exists(), reason="no SAELens venv: run `bash benchmarks/setup_peers.sh saelens`")
def test_saelens_loads_our_files_of_every_architecture(tmp_path):
    saes = _ours(tmp_path)
    dirs = []
    for name, (sae, x) in saes.items():
        d = sae.save(tmp_path / name)
        save_file({"x": x.contiguous()}, str(d / "input.safetensors"))
        dirs.append(str(d))
    proc = subprocess.run([str(LENS_PY), "-c", _SCRIPT, *dirs], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (sae, x) in saes.items():
        d = str(tmp_path / name)
        assert report[d]["class"] == LENS_CLASS[sae.architecture], name
        assert report[d]["hook_name"] == sae.cfg.metadata["hook_name"], name
        lens = load_file(d + "/lens.safetensors")
        with torch.no_grad():
            ours_f, ours_out = sae.encode(x), sae(x)
        assert float((ours_f - lens["encode"]).abs().max()) <= 1e-5, name
        assert float((ours_out - lens["forward"]).abs().max()) <= 1e-5, name
        assert (ours_f > 0).any(), name
