"""OFT (orthogonal finetuning, kohya's COFT) network module: ``--network_module networks.oft``.

Each adapted U-Net layer keeps its weight ``W`` [out, in(, k, k)] frozen and learns a block-diagonal
rotation of its *output* features: the output rows are split into ``num_blocks`` (= ``--network_dim``)
groups of ``block_size = out / num_blocks`` and group ``i`` is multiplied by ``R_i^T``::

    Q_i = B_i - B_i^T                       (skew-symmetric, B = the trained ``oft_blocks``)
    Q   = Q * min(1, c / |Q|)               (COFT constraint, c = alpha * out, |Q| over all blocks)
    R_i = (I + Q_i) (I - Q_i)^-1            (Cayley transform: orthogonal)
    R_i = multiplier * (R_i - I) + I
    W'[group i] = R_i^T @ W[group i]        y = W' x + b

``oft_blocks`` starts at zero, so R = I and a fresh network changes nothing. The orientation (``R^T``
applied, kohya's ``einsum("k n m, k n ... -> k m ...")``) and the constraint ``alpha * out`` are
kohya's, so A1111/Forge read sdtk's files exactly as kohya's.

Targets (U-Net only, as kohya; text encoders are never adapted): the Linear layers of the attention
modules (q/k/v/out); with ``enable_all_linear=True`` every Linear / 1x1 conv of the transformer blocks
(adds feed-forward and ``proj_in``/``proj_out``); with ``enable_conv=True`` also the ResNet blocks and
up/down-samplers (3x3 convs, 1x1 shortcuts, time-embedding projections).

File (kohya's): per layer ``<name>.oft_blocks`` [num_blocks, block_size, block_size] and
``<name>.alpha`` (scalar), names ``oft_unet_`` + the module path with ``.`` -> ``_`` (SDXL: the
original sgm path, as for LoRA, see :mod:`networks.lora_keys`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F

from library.errors import ConfigError, ModelLoadError
from library.models.families import Family
from networks import lora_keys as keys
from library.network_contract import NetworkCapabilities
from networks.lora_io import load_state_dict_file, save_network_weights
from networks.lora_modules import ForwardHook, unet_layout_of

logger = logging.getLogger(__name__)

PREFIX_UNET = "oft_unet"
SUFFIX_BLOCKS = "oft_blocks"
SUFFIX_ALPHA = "alpha"
DEFAULT_ALPHA = 1e-3  # kohya's default constraint when --network_alpha is not given

TARGETS_ATTN = ("Attention", "CrossAttention")  # diffusers' / kohya's attention class names
TARGETS_ALL_LINEAR = ("Transformer2DModel",)
TARGETS_CONV = ("ResnetBlock2D", "Downsample2D", "Upsample2D")

ARGS_SOURCE = "--network_args (networks.oft)"


# -- network_args ---------------------------------------------------------------------------------
@dataclass
class OFTArgs:
    """Typed ``--network_args`` of ``networks.oft`` (kohya's names)."""

    enable_all_linear: bool = False
    enable_conv: bool = False


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(v)


_HINTS = {
    "conv_dim": "OFT has no separate conv rank: use enable_conv=True (convs get --network_dim blocks too)",
    "conv_alpha": "OFT has no separate conv alpha: --network_alpha is the constraint for every layer",
    "constraint": "OFT's constraint is --network_alpha (e.g. --network_alpha 1e-3)",
    "rank_dropout": "OFT has no dropout",
    "module_dropout": "OFT has no dropout",
    "algo": "LyCORIS (use --network_module lycoris.kohya with algo=diag-oft)",
}


def parse_oft_args(kwargs: Mapping[str, Any]) -> OFTArgs:
    """Type and check ``--network_args``; every problem is reported at once.

    ``dropout`` (which the trainer injects from ``--network_dropout``) is accepted and ignored with a
    warning, as kohya's OFT ignores it. ``None`` values mean "not given".

    Raises:
        ConfigError: unknown keys or values that are not booleans, with the valid keys.
    """
    problems: list[str] = []
    values: dict[str, bool] = {}
    for key, raw in kwargs.items():
        if key == "dropout":
            if raw is not None:
                logger.warning("networks.oft has no dropout: --network_dropout / dropout=%s is ignored", raw)
            continue
        if key not in ("enable_all_linear", "enable_conv"):
            hint = f" — {_HINTS[key]}" if key in _HINTS else ""
            problems.append(f"unknown key {key!r}{hint}")
            continue
        if raw is None:
            continue
        try:
            values[key] = _bool(raw)
        except ValueError:
            problems.append(f"{key}={raw!r} is invalid: expected True or False")
    if problems:
        problems.append("valid keys: enable_all_linear, enable_conv")
        raise ConfigError(problems, source=ARGS_SOURCE)
    return OFTArgs(**values)


# -- one adapted layer ----------------------------------------------------------------------------
class OFTModule(ForwardHook):
    """OFT of one base ``nn.Linear`` / ``nn.Conv2d`` (state-dict keys ``oft_blocks``, ``alpha``).

    Args:
        oft_name: kohya key prefix, e.g. ``oft_unet_..._attn1_to_q``.
        org_module: the base layer; kept by reference, not registered (its weight is not saved).
        multiplier: strength (1.0 in training; ``--network_mul`` at inference).
        num_blocks: number of diagonal blocks (``--network_dim``); must divide the output size.
        alpha: constraint factor; ``|Q|`` is clamped to ``alpha * out_features``.
    """

    def __init__(self, oft_name: str, org_module: torch.nn.Module, multiplier: float = 1.0, num_blocks: int = 4,
                 alpha: float | torch.Tensor = DEFAULT_ALPHA):
        super().__init__()
        if isinstance(org_module, torch.nn.Linear):
            out_dim = org_module.out_features
        elif isinstance(org_module, torch.nn.Conv2d):
            out_dim = org_module.out_channels
        else:
            raise TypeError(f"{oft_name}: OFT supports Linear and Conv2d, not {type(org_module).__name__}")
        if num_blocks <= 0 or out_dim % num_blocks:
            raise ValueError(f"{oft_name}: {out_dim} output features cannot be split into {num_blocks} blocks")
        self.oft_name = oft_name
        self.num_blocks, self.block_size, self.out_dim = num_blocks, out_dim // num_blocks, out_dim
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float().item())
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32))
        self.oft_blocks = torch.nn.Parameter(torch.zeros(num_blocks, self.block_size, self.block_size))
        self.multiplier = multiplier
        self.enabled = True
        self._hook_base(org_module)

    def rotation(self, blocks: torch.Tensor | None = None, multiplier: float | None = None) -> torch.Tensor:
        """The per-block matrices ``multiplier * (R - I) + I``, float32 [num_blocks, block_size, block_size]."""
        b = (self.oft_blocks if blocks is None else blocks).float()
        multiplier = self.multiplier if multiplier is None else multiplier
        q = b - b.transpose(1, 2)
        norm = torch.linalg.vector_norm(q)
        constraint = self.alpha.float().to(b.device) * self.out_dim
        q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(self.block_size, device=b.device, dtype=torch.float32).expand_as(q)
        # (I + Q)(I - Q)^-1 == (I - Q)^-1 (I + Q): both are functions of Q, so they commute; a solve
        # is more accurate than an explicit inverse.
        r = torch.linalg.solve(eye - q, eye + q)
        return multiplier * (r - eye) + eye

    def rotated_weight(self, weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``weight`` [out, ...] with each row group ``i`` replaced by ``r_i^T @ group`` (float32)."""
        w = weight.float().reshape(self.num_blocks, self.block_size, -1)
        return torch.bmm(r.transpose(1, 2), w).reshape(weight.shape)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer with its rotated weight. ``x``: (B, ..., in) or (B, in, H, W)."""
        if not self.enabled or self.multiplier == 0.0:
            return self.org_forward(x, *args, **kwargs)
        org = self.org_module
        w = self.rotated_weight(org.weight, self.rotation()).to(x.dtype)
        bias = None if org.bias is None else org.bias.to(x.dtype)
        if isinstance(org, torch.nn.Conv2d):
            return F.conv2d(x, w, bias, org.stride, org.padding, org.dilation, org.groups)
        return F.linear(x, w, bias)

    @torch.no_grad()
    def merge_to(self, sd: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                 device: Any = "cpu", multiplier: float | None = None) -> None:
        """Write ``R^T W`` into the base weight (kohya's ``OFTInfModule.merge_to``).

        Args:
            sd: ``{"oft_blocks"[, "alpha"]}`` for this layer, or ``None`` for the module's own weights.
            dtype: dtype of the merged weight (default: the base weight's).
        """
        blocks = None
        if sd is not None:
            blocks = sd[SUFFIX_BLOCKS].to(device)
            if SUFFIX_ALPHA in sd:
                self.alpha.fill_(float(sd[SUFFIX_ALPHA].float().item()))
        weight = self.org_module.weight
        r = self.rotation(blocks, multiplier).to(device)
        merged = self.rotated_weight(weight.to(device), r)
        weight.data = merged.to(weight.device, dtype or weight.dtype)


# -- the network ----------------------------------------------------------------------------------
def _matches(module: torch.nn.Module, names: Iterable[str]) -> bool:
    wanted = set(names)
    return any(cls.__name__ in wanted for cls in type(module).__mro__)


def oft_name(module_path: str, layout: Any | None = None) -> str:
    """U-Net module path -> kohya OFT name (``oft_unet_...``; sgm path for SDXL via ``layout``)."""
    return PREFIX_UNET + keys.unet_lora_name(module_path, layout)[len(keys.PREFIX_UNET):]


def _family_of_oft_weights(weights_sd: Mapping[str, torch.Tensor]) -> Family | None:
    """SDXL (sgm names) or SD1/SD2 (diffusers names) from an OFT file's keys; None if neither."""
    for key in weights_sd:
        if key.startswith(("oft_unet_input_blocks_", "oft_unet_middle_block_", "oft_unet_output_blocks_")):
            return Family.SDXL
        if key.startswith(("oft_unet_down_blocks_", "oft_unet_mid_block_", "oft_unet_up_blocks_")):
            return Family.SD1
    return None


class OFTNetwork(torch.nn.Module):
    """:class:`OFTModule` s over a U-Net, registered under their kohya names (``state_dict()`` = the file).

    Args:
        unet: diffusers ``UNet2DConditionModel``.
        multiplier: strength of every module.
        dim: number of blocks per layer.
        alpha: constraint factor.
        enable_all_linear / enable_conv: extend the targets (see the module docstring).
        module_names: from a file: adapt exactly these layers (the targets are then the union of
            all three sets, so any kohya OFT file finds its layers).
        is_sdxl: name layers with SDXL's sgm paths; detected from the U-Net when ``None``.
    """

    SDTK_CAPABILITIES = NetworkCapabilities(mergeable=True, set_multiplier=True, optimizer_params_tuple=True)

    def __init__(self, unet: Any, multiplier: float = 1.0, dim: int = 4, alpha: float = DEFAULT_ALPHA,
                 enable_all_linear: bool = False, enable_conv: bool = False,
                 module_names: Iterable[str] | None = None, is_sdxl: bool | None = None) -> None:
        super().__init__()
        self.multiplier, self.dim, self.alpha = multiplier, int(dim), float(alpha)
        self.enable_all_linear, self.enable_conv = enable_all_linear, enable_conv
        self.family = Family.SDXL if is_sdxl else keys.family_of_models(unet)
        self.is_sdxl = keys.uses_sdxl_layout(self.family)
        wanted = None if module_names is None else set(module_names)
        if wanted is not None:
            targets, with_kxk = TARGETS_ALL_LINEAR + TARGETS_ATTN + TARGETS_CONV, True
        else:
            targets = TARGETS_ALL_LINEAR if enable_all_linear else TARGETS_ATTN
            targets, with_kxk = (targets + TARGETS_CONV, True) if enable_conv else (targets, False)
        layout = unet_layout_of(unet) if self.is_sdxl else None

        layers: list[tuple[str, torch.nn.Module]] = []
        seen: set[int] = set()
        for path, module in unet.named_modules():
            if not _matches(module, targets):
                continue
            for child_path, child in module.named_modules():
                if id(child) in seen or not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                    continue
                if isinstance(child, torch.nn.Conv2d) and child.kernel_size != (1, 1) and not with_kxk:
                    continue
                seen.add(id(child))
                name = oft_name(f"{path}.{child_path}" if path else child_path, layout)
                if wanted is None or name in wanted:
                    layers.append((name, child))
        self._check_divisible(layers)
        self.unet_ofts: list[OFTModule] = [OFTModule(n, m, multiplier, self.dim, self.alpha) for n, m in layers]
        for oft in self.unet_ofts:
            if oft.oft_name in self._modules:
                raise RuntimeError(f"duplicated OFT name {oft.oft_name}")
            self.add_module(oft.oft_name, oft)
        logger.info("OFT: %d U-Net modules, %d blocks each, constraint %g, all linear %s, conv %s",
                    len(self.unet_ofts), self.dim, self.alpha, enable_all_linear, enable_conv)

    def _check_divisible(self, layers: list[tuple[str, torch.nn.Module]]) -> None:
        sizes = {n: (m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels) for n, m in layers}
        bad = {n: s for n, s in sizes.items() if self.dim <= 0 or s % self.dim}
        if not bad:
            return
        fits = [d for d in range(1, 65) if all(s % d == 0 for s in sizes.values())]
        shown = ", ".join(f"{n} ({s})" for n, s in list(bad.items())[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ConfigError(
            f"--network_dim {self.dim} is OFT's number of blocks and must divide every adapted layer's output "
            f"size, but it does not divide {shown}; values that fit this model: {', '.join(map(str, fits))}",
            source="--network_dim (networks.oft)",
        )

    # -- kohya's interface -------------------------------------------------------------------------
    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for oft in self.unet_ofts:
            oft.multiplier = multiplier

    def set_enabled(self, is_enabled: bool) -> None:
        for oft in self.unet_ofts:
            oft.enabled = is_enabled

    def apply_to(self, text_encoder: Any, unet: Any, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the modules into the U-Net. OFT has no text-encoder part.

        Raises:
            ConfigError: ``apply_unet`` is false (``--network_train_text_encoder_only``).
        """
        if not apply_unet:
            raise ConfigError("networks.oft adapts the U-Net only; --network_train_text_encoder_only cannot be used with it")
        if apply_text_encoder:
            logger.info("networks.oft adapts the U-Net only: --network_train_unet_only saves text-encoder work")
        for oft in self.unet_ofts:
            oft.apply_to()

    def restore(self) -> None:
        """Unhook every module (the U-Net computes as before :meth:`apply_to`)."""
        for oft in self.unet_ofts:
            oft.restore()

    def is_mergeable(self) -> bool:
        return True

    def merge_to(self, text_encoder: Any, unet: Any, weights_sd: Mapping[str, torch.Tensor] | None,
                 dtype: torch.dtype | None = None, device: Any = "cpu") -> None:
        """Rotate each adapted base weight in place (no hooks needed afterwards).

        Args:
            weights_sd: an OFT file's state dict, or ``None`` to merge the network's current weights.
        """
        for oft in self.unet_ofts:
            if weights_sd is None:
                oft.merge_to(None, dtype, device)
                continue
            sd = {k[len(oft.oft_name) + 1:]: v for k, v in weights_sd.items() if k.startswith(oft.oft_name + ".")}
            if SUFFIX_BLOCKS in sd:
                oft.merge_to(sd, dtype, device)
        logger.info("OFT weights merged into the U-Net")

    @torch.no_grad()
    def backup_weights(self) -> None:
        """Remember each adapted base weight so :meth:`restore_weights` can undo a merge."""
        self._backup = {o.oft_name: o.org_module.weight.detach().clone() for o in self.unet_ofts}

    @torch.no_grad()
    def restore_weights(self) -> None:
        """Put back the weights saved by :meth:`backup_weights` and re-enable the hooks."""
        for oft in self.unet_ofts:
            saved = getattr(self, "_backup", {}).get(oft.oft_name)
            if saved is not None:
                oft.org_module.weight.copy_(saved)
            oft.enabled = True

    @torch.no_grad()
    def pre_calculation(self) -> None:
        """Merge the current rotations into the base weights and disable the hooks (faster sampling)."""
        for oft in self.unet_ofts:
            oft.merge_to(None, None, oft.org_module.weight.device)
            oft.enabled = False

    def prepare_optimizer_params(self, text_encoder_lr: Any = None, unet_lr: float | None = None,
                                 default_lr: float | None = None) -> tuple[list[dict], list[str]]:
        """One group, ``"unet"``, at ``unet_lr`` (else ``default_lr``); an lr of 0 trains nothing.

        Returns:
            ``(param_groups, descriptions)``; ``text_encoder_lr`` is unused (no text-encoder part).
        """
        self.requires_grad_(True)
        lr = unet_lr if unet_lr is not None else default_lr
        params = [o.oft_blocks for o in self.unet_ofts]
        if not params or (lr is not None and lr == 0):
            logger.info("OFT U-Net learning rate %s: nothing to train", lr)
            return [], []
        group: dict[str, Any] = {"params": params}
        if lr is not None:
            group["lr"] = lr
        logger.info("OFT params: %d", sum(p.numel() for p in params))
        return [group], ["unet"]

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the modules run inside the base layers, which the U-Net checkpoints."""

    def prepare_grad_etc(self, text_encoder: Any, unet: Any) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any, unet: Any) -> None:
        self.train()

    def get_trainable_params(self) -> Iterable[torch.nn.Parameter]:
        return self.parameters()

    def load_weights(self, file: str | os.PathLike) -> Any:
        """Load an OFT file into this network; returns torch's ``(missing_keys, unexpected_keys)``.

        Raises:
            ModelLoadError: unreadable file, another model family, no OFT keys, or another number of
                blocks than ``--network_dim`` (use ``--dim_from_weights``).
        """
        weights_sd, _ = load_state_dict_file(file)
        self.check_compatible(weights_sd, file)
        info = self.load_state_dict(weights_sd, strict=False)
        if len(weights_sd) == len(info.unexpected_keys):
            raise ModelLoadError(f"{file}: none of its {len(weights_sd)} tensors is an OFT key of this network "
                                 "(is it a kohya OFT file for this model?)")
        if info.unexpected_keys:
            logger.warning("%s: %d keys not used by this network, e.g. %s", file, len(info.unexpected_keys), info.unexpected_keys[:3])
        return info

    def check_compatible(self, weights_sd: Mapping[str, torch.Tensor], file: Any) -> None:
        """Raise :class:`ModelLoadError` if an OFT state dict's family or block shapes do not fit."""
        fam = _family_of_oft_weights(weights_sd)
        if fam is not None and keys.uses_sdxl_layout(fam) != self.is_sdxl:
            made = "SDXL" if keys.uses_sdxl_layout(fam) else "SD1.x/SD2.x"
            raise ModelLoadError(f"{file}: this OFT file was made for {made} but the base model is {self.family.pretty}")
        own = self.state_dict()
        wrong = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
                 for k, v in weights_sd.items() if k in own and own[k].shape != v.shape]
        if wrong:
            raise ModelLoadError(f"{file}: {len(wrong)} tensors do not fit this network — the file's number of blocks "
                                 f"differs from --network_dim {self.dim} (pass --dim_from_weights). " + "; ".join(wrong[:3]))

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: Mapping[str, str] | None) -> None:
        """Write the network atomically: ``.safetensors`` (with ``sshs_*`` hashes) or torch pickle."""
        save_network_weights(self.state_dict(), file, dtype, metadata)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: Any, unet: Any, neuron_dropout: float | None = None, **kwargs: Any) -> OFTNetwork:
    """kohya's factory: a fresh OFT network.

    Args:
        network_dim: number of blocks per layer (default 4).
        network_alpha: constraint factor (default 1e-3; values >= 1 barely constrain, kohya warns).
        text_encoder: unused (OFT adapts the U-Net only); ``unet``: diffusers ``UNet2DConditionModel``.
        neuron_dropout: unsupported, ignored with a warning.
        kwargs: ``--network_args``: ``enable_all_linear``, ``enable_conv``.

    Raises:
        ConfigError: bad ``--network_args`` or a ``network_dim`` that does not divide the layer sizes.
    """
    args = parse_oft_args(kwargs)
    if neuron_dropout is not None and "dropout" not in kwargs:
        logger.warning("networks.oft has no dropout: --network_dropout %s is ignored", neuron_dropout)
    if network_alpha is None:
        logger.info("--network_alpha not set: OFT uses the constraint %g", DEFAULT_ALPHA)
        network_alpha = DEFAULT_ALPHA
    elif network_alpha >= 1:
        logger.warning("--network_alpha %g is OFT's constraint and hardly constrains at >= 1; consider 1e-3", network_alpha)
    if network_alpha <= 0:
        raise ConfigError(f"--network_alpha {network_alpha} must be positive for OFT (it is the constraint, e.g. 1e-3)")
    dim = 4 if network_dim is None else int(network_dim)
    if dim <= 0:
        raise ConfigError(f"--network_dim {dim} must be a positive number of blocks for OFT")
    return OFTNetwork(unet, multiplier, dim, float(network_alpha), args.enable_all_linear, args.enable_conv)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoder: Any, unet: Any,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs: Any) -> tuple[OFTNetwork, dict[str, torch.Tensor]]:
    """kohya's factory for an existing file: blocks, constraint and layers are read from the weights.

    The weights are *not* loaded (callers ``load_weights`` or ``merge_to``).

    Raises:
        ModelLoadError: unreadable file, no ``oft_blocks`` keys, or another model family.
    """
    parse_oft_args(kwargs)  # validated, but the file decides which layers exist
    if weights_sd is None:
        weights_sd, _ = load_state_dict_file(file)
    weights_sd = dict(weights_sd)
    names = [k[: -len(SUFFIX_BLOCKS) - 1] for k in weights_sd if k.endswith("." + SUFFIX_BLOCKS)]
    if not names:
        raise ModelLoadError(f"{file or 'weights'}: no '<name>.oft_blocks' tensors — not a kohya OFT file "
                             "(LyCORIS OFT files load with --network_module lycoris.kohya)")
    dim = int(weights_sd[names[0] + "." + SUFFIX_BLOCKS].shape[0])
    alpha_t = weights_sd.get(names[0] + "." + SUFFIX_ALPHA)
    alpha = DEFAULT_ALPHA if alpha_t is None else float(alpha_t.float().item())
    all_linear = any("_ff_" in n or n.endswith(("_proj_in", "_proj_out")) for n in names)
    conv = any(("_resnets_" in n or "samplers_" in n or "_layers_" in n or n.endswith(("_op", "_skip_connection")))
               for n in names)
    network = OFTNetwork(unet, multiplier, dim, alpha, all_linear, conv, module_names=names)
    network.check_compatible(weights_sd, file or "weights")
    missing = set(names) - {o.oft_name for o in network.unet_ofts}
    if missing:
        logger.warning("%d OFT layers of the file are not in this U-Net, e.g. %s", len(missing), sorted(missing)[:3])
    return network, weights_sd
