"""LoRA tools (merge, sdxl merge, resize, extract, SVD merge, check) on tiny real models and real files.

Every tool is run through its ``main(argv)`` exactly as from the command line; outputs are read back
from disk. Equivalences are checked against sdtk's hooked LoRA (``networks.lora``) and dense math.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.models.families import Family
from library.models.loading import load_models
from networks import check_lora_weights, extract_lora_from_models, lora, lora_math, merge_lora, resize_lora
from networks import sdxl_merge_lora, svd_merge_lora
from networks.lora_tools_common import load_lora
from tests.trainer_fixtures import unet_out as _unet_out

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ helpers
def _te_arg(m):
    return m.text_encoders if m.family is Family.SDXL else m.text_encoders[0]


def _te_out(m, i: int = 0) -> torch.Tensor:
    ids = torch.arange(1, 78).unsqueeze(0) % 800
    with torch.no_grad():
        return m.text_encoders[i](ids, output_hidden_states=True).hidden_states[-2]


def _make_lora(m, path: Path, dim: int = 4, alpha: float = 2.0, conv_dim: int | None = 2, seed: int = 1,
               std: float = 0.2, dtype=None) -> lora.LoRANetwork:
    kw = {} if conv_dim is None else {"conv_dim": conv_dim, "conv_alpha": 1}
    net = lora.create_network(1.0, dim, alpha, m.vae, _te_arg(m), m.unet, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in net.all_loras:
            mod.lora_up.weight.copy_(torch.randn(mod.lora_up.weight.shape, generator=g) * std)
    net.save_weights(str(path), dtype, {"ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
                                        "ss_training_comment": "trained"})
    return net


def _run_fails(main, argv, capsys, out: Path | None = None) -> str:
    before = out.read_bytes() if out is not None and out.exists() else None
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error: "), err
    if out is not None:
        assert (out.read_bytes() if out.exists() else None) == before  # untouched / not created
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".sdtk-tmp-")]
    return err[0]


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    lf = load_lora(str(path))
    return {n: lora_math.delta_weight(f.up, f.down, f.scale) for n, f in lf.modules.items()}


@pytest.fixture(scope="module")
def sd1_file(tiny_model_dir):
    return tiny_model_dir("sd1", "single_file")


@pytest.fixture(scope="module")
def sdxl_file(tiny_model_dir):
    return tiny_model_dir("sdxl", "single_file")


# -------------------------------------------------------------------------- merge into a model
@pytest.mark.parametrize("family,fmt", [("sd1", "single_file"), ("sdxl", "single_file"), ("sd2", "diffusers")])
def test_merge_into_checkpoint_equals_hooked_lora(tiny_model_dir, tmp_path, family, fmt):
    base = str(tiny_model_dir(family, fmt))
    m = load_models(base, with_tokenizers=False)
    lora_path = tmp_path / "l.safetensors"
    net = _make_lora(m, lora_path)  # LoCon: 3x3 convs included
    out = tmp_path / "merged.safetensors"
    tool = sdxl_merge_lora if family == "sdxl" else merge_lora
    assert tool.main(["--sd_model", base, "--models", str(lora_path), "--ratios", "0.7", "--save_to", str(out)]) == 0

    net.set_multiplier(0.7)
    net.apply_to(_te_arg(m), m.unet)
    hooked_unet, hooked_te = _unet_out(m), [_te_out(m, i) for i in range(len(m.text_encoders))]
    merged = load_models(str(out), with_tokenizers=False)
    torch.testing.assert_close(_unet_out(merged), hooked_unet, rtol=1e-4, atol=1e-5)
    for i, want in enumerate(hooked_te):
        torch.testing.assert_close(_te_out(merged, i), want, rtol=1e-4, atol=1e-5)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.merged_from"] == f"{Path(base).stem}, l"
    assert meta["modelspec.title"] == "merged"


def test_merge_into_checkpoint_fp16_save_and_two_loras(sd1_file, tmp_path):
    m = load_models(str(sd1_file), with_tokenizers=False)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    na, nb = _make_lora(m, a, seed=1), _make_lora(m, b, dim=2, alpha=2, conv_dim=None, seed=2)
    out = tmp_path / "m.safetensors"
    assert merge_lora.main(["--sd_model", str(sd1_file), "--models", str(a), str(b), "--ratios", "1", "-0.5",
                            "--save_to", str(out), "--save_precision", "fp16"]) == 0
    assert all(t.dtype == torch.float16 for t in load_file(out).values() if t.is_floating_point())
    na.apply_to(_te_arg(m), m.unet)
    nb.set_multiplier(-0.5)
    nb.apply_to(_te_arg(m), m.unet)
    merged = load_models(str(out), with_tokenizers=False)
    torch.testing.assert_close(_unet_out(merged), _unet_out(m), rtol=2e-2, atol=2e-3)


def test_merge_casts_the_model_in_place_before_saving(sd1_file, tmp_path, monkeypatch):
    """--save_precision: the merged model is converted tensor by tensor before saving, not copied whole next
    to the float32 model (full-size SDXL: 14 GB + 7 GB, killed on a 24 GB machine); same file as before."""
    from library.models import saving

    m = load_models(str(sd1_file), with_tokenizers=False)
    _make_lora(m, tmp_path / "a.safetensors", seed=3)
    seen: list[set] = []
    real = saving.save_single_file

    def spy(model, path, *args, **kwargs):
        seen.append({t.dtype for c in [model.unet, model.vae, *model.text_encoders] for t in c.state_dict().values()
                     if t.is_floating_point()})
        return real(model, path, *args, **kwargs)

    monkeypatch.setattr(saving, "save_single_file", spy)
    out = tmp_path / "m.safetensors"
    assert merge_lora.main(["--sd_model", str(sd1_file), "--models", str(tmp_path / "a.safetensors"), "--ratios", "1",
                            "--save_to", str(out), "--save_precision", "fp16"]) == 0
    assert seen == [{torch.float16}]
    # merged in float32, then rounded once: base + delta, to fp16
    deltas, base = _deltas(tmp_path / "a.safetensors"), m.unet.state_dict()
    merged = load_models(str(out), with_tokenizers=False)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    want = (base[key].float() + deltas["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]).half()
    assert torch.equal(merged.unet.state_dict()[key].half(), want)


# --------------------------------------------------------------------------- LoRA + LoRA merge
def test_merge_loras_into_lora_kohya_formula(sd1_file, tmp_path):
    m = load_models(str(sd1_file), with_tokenizers=False)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _make_lora(m, a, alpha=2, seed=1)
    _make_lora(m, b, alpha=8, seed=2)
    out = tmp_path / "ab.safetensors"
    assert merge_lora.main(["--models", str(a), str(b), "--ratios", "0.5", "-1", "--save_to", str(out)]) == 0
    fa, fb, fo = load_file(a), load_file(b), load_file(out)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    s = (8 / 2) ** 0.5 * -1  # sqrt(alpha_b / alpha_first) * ratio; lora_up uses |s|
    torch.testing.assert_close(fo[f"{name}.lora_up.weight"], fa[f"{name}.lora_up.weight"] * 0.5 + fb[f"{name}.lora_up.weight"] * abs(s))
    torch.testing.assert_close(fo[f"{name}.lora_down.weight"], fa[f"{name}.lora_down.weight"] * 0.5 + fb[f"{name}.lora_down.weight"] * s)
    assert fo[f"{name}.alpha"].item() == 2.0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "Dynamic" and meta["modelspec.merged_from"] == "a, b"  # conv rank 2, linear 4
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_merge_concat_and_shuffle(sd1_file, tmp_path):
    m = load_models(str(sd1_file), with_tokenizers=False)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _make_lora(m, a, dim=4, alpha=4, conv_dim=None, seed=1)
    _make_lora(m, b, dim=2, alpha=2, conv_dim=None, seed=2)
    cat, shuf = tmp_path / "cat.safetensors", tmp_path / "shuf.safetensors"
    args = ["--models", str(a), str(b), "--ratios", "1", "1", "--concat"]
    assert merge_lora.main(args + ["--save_to", str(cat)]) == 0
    assert merge_lora.main(args + ["--shuffle", "--save_to", str(shuf)]) == 0
    lc, ls_ = load_lora(str(cat)), load_lora(str(shuf))
    assert {f.rank for f in lc.modules.values()} == {6}
    for name, f in lc.modules.items():
        # kohya: alpha of the first file over the summed rank, so equal ratios of 1 average-scale the deltas
        assert f.alpha == 4.0
        torch.testing.assert_close(lora_math.delta_weight(f.up, f.down, 1.0),
                                   lora_math.delta_weight(ls_.modules[name].up, ls_.modules[name].down, 1.0))
    assert merge_lora.main(["--models", str(a), str(b), "--ratios", "1", "1", "--save_to", str(tmp_path / "x.safetensors")]) == 1


# -------------------------------------------------------------------------------------- resize
def test_resize_to_full_rank_reproduces_delta_and_updates_metadata(sd1_file, tmp_path):
    m = load_models(str(sd1_file), with_tokenizers=False)
    src, out = tmp_path / "l.safetensors", tmp_path / "r.safetensors"
    _make_lora(m, src, dim=4, alpha=2, conv_dim=2)
    assert resize_lora.main(["--model", str(src), "--save_to", str(out), "--new_rank", "4", "--new_conv_rank", "2"]) == 0
    want, got = _deltas(src), _deltas(out)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_training_comment"] == "dimension is resized from 4 to 4 (conv: 2); trained"
    from library.models.hashes import safetensors_file_hashes

    assert meta["sshs_model_hash"] == safetensors_file_hashes(out)[0]


def test_resize_lower_rank_is_best_approximation_and_dynamic(sd1_file, tmp_path, capsys):
    m = load_models(str(sd1_file), with_tokenizers=False)
    src, out = tmp_path / "l.safetensors", tmp_path / "r.safetensors"
    _make_lora(m, src, dim=4, alpha=2, conv_dim=None)
    assert resize_lora.main(["--model", str(src), "--save_to", str(out), "--new_rank", "2", "--verbose", "--save_precision", "fp16"]) == 0
    printed = capsys.readouterr().out
    assert "fro retained:" in printed and "Average Frobenius norm retention" in printed
    src_d, out_lf = _deltas(src), load_lora(str(out))
    for k, d in src_d.items():
        f = out_lf.modules[k]
        assert f.rank == 2 and f.up.dtype == torch.float32  # load_lora reads as float32
        s = torch.linalg.svdvals(d.reshape(d.shape[0], -1))
        err = torch.linalg.norm((lora_math.delta_weight(f.up, f.down, f.scale) - d).reshape(d.shape[0], -1))
        assert abs(err - s[2:].norm()) <= 2e-3 * s.norm() + 1e-5  # Eckart-Young optimum (fp16 file)
    assert all(t.dtype == torch.float16 for t in load_file(out).values())

    # a spectrum with a known shape: sv_ratio keeps values above s0/param
    dyn = tmp_path / "d.safetensors"
    assert resize_lora.main(["--model", str(src), "--save_to", str(dyn), "--new_rank", "4",
                             "--dynamic_method", "sv_fro", "--dynamic_param", "0.999999"]) == 0
    lf = load_lora(str(dyn))
    assert {f.rank for f in lf.modules.values()} <= {3, 4}
    with safe_open(str(dyn), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "Dynamic"


def test_pick_rank_methods():
    s = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.0])
    assert lora_math.pick_rank(s, 8, "sv_ratio", 4.0) == 2  # values > 2.5
    assert lora_math.pick_rank(s, 8, "sv_cumulative", 0.9) == 2  # 15/16.5 = 0.909
    assert lora_math.pick_rank(s, 8, "sv_fro", 0.99) == 2  # sqrt(125/126.25) = 0.995
    assert lora_math.pick_rank(s, 1, "sv_fro", 0.99) == 1  # capped
    assert lora_math.pick_rank(torch.zeros(3), 4) == 1  # zero matrix keeps rank 1 (kohya)


def test_svd_dense_randomized_path_recovers_low_rank():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1100, 6, generator=g), torch.randn(6, 1200, generator=g)
    u, s, vh = lora_math.svd_dense(a @ b, 6)
    x, y = lora_math.truncate(u, s, vh, 6)
    torch.testing.assert_close(x @ y, a @ b, rtol=1e-3, atol=1e-3)
    assert lora_math.quantile(torch.arange(11.0), 0.95) == torch.quantile(torch.arange(11.0), 0.95)


# ------------------------------------------------------------------------------------- extract
@pytest.mark.parametrize("family,fmt", [("sd1", "single_file"), ("sdxl", "single_file"), ("sd2", "single_file"), ("sd1", "diffusers")])
def test_extract_recovers_known_low_rank_delta(tiny_model_dir, tmp_path, family, fmt):
    base = str(tiny_model_dir(family, fmt))
    m = load_models(base, with_tokenizers=False)
    known = tmp_path / "known.safetensors"
    _make_lora(m, known, dim=2, alpha=2, conv_dim=2, std=0.5)
    tuned = tmp_path / "tuned.safetensors"
    tool = sdxl_merge_lora if family == "sdxl" else merge_lora
    assert tool.main(["--sd_model", base, "--models", str(known), "--ratios", "1", "--save_to", str(tuned)]) == 0
    out = tmp_path / "extracted.safetensors"
    argv = ["--model_org", base, "--model_tuned", str(tuned), "--save_to", str(out), "--dim", "2", "--conv_dim", "2",
            "--clamp_quantile", "1.0"] + (["--sdxl"] if family == "sdxl" else [])
    assert extract_lora_from_models.main(argv) == 0
    want, got = _deltas(known), _deltas(out)
    assert set(got) == set(want)  # same kohya names (incl. text encoders: their delta > --min_diff)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-4)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "2.0"}'
    assert meta["ss_base_model_version"].startswith({"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base"}[family])


def test_extract_skips_same_text_encoder_and_clamps(sd1_file, tmp_path):
    m = load_models(str(sd1_file), with_tokenizers=False)
    with torch.no_grad():
        for p in m.unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    from library.models.saving import save_single_file

    tuned = tmp_path / "tuned.safetensors"
    save_single_file(m, tuned, torch.float16)
    out = tmp_path / "x.safetensors"
    assert extract_lora_from_models.main(["--model_org", str(sd1_file), "--model_tuned", str(tuned), "--save_to", str(out),
                                          "--dim", "3", "--save_precision", "bf16", "--load_precision", "fp16"]) == 0
    sd = load_file(out)
    assert not any(k.startswith("lora_te_") for k in sd) and any(k.startswith("lora_unet_") for k in sd)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    lf = load_lora(str(out))
    assert all(f.rank == 3 and not f.is_conv3x3 for f in lf.modules.values())  # no --conv_dim: no 3x3 convs


# ----------------------------------------------------------------------------------- svd merge
def test_svd_merge_of_different_ranks(sd1_file, tmp_path):
    m = load_models(str(sd1_file), with_tokenizers=False)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _make_lora(m, a, dim=4, alpha=2, conv_dim=2, seed=1)
    _make_lora(m, b, dim=2, alpha=1, conv_dim=None, seed=2)
    la, lb = load_lora(str(a)), load_lora(str(b))
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"
    parts = [(la.modules[name], 0.7), (lb.modules[name], -0.4)]
    exact = lora_math.delta_weight(la.modules[name].up, la.modules[name].down, 0.7 * la.modules[name].scale) \
        + lora_math.delta_weight(lb.modules[name].up, lb.modules[name].down, -0.4 * lb.modules[name].scale)
    f = svd_merge_lora.merge_module(parts, 6, "cpu", clamp_q=None)
    torch.testing.assert_close(lora_math.delta_weight(f.up, f.down, f.scale), exact, rtol=1e-4, atol=1e-6)

    out = tmp_path / "s.safetensors"
    assert svd_merge_lora.main(["--models", str(a), str(b), "--ratios", "0.7", "-0.4", "--new_rank", "6",
                                "--new_conv_rank", "3", "--save_to", str(out), "--save_precision", "fp16"]) == 0
    lo = load_lora(str(out))
    assert {f.rank for n, f in lo.modules.items() if f.is_conv3x3} == {3}
    got = lo.modules[name]
    assert got.rank == 6 and got.alpha == 6.0
    rel = torch.linalg.norm(lora_math.delta_weight(got.up, got.down, got.scale) - exact) / torch.linalg.norm(exact)
    assert rel < 0.1  # kohya's 0.99-quantile clamp changes the largest 1% of values
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_dim"] == "6" and meta["modelspec.merged_from"] == "a, b"


# --------------------------------------------------------------------------------------- check
def test_check_lora_weights_reports_and_fails_on_nan(sd1_file, tmp_path, capsys):
    m = load_models(str(sd1_file), with_tokenizers=False)
    path = tmp_path / "l.safetensors"
    _make_lora(m, path, conv_dim=None)
    assert check_lora_weights.main([str(path), "-s"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("number of LoRA modules: ")
    assert "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight,(4-64-1-1)," in out
    assert "summary:" in out and "0 tensors with NaN/inf" in out
    sd = load_file(path)
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[key][0, 0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    assert "NaN or inf" in _run_fails(check_lora_weights.main, [bad], capsys)


# --------------------------------------------------------------------------- kohya-written files
def test_kohya_written_files_sd1_and_sdxl(sd1_file, sdxl_file, tmp_path):
    """Files built by hand with kohya's names (fp16, a module without alpha): merged onto the right modules."""
    g = torch.Generator().manual_seed(5)
    cases = [
        (sd1_file, merge_lora, "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
         "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
         "lora_te_text_model_encoder_layers_0_mlp_fc1", 0, "encoder.layers.0.mlp.fc1"),
        (sdxl_file, sdxl_merge_lora, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
         "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
         "lora_te2_text_model_encoder_layers_1_self_attn_v_proj", 1, "text_model.encoder.layers.1.self_attn.v_proj"),
    ]
    for base, tool, unet_name, unet_path, te_name, te_i, te_path in cases:
        m = load_models(str(base), with_tokenizers=False)
        w = m.unet.get_submodule(unet_path).weight
        te_w = m.text_encoders[te_i].get_submodule(te_path).weight
        sd = {
            f"{unet_name}.lora_down.weight": torch.randn(2, w.shape[1], generator=g).half(),
            f"{unet_name}.lora_up.weight": torch.randn(w.shape[0], 2, generator=g).half(),
            f"{unet_name}.alpha": torch.tensor(1.0).half(),
            f"{te_name}.lora_down.weight": torch.randn(2, te_w.shape[1], generator=g).half(),
            f"{te_name}.lora_up.weight": torch.randn(te_w.shape[0], 2, generator=g).half(),  # no alpha: = rank
        }
        path = tmp_path / f"kohya_{m.family.value}.safetensors"
        save_file(sd, path, {"ss_network_dim": "2", "ss_base_model_version": "sdxl_base_v1-0" if m.family is Family.SDXL else "sd_v1"})
        out = tmp_path / f"merged_{m.family.value}.safetensors"
        assert tool.main(["--sd_model", str(base), "--models", str(path), "--ratios", "1", "--save_to", str(out)]) == 0
        merged = load_models(str(out), with_tokenizers=False)
        want = w + sd[f"{unet_name}.lora_up.weight"].float() @ sd[f"{unet_name}.lora_down.weight"].float() * 0.5
        torch.testing.assert_close(merged.unet.get_submodule(unet_path).weight, want, rtol=1e-4, atol=1e-5)
        want_te = te_w + sd[f"{te_name}.lora_up.weight"].float() @ sd[f"{te_name}.lora_down.weight"].float()
        torch.testing.assert_close(merged.text_encoders[te_i].get_submodule(te_path).weight, want_te, rtol=1e-4, atol=1e-5)
        resized = tmp_path / f"resized_{m.family.value}.safetensors"
        assert resize_lora.main(["--model", str(path), "--save_to", str(resized), "--new_rank", "2"]) == 0
        assert check_lora_weights.main([str(path)]) == 0


# ------------------------------------------------------------------------------------ bad input
def test_family_mismatch_errors_name_the_right_tool(sd1_file, sdxl_file, tmp_path, capsys):
    sdxl_m = load_models(str(sdxl_file), with_tokenizers=False)
    sd1_m = load_models(str(sd1_file), with_tokenizers=False)
    xl_lora, sd1_lora = tmp_path / "xl.safetensors", tmp_path / "sd1.safetensors"
    _make_lora(sdxl_m, xl_lora, conv_dim=None)
    _make_lora(sd1_m, sd1_lora, conv_dim=None)
    out = tmp_path / "out.safetensors"
    msg = _run_fails(merge_lora.main, ["--sd_model", sd1_file, "--models", xl_lora, "--ratios", "1", "--save_to", out], capsys, out)
    assert "SDXL LoRA" in msg and "sdxl_merge_lora.py" in msg
    msg = _run_fails(merge_lora.main, ["--sd_model", sdxl_file, "--models", sd1_lora, "--ratios", "1", "--save_to", out], capsys, out)
    assert "SDXL model" in msg and "sdxl_merge_lora.py" in msg
    msg = _run_fails(sdxl_merge_lora.main, ["--models", sd1_lora, "--ratios", "1", "--save_to", out], capsys, out)
    assert "networks/merge_lora.py" in msg
    msg = _run_fails(svd_merge_lora.main, ["--models", sd1_lora, xl_lora, "--ratios", "1", "1", "--save_to", out], capsys, out)
    assert "different model families" in msg
    msg = _run_fails(extract_lora_from_models.main, ["--model_org", sd1_file, "--model_tuned", sdxl_file, "--save_to", out], capsys, out)
    assert "one family" in msg


def test_bad_input_one_line_and_no_partial_file(sd1_file, tmp_path, capsys):
    m = load_models(str(sd1_file), with_tokenizers=False)
    good = tmp_path / "good.safetensors"
    _make_lora(m, good, dim=4, conv_dim=None)
    out = tmp_path / "out.safetensors"
    msg = _run_fails(merge_lora.main, ["--models", good, good, "--ratios", "1", "--save_to", out], capsys, out)
    assert "2 --models but 1 --ratios" in msg
    msg = _run_fails(resize_lora.main, ["--model", good, "--new_rank", "8", "--save_to", out], capsys, out)
    assert "larger than the rank" in msg
    msg = _run_fails(resize_lora.main, ["--model", good, "--dynamic_method", "sv_fro", "--save_to", out], capsys, out)
    assert "--dynamic_param" in msg
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    for bad in (junk, truncated):
        for tool, argv in ((resize_lora.main, ["--model", bad, "--save_to", out]),
                           (merge_lora.main, ["--models", bad, "--ratios", "1", "--save_to", out]),
                           (svd_merge_lora.main, ["--models", bad, "--ratios", "1", "--save_to", out]),
                           (check_lora_weights.main, [bad])):
            assert str(bad) in _run_fails(tool, argv, capsys, out)
    msg = _run_fails(sdxl_merge_lora.main, ["--models", good, "--ratios", "1", "--lbws", "[1, 2]", "--save_to", out], capsys, out)
    assert "--lbws" in msg and "12, 17, 20, 26" in msg


def test_existing_output_is_replaced_atomically(sd1_file, tmp_path, capsys):
    m = load_models(str(sd1_file), with_tokenizers=False)
    src = tmp_path / "l.safetensors"
    _make_lora(m, src, dim=4, conv_dim=None)
    out = tmp_path / "r.safetensors"
    out.write_bytes(b"old")
    # a failing run leaves the old file as it was
    _run_fails(resize_lora.main, ["--model", tmp_path / "missing.safetensors", "--save_to", out], capsys, out)
    assert out.read_bytes() == b"old"
    assert resize_lora.main(["--model", str(src), "--save_to", str(out), "--new_rank", "2"]) == 0  # kohya overwrites
    assert load_lora(str(out)).modules


def test_tools_run_as_files_and_modules(sd1_file, tmp_path):
    m = load_models(str(sd1_file), with_tokenizers=False)
    src = tmp_path / "l.safetensors"
    _make_lora(m, src, dim=2, conv_dim=None)
    env = dict(os.environ, PYTHONPATH="")
    r = subprocess.run([sys.executable, "networks/check_lora_weights.py", str(src)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "summary:" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "networks.resize_lora", "--model", str(src), "--new_rank", "1",
                        "--save_to", str(tmp_path / "r.pt")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sd = torch.load(tmp_path / "r.pt", weights_only=True)
    assert all(v.shape[0] == 1 for k, v in sd.items() if k.endswith("lora_down.weight"))


# --------------------------------------------------------------------------- layer-block weights
def test_lbw_block_indices_follow_kohya():
    from networks.lora_tools_common import lbw_block_index, parse_lbws

    assert lbw_block_index("lora_te_text_model_encoder_layers_0_mlp_fc1", False) == 0
    assert lbw_block_index("lora_unet_down_blocks_0_attentions_1_proj_in", False) == 3  # IN02
    assert lbw_block_index("lora_unet_down_blocks_1_downsamplers_0_conv", False) == 7  # IN06
    assert lbw_block_index("lora_unet_mid_block_attentions_0_proj_in", False) == 13
    assert lbw_block_index("lora_unet_up_blocks_3_attentions_2_proj_out", False) == 25  # OUT11
    assert lbw_block_index("lora_unet_input_blocks_4_1_proj_in", True) == 5  # IN04
    assert lbw_block_index("lora_unet_output_blocks_8_1_proj_out", True) == 22
    maps, sdxl = parse_lbws(["[" + ",".join(["0.5"] * 12) + "]"], 1)
    assert sdxl and sorted(maps[0]) == [0, 5, 6, 8, 9, 13, 14, 15, 16, 17, 18, 19]


def test_sdxl_merge_with_lbws_zeroes_chosen_blocks(sdxl_file, tmp_path):
    m = load_models(str(sdxl_file), with_tokenizers=False)
    lp = tmp_path / "xl.safetensors"
    _make_lora(m, lp, conv_dim=None)
    out = tmp_path / "m.safetensors"
    weights = [1.0] * 12
    weights[1] = 0.0  # IN04 = input_blocks.4 (down_blocks.1.attentions.0): not merged
    assert sdxl_merge_lora.main(["--sd_model", str(sdxl_file), "--models", str(lp), "--ratios", "1",
                                 "--lbws", str(weights), "--save_to", str(out)]) == 0
    merged = load_models(str(out), with_tokenizers=False)
    off = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    on = "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q"  # input_blocks.5 = IN05, weight 1
    assert torch.equal(merged.unet.get_submodule(off).weight, m.unet.get_submodule(off).weight)
    assert not torch.equal(merged.unet.get_submodule(on).weight, m.unet.get_submodule(on).weight)
