"""The shipped quickstart configs run through train_network.py as they are (shortened to one epoch)."""

from __future__ import annotations

import pytest
from safetensors import safe_open

pytestmark = pytest.mark.integration


def test_quickstart_config_trains_a_loadable_lora(tiny_model_dir, repo_root, tmp_path, monkeypatch, capsys):
    import train_network

    monkeypatch.chdir(repo_root)  # the configs use paths relative to the repository root
    out = tmp_path / "lora"
    rc = train_network.main([
        "--config_file", "examples/quickstart/config.toml",
        "--pretrained_model_name_or_path", str(tiny_model_dir("sd1", "diffusers")),
        "--output_dir", str(out), "--max_train_epochs", "1", "--sample_every_n_epochs", "1",
    ])
    assert rc == 0
    lora = out / "quickstart_lora.safetensors"
    printed = capsys.readouterr().out
    assert str(lora) in printed and "sample" in printed
    with safe_open(str(lora), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert len(list((out / "sample").glob("*.png"))) == 2  # one per prompt in prompts.txt
