"""GPU tier (``pytest -m gpu``): a LoRA training step on CUDA in bf16 against the same step on CPU in fp32.

Skipped where ``torch.cuda.is_available()`` is false, so the default suite and CI (no GPU) never run it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from library.models.families import Family
from library.training.family import get_family_adapter
from networks import lora
from tests.helpers_networks import randomize_lora_up, te_arg, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2 %); through a 20-layer UNet the loss and the
# gradients drift by about a percent, so these bounds leave a margin of about 3x
LOSS_RTOL = 3e-2
GRAD_COSINE_MIN = 0.99
GRAD_NORM_RTOL = 5e-2


def _step(family: Family, device: str, autocast: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One noise-prediction loss and its LoRA gradient (all LoRA parameters, flattened), with the network
    in fp32 as train_network.py keeps it; the UNet under autocast when ``autocast`` is given."""
    m = tiny_model(family)
    adapter = get_family_adapter(family)
    net = lora.create_network(1.0, 4, 2, m.vae, te_arg(m), m.unet)
    randomize_lora_up(net)  # non-zero up weights: the down weights get gradients too
    net.apply_to(te_arg(m), m.unet, apply_text_encoder=False, apply_unet=True)
    net.prepare_grad_etc(te_arg(m), m.unet)
    for module in (m.unet, *m.text_encoders, net):
        module.to(device)
    with torch.no_grad():
        ids = [t.to(device) for t in adapter.tokenize(m.tokenizers, ["a photo of a dog", "a red car"], None)]
        cond = adapter.encode(m.text_encoders, m.tokenizers, ids, None)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    noisy = (0.8 * latents + 0.6 * noise).to(device)
    timesteps = torch.tensor([100, 700], device=device)
    with torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext():
        pred = adapter.predict(m.unet, noisy, timesteps, cond)
    loss = torch.nn.functional.mse_loss(pred.float(), noise.to(device))
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    return loss.detach().cpu(), grad.cpu()


@pytest.mark.parametrize("family", [Family.SD1, Family.SDXL], ids=["sd1", "sdxl"])
def test_bf16_cuda_lora_step_matches_fp32_cpu_step(family):
    loss_cpu, grad_cpu = _step(family, "cpu", None)
    loss_gpu, grad_gpu = _step(family, "cuda", torch.bfloat16)
    assert torch.isfinite(loss_gpu) and torch.isfinite(grad_gpu).all()
    assert grad_cpu.shape == grad_gpu.shape and grad_cpu.norm() > 0
    assert abs(loss_gpu.item() - loss_cpu.item()) <= LOSS_RTOL * loss_cpu.item()
    cosine = torch.nn.functional.cosine_similarity(grad_gpu, grad_cpu, dim=0).item()
    assert cosine >= GRAD_COSINE_MIN, f"gradient direction differs: cosine {cosine:.4f}"
    assert abs(grad_gpu.norm().item() / grad_cpu.norm().item() - 1) <= GRAD_NORM_RTOL


@pytest.mark.integration
def test_train_network_bf16_on_cuda_trains_a_finite_lora(tiny_model_dir, tmp_path):
    """The entry script end to end on the GPU, mixed precision bf16: it runs, and the saved LoRA trained."""
    from tests.trainer_fixtures import lora_tensors, make_dataset, run_in_process, train_argv

    data = make_dataset(tmp_path / "data", names=("astronaut", "chelsea"))
    argv = train_argv(tiny_model_dir("sd1"), data, tmp_path / "out", "--mixed_precision", "bf16", steps=3)
    assert run_in_process(argv) == 0
    sd = lora_tensors(tmp_path / "out" / "lora.safetensors")
    assert all(torch.isfinite(v.float()).all() for v in sd.values())
    assert any(v.abs().max() > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
