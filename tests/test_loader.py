"""Model resolution: alias (GGUF in a PyPI wheel, converted once), GGUF file, local HF directory."""
import json
import shutil

import pytest
import torch

from qcfuse.cli import main
from qcfuse.errors import QcfuseError
from qcfuse.model.loader import load_model, qcfuse_home, resolve_model_dir


def test_alias_is_cached_as_safetensors(smollm2):
    directory = resolve_model_dir("smollm2-135m")
    assert (directory / "model.safetensors").is_file() and (directory / "qcfuse-converted.json").is_file()
    cfg = json.loads((directory / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and "quantization_config" not in cfg
    hf = smollm2.hf
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()   # tied, as in the GGUF


def test_gguf_file_converts_to_the_same_weights(smollm2, tmp_path, monkeypatch):
    gguf = qcfuse_home() / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.is_file()
    monkeypatch.setenv("QCFUSE_HOME", str(tmp_path / "home"))
    direct = load_model(str(gguf), quiet=True)
    assert str(tmp_path) in str(resolve_model_dir(str(gguf)))
    mine, theirs = smollm2.hf.state_dict(), direct.hf.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


def test_local_hf_directory(smollm2, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=smollm2.tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    smollm2.tokenizer.save_pretrained(tmp_path / "tiny")
    doc = tmp_path / "d.txt"
    doc.write_text("A tiny document.")
    rc = main(["generate", "--model", str(tmp_path / "tiny"), "-d", str(doc), "-q", "What?", "--json",
               "--max_new_tokens", "3"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["new_tokens"] >= 1


def test_bad_model_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(QcfuseError, match="config.json"):
        resolve_model_dir(str(tmp_path / "empty"))
    shutil.copy(__file__, tmp_path / "fake.gguf")
    with pytest.raises(QcfuseError, match="could not load GGUF"):
        load_model(str(tmp_path / "fake.gguf"), quiet=True)


def test_converted_directory_is_its_alias(smollm2):
    """vLLM serves the converted directory; qcfuse loading that path must get the alias's QCFuse profile too."""
    from qcfuse.model.loader import alias_of
    directory = resolve_model_dir("smollm2-135m")
    assert alias_of(str(directory), directory) == alias_of("smollm2-135m", directory) == "smollm2-135m"
    assert load_model(str(directory), quiet=True).transformer.critical_layers == smollm2.transformer.critical_layers
    assert smollm2.transformer.critical_layers
