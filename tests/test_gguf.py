"""GGUF checkpoints: refused by name where transformers cannot read them, before any weight loads."""

import subprocess
import sys

import numpy as np
import pytest

from sae_lens_attn.gguf import gguf_info, is_gguf
from sae_lens_attn.models import load_model
from sae_lens_attn.spec import UnsupportedModelError

gguf = pytest.importorskip("gguf", reason="the gguf package (extra 'gguf') reads GGUF files")


def _write_gguf(path, arch: str) -> str:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_header_gives_architecture_and_quantization(tmp_path):
    info = gguf_info(_write_gguf(tmp_path / "m.gguf", "llama"))
    assert (info.architecture, info.file_type) == ("llama", "MOSTLY_Q8_0")
    assert info.describe(__import__("torch").float32) == "gguf m.gguf (llama, Q8_0, dequantized to float32)"
    assert is_gguf("a/B.GGUF") and not is_gguf("a/b")


def test_unsupported_architecture_is_named(tmp_path):
    path = _write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(UnsupportedModelError, match=r"GGUF architecture 'rwkv6' cannot be read by this transformers "
                                                    r"\(it reads llama, .*convert the model"):
        load_model(path)


def test_not_a_gguf_and_missing_files_are_named(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("not gguf at all")
    with pytest.raises(ValueError, match=r"fake.gguf is not a readable GGUF file"):
        load_model(fake)
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*missing.gguf does not exist"):
        load_model(tmp_path / "missing.gguf")


def test_cli_refuses_an_unsupported_gguf_in_one_line(tmp_path):
    path = _write_gguf(tmp_path / "mamba2.gguf", "mamba2")
    r = subprocess.run([sys.executable, "-m", "sae_lens_attn.frontends.cli", "train", "--model", path, "--out-dir",
                        str(tmp_path / "run"), "--progress", "false"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "GGUF architecture 'mamba2' cannot be read" in r.stderr
