"""The training-target contract, run against every target on the tiny SD1 model: trainable
parameters in the optimizer groups, exact state round trip, resume signature, output naming."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.integration


def _network(model_dir, out):
    from library.config.args import parse_args
    from library.training.trainer import NetworkTrainer

    args = parse_args("train_network", ["--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out),
                                        "--network_module", "networks.lora", "--network_dim", "4"])
    return NetworkTrainer(args)


def _dreambooth(model_dir, out):
    import train_db

    from library.config.args import parse_args

    args = parse_args("train_db", ["--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out),
                                   "--learning_rate_te", "1e-5", "--stop_text_encoder_training", "3",
                                   "--save_model_as", "diffusers"])
    return train_db.DreamBoothTrainer(args)


def _sdxl(model_dir, out):
    import sdxl_train

    from library.config.args import parse_args

    lrs = ",".join(["0"] + ["1e-5"] * 22)
    args = parse_args("sdxl_train", ["--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out),
                                     "--train_text_encoder", "--learning_rate_te1", "0", "--block_lr", lrs])
    return sdxl_train.SdxlTrainer(args)


def _embeddings(model_dir, out):
    import sdxl_train_textual_inversion
    import train_textual_inversion

    from library.config.args import parse_args

    sdxl = "sdxl" in str(model_dir)
    script = sdxl_train_textual_inversion if sdxl else train_textual_inversion
    args = parse_args(script.SCRIPT, ["--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out),
                                      "--token_string", "zq", "--num_vectors_per_token", "2"])
    return (script.SdxlTextualInversionTrainer if sdxl else script.TextualInversionTrainer)(args)


def _xti(model_dir, out):
    import train_textual_inversion_XTI as script

    from library.config.args import parse_args

    args = parse_args(script.SCRIPT, ["--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out),
                                      "--token_string", "zq", "--num_vectors_per_token", "2"])
    return script.XTITrainer(args)


@pytest.mark.parametrize("kind,family", [("network", "sd1"), ("dreambooth", "sd1"), ("sdxl", "sdxl"),
                                         ("embeddings", "sd1"), ("embeddings", "sdxl"), ("xti", "sd1")])
def test_target_contract(kind, family, tiny_model_dir, tmp_path):
    trainer = {"network": _network, "dreambooth": _dreambooth, "sdxl": _sdxl,
               "embeddings": _embeddings, "xti": _xti}[kind](tiny_model_dir(family), tmp_path)
    target = trainer.make_target()
    model = trainer.load_model()
    target.build(trainer, model, SimpleNamespace(device=torch.device("cpu")), torch.float32)
    target.finish(trainer, model, SimpleNamespace(device=torch.device("cpu")), torch.float32)
    groups = target.param_groups()
    params = target.trainable_params()
    assert groups and params and all(p.requires_grad for p in params)
    assert len({id(p) for p in params}) == len(params)  # no parameter in two groups
    assert target.module is not None and target.train_unet == (kind not in ("embeddings", "xti"))
    # state round trip: a changed copy loaded back restores exactly the saved values
    saved = {k: v.detach().clone() for k, v in target.state_dict().items()}
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    target.load_state_dict(saved, "test")
    after = target.state_dict()
    assert saved.keys() == after.keys() and all(torch.equal(saved[k], after[k]) for k in saved)
    sig = target.signature(SimpleNamespace())
    assert sig and all(isinstance(k, str) for k in sig)
    suffix = target.output_suffix()
    if kind == "network":
        assert suffix == ".safetensors" and target.train_text_encoder
    elif kind == "embeddings":  # only the new rows, one [2, D] matrix per text encoder, nothing of the UNet
        assert suffix == ".safetensors" and target.train_text_encoder and len(groups) == 1
        assert [tuple(p.shape) for p in params] == [(2, te.config.hidden_size) for te in model.text_encoders]
        assert not any(p.requires_grad for m in (model.unet, *model.text_encoders) for p in m.parameters()
                       if all(p is not q for q in params))
    elif kind == "xti":  # one [16 layers x 2, D] matrix, nothing else
        assert suffix == ".safetensors" and len(groups) == 1 and [tuple(p.shape) for p in params] == [(32, 32)]
        assert not any(p.requires_grad for m in (model.unet, *model.text_encoders) for p in m.parameters()
                       if all(p is not q for q in params))
    elif kind == "dreambooth":
        assert suffix == "" and target.train_text_encoder and target.stop_te_step == 3
        assert [g["lr"] for g in groups] == [trainer.args.learning_rate, 1e-5]
    else:  # SDXL: TE1 at lr 0 is frozen, TE2 trained; the embedding block (lr 0) is out of the optimizer
        assert [p.trained for p in target.te_plans] == [False, True]
        assert not any(p.requires_grad for p in model.unet.time_embedding.parameters())
        assert not any(p.requires_grad for p in model.text_encoders[0].parameters())
        assert all(p.requires_grad for p in model.text_encoders[1].parameters())
