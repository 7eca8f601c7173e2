"""LoRA network module with kohya sd-scripts' interface and file format (``--network_module networks.lora``).

Targets, as kohya: every Linear/Conv2d inside the UNet's ``Transformer2DModel`` blocks (attention
q/k/v/out, feed-forward, ``proj_in``/``proj_out``) and inside the text encoders' ``CLIPAttention`` /
``CLIPMLP``; with ``conv_dim`` also the ``ResnetBlock2D`` / ``Downsample2D`` / ``Upsample2D`` modules
(3x3 convs at ``conv_dim``, their Linear and 1x1 convs at ``network_dim``). Key names: see
:mod:`networks.lora_keys`; file format and metadata: ``docs/lora_format.md``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Mapping

import torch

from library.errors import ModelLoadError
from library.models.families import Family
from networks import lora_keys as keys
from library.network_contract import NetworkCapabilities
from networks.lora_args import parse_network_args
from networks.lora_blocks import block_dims_and_alphas, block_index, block_lr_weights
from networks.lora_io import check_compatible, load_state_dict_file, save_network_weights
from networks.lora_modules import LoRAModule, RankPlan, create_loras, unet_layout_of

logger = logging.getLogger(__name__)

LoRAInfModule = LoRAModule  # kohya's inference class; sdtk's module has no training-only state to drop


class LoRANetwork(torch.nn.Module):
    """A set of :class:`LoRAModule` adapters over a UNet and its text encoder(s).

    The adapters are submodules named by their kohya key prefix, so ``state_dict()`` is exactly the
    content of a kohya LoRA file.
    """

    SDTK_CAPABILITIES = NetworkCapabilities(
        on_step_start=True,
        max_norm_regularization=True,
        mergeable=True,
        multiple_te_lrs=True,
        optimizer_params_tuple=True,
        set_multiplier=True,
        network_dropout=True,
        gradient_checkpointing=False,
    )

    UNET_TARGET_REPLACE_MODULE = ("Transformer2DModel",)
    UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
    TEXT_ENCODER_TARGET_REPLACE_MODULE = ("CLIPAttention", "CLIPMLP")
    LORA_PREFIX_UNET = keys.PREFIX_UNET
    LORA_PREFIX_TEXT_ENCODER = keys.PREFIX_TE
    LORA_PREFIX_TEXT_ENCODER1 = keys.PREFIX_TE1
    LORA_PREFIX_TEXT_ENCODER2 = keys.PREFIX_TE2

    def __init__(
        self,
        text_encoder: Any,
        unet: Any,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        conv_lora_dim: int | None = None,
        conv_alpha: float | None = None,
        block_dims: list[int] | None = None,
        block_alphas: list[float] | None = None,
        conv_block_dims: list[int] | None = None,
        conv_block_alphas: list[float] | None = None,
        modules_dim: Mapping[str, int] | None = None,
        modules_alpha: Mapping[str, float] | None = None,
        module_class: type = LoRAModule,
        varbose: bool = False,
        is_sdxl: bool | None = None,
    ) -> None:
        super().__init__()
        self.multiplier = multiplier
        self.lora_dim, self.alpha = lora_dim, alpha
        self.conv_lora_dim, self.conv_alpha = conv_lora_dim, conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.loraplus_lr_ratio = self.loraplus_unet_lr_ratio = self.loraplus_text_encoder_lr_ratio = None
        self.block_lr_weight: list[float] | None = None

        # Keep None entries so SDXL's prefixes stay te1/te2 whichever encoder is missing.
        text_encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
        if is_sdxl is None:
            self.family = keys.family_of_models(unet, text_encoders)
        else:
            self.family = Family.SDXL if is_sdxl else keys.family_of_models(unet)
        self.is_sdxl = keys.uses_sdxl_layout(self.family)
        layout = None
        self._name_aliases: dict[str, str] = {}
        if self.is_sdxl and unet is not None:
            layout = unet_layout_of(unet)
            self._name_aliases = keys.sdxl_diffusers_name_aliases(unet, layout)

        plan = RankPlan(
            lora_dim, alpha, conv_lora_dim, conv_alpha, block_dims, block_alphas, conv_block_dims, conv_block_alphas,
            modules_dim, modules_alpha, self.is_sdxl,
        )

        def make(name: str, child: torch.nn.Module, dim: int, a: float | None) -> LoRAModule:
            return module_class(name, child, multiplier, dim, a, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)

        self.text_encoder_loras: list[LoRAModule] = []
        for i, te in enumerate(text_encoders):
            if te is not None:
                prefix = keys.te_prefix(i + 1 if len(text_encoders) > 1 else None)
                name_fn = lambda path, prefix=prefix: keys.text_encoder_lora_name(prefix, path)  # noqa: E731
                self.text_encoder_loras += create_loras(te, self.TEXT_ENCODER_TARGET_REPLACE_MODULE, name_fn, plan, False, make)
        unet_targets = self.UNET_TARGET_REPLACE_MODULE
        if modules_dim is not None or conv_lora_dim is not None or conv_block_dims is not None:
            unet_targets = unet_targets + self.UNET_TARGET_REPLACE_MODULE_CONV2D_3X3
        self.unet_loras: list[LoRAModule] = []
        if unet is not None:
            self.unet_loras = create_loras(unet, unet_targets, lambda path: keys.unet_lora_name(path, layout), plan, True, make)
        logger.info("LoRA: %d text-encoder modules, %d UNet modules", len(self.text_encoder_loras), len(self.unet_loras))

        for lora in self.text_encoder_loras + self.unet_loras:
            if lora.lora_name in self._modules:
                raise RuntimeError(f"duplicated LoRA name {lora.lora_name}")
            self.add_module(lora.lora_name, lora)

    # -- kohya's interface ---------------------------------------------------------------------
    @property
    def all_loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.all_loras:
            lora.multiplier = multiplier

    def set_enabled(self, is_enabled: bool) -> None:
        for lora in self.all_loras:
            lora.enabled = is_enabled

    def set_network_dropout(self, dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None) -> None:
        """Change the three dropouts of every module (they act in training mode only)."""
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        for lora in self.all_loras:
            lora.dropout, lora.rank_dropout, lora.module_dropout = dropout, rank_dropout, module_dropout

    def apply_to(self, text_encoder: Any, unet: Any, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the adapters into the models; parts not applied are dropped from the network (and its files)."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.all_loras:
            lora.apply_to()
        logger.info("LoRA applied: text encoder %d modules, UNet %d modules", len(self.text_encoder_loras), len(self.unet_loras))

    def restore(self) -> None:
        """Unhook every adapter (the models compute as before :meth:`apply_to`)."""
        for lora in self.all_loras:
            lora.restore()

    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            lora.restore()
            del self._modules[lora.lora_name]

    def is_mergeable(self) -> bool:
        return True

    def merge_to(self, text_encoder: Any, unet: Any, weights_sd: Mapping[str, torch.Tensor] | None, dtype: torch.dtype | None = None, device: Any = "cpu") -> None:
        """Add each adapter's delta into its base weight (no hooks; the network is then not needed).

        Args:
            weights_sd: the file's state dict, or ``None`` to merge the network's current weights.
        """
        if weights_sd is not None:
            weights_sd = keys.rename_modules(keys.add_text_model_prefix(weights_sd), self._name_aliases)
        for lora in self.all_loras:
            if weights_sd is None:
                lora.merge_to(None, dtype, device)
                continue
            sd = {k[len(lora.lora_name) + 1 :]: v for k, v in weights_sd.items() if k.startswith(lora.lora_name + ".")}
            if sd:
                lora.merge_to(sd, dtype, device)
        logger.info("LoRA weights merged into the base model")

    # -- inference helpers (kohya's gen_img: merge for speed, restore afterwards) --------------
    @torch.no_grad()
    def backup_weights(self) -> None:
        """Remember each adapted base module's weight so :meth:`restore_weights` can undo a merge."""
        self._backup = {l.lora_name: l.org_module.weight.detach().clone() for l in self.all_loras}

    @torch.no_grad()
    def restore_weights(self) -> None:
        """Put back the weights saved by :meth:`backup_weights` and re-enable the hooks."""
        for lora in self.all_loras:
            saved = getattr(self, "_backup", {}).get(lora.lora_name)
            if saved is not None:
                lora.org_module.weight.copy_(saved)
            lora.enabled = True

    @torch.no_grad()
    def pre_calculation(self) -> None:
        """Merge the current adapters into the base weights and disable the hooks (faster sampling)."""
        for lora in self.all_loras:
            weight = lora.org_module.weight
            weight.copy_(weight.float() + lora.delta_weight().to(weight.device))
            lora.enabled = False

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio: float | None, unet_ratio: float | None, te_ratio: float | None) -> None:
        self.loraplus_lr_ratio, self.loraplus_unet_lr_ratio, self.loraplus_text_encoder_lr_ratio = loraplus_lr_ratio, unet_ratio, te_ratio

    def set_block_lr_weight(self, block_lr_weight: list[float] | None) -> None:
        self.block_lr_weight = block_lr_weight

    def prepare_optimizer_params(self, text_encoder_lr: float | list[float] | None, unet_lr: float | None = None, default_lr: float | None = None) -> tuple[list[dict], list[str]]:
        """Optimizer parameter groups and their names (for lr logging), kohya's convention.

        Args:
            text_encoder_lr: one lr for all text encoders, or a list with one per text encoder
                (SDXL); ``None`` entries fall back to ``default_lr``.
            unet_lr: UNet lr; ``None`` falls back to ``default_lr``.
            default_lr: ``--learning_rate``.

        Returns:
            ``(param_groups, descriptions)``. A group whose lr resolves to 0 or ``None`` is left out
            (its parameters are not trained), as in kohya. With LoRA+ the ``lora_up`` weights get
            their own group at ``lr * ratio`` (description suffix ``" plus"``).
        """
        self.requires_grad_(True)
        groups: list[dict] = []
        descriptions: list[str] = []

        def add(loras: list[LoRAModule], lr: float | None, ratio: float | None, desc: str) -> None:
            plain = [p for l in loras for n, p in l.named_parameters() if ratio is None or "lora_up" not in n]
            plus = [p for l in loras for n, p in l.named_parameters() if ratio is not None and "lora_up" in n]
            for params, group_lr, suffix in ((plain, lr, ""), (plus, None if lr is None else lr * (ratio or 1.0), " plus")):
                if not params:
                    continue
                if not group_lr:
                    logger.info("LoRA group %s%s has learning rate %s: not trained", desc, suffix, group_lr)
                    continue
                groups.append({"params": params, "lr": group_lr})
                descriptions.append(desc + suffix)

        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        if isinstance(text_encoder_lr, (list, tuple)):
            by_prefix: dict[str, list[LoRAModule]] = {}
            for lora in self.text_encoder_loras:
                by_prefix.setdefault(lora.lora_name.split("_text_model_")[0], []).append(lora)
            for prefix, loras in by_prefix.items():
                number = prefix[len(keys.PREFIX_TE) :]  # "" (single text encoder), "1" or "2"
                i = int(number) - 1 if number else 0
                lr = text_encoder_lr[min(i, len(text_encoder_lr) - 1)] if text_encoder_lr else None
                add(loras, lr if lr is not None else default_lr, te_ratio, f"textencoder{number}")
        elif self.text_encoder_loras:
            add(self.text_encoder_loras, text_encoder_lr if text_encoder_lr is not None else default_lr, te_ratio, "textencoder")

        unet_base = unet_lr if unet_lr is not None else default_lr
        unet_ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        if self.block_lr_weight is not None and self.unet_loras:
            by_block: dict[int, list[LoRAModule]] = {}
            for lora in self.unet_loras:
                by_block.setdefault(block_index(lora.lora_name, self.is_sdxl), []).append(lora)
            for idx, loras in by_block.items():
                weight = self.block_lr_weight[idx] if 0 <= idx < len(self.block_lr_weight) else 1.0
                add(loras, None if unet_base is None else unet_base * weight, unet_ratio, f"unet_block{idx}")
        elif self.unet_loras:
            add(self.unet_loras, unet_base, unet_ratio, "unet")
        return groups, descriptions

    # kohya's trainer passes a list of text-encoder lrs only to a method of this name.
    prepare_optimizer_params_with_multiple_te_lrs = prepare_optimizer_params

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: adapters run inside the base modules, which the base model checkpoints."""

    def prepare_grad_etc(self, text_encoder: Any, unet: Any) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any, unet: Any) -> None:
        self.train()

    def on_step_start(self, text_encoder: Any, unet: Any) -> None:
        """Called before each step; LoRA needs no per-step work."""

    def get_trainable_params(self) -> Iterable[torch.nn.Parameter]:
        return self.parameters()

    def load_weights(self, file: str | os.PathLike) -> Any:
        """Load a LoRA file into this network; returns torch's ``(missing_keys, unexpected_keys)``.

        Raises:
            ModelLoadError: unreadable file, another model family, or ranks differing from this
                network's (use ``--dim_from_weights``).
        """
        weights_sd, metadata = load_state_dict_file(file)
        weights_sd = keys.rename_modules(keys.add_text_model_prefix(weights_sd), self._name_aliases)
        check_compatible(weights_sd, metadata, self, file)
        info = self.load_state_dict(weights_sd, strict=False)
        matched = len(weights_sd) - len(info.unexpected_keys)
        if matched == 0:
            raise ModelLoadError(f"{file}: none of its {len(weights_sd)} tensors is a LoRA key of this network (is it a LoRA for this model?)")
        if info.unexpected_keys:
            logger.warning("%s: %d keys not used by this network, e.g. %s", file, len(info.unexpected_keys), info.unexpected_keys[:3])
        return info

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: Mapping[str, str] | None) -> None:
        """Write the network atomically: ``.safetensors`` (with ``sshs_*`` hashes added) or torch pickle."""
        save_network_weights(self.state_dict(), file, dtype, metadata)

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device: Any) -> tuple[int, float, float]:
        """Scale down adapters whose delta-weight norm exceeds ``max_norm_value`` (``--scale_weight_norms``).

        Returns:
            ``(keys_scaled, mean_norm, max_norm)`` over all adapters, norms after scaling.
        """
        keys_scaled, norms = 0, []
        for lora in self.all_loras:
            up, down = lora.lora_up.weight, lora.lora_down.weight
            updown = lora.delta_weight(up.to(device), down.to(device), multiplier=1.0)
            norm = updown.norm().clamp(min=max_norm_value / 2)
            ratio = (torch.clamp(norm, max=max_norm_value) / norm).cpu()
            if ratio != 1:
                keys_scaled += 1
                up.mul_(ratio.sqrt().to(up))
                down.mul_(ratio.sqrt().to(down))
            norms.append((updown.norm().cpu() * ratio).item())
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoder: Any,
    unet: Any,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> LoRANetwork:
    """kohya's factory: a fresh LoRA network (``--network_dim``, ``--network_alpha``, ``--network_args``).

    Args:
        text_encoder: a CLIP text model, or ``[te1, te2]`` for SDXL.
        unet: diffusers ``UNet2DConditionModel``.
        neuron_dropout: ``--network_dropout``.
        kwargs: ``--network_args`` (strings or typed), see :mod:`networks.lora_args`.

    Raises:
        ConfigError: unknown ``--network_args`` keys or bad values (all listed at once).
    """
    args = parse_network_args(kwargs)
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    if neuron_dropout is None:
        neuron_dropout = args.dropout
    conv_alpha = (args.conv_alpha if args.conv_alpha is not None else 1.0) if args.conv_dim is not None else None
    is_sdxl = keys.uses_sdxl_layout(
        keys.family_of_models(unet, text_encoder if isinstance(text_encoder, (list, tuple)) else [text_encoder]))

    block_lr = block_lr_weights(is_sdxl, args.down_lr_weight, args.mid_lr_weight, args.up_lr_weight, args.block_lr_zero_threshold or 0.0)
    block_dims = block_alphas = conv_block_dims = conv_block_alphas = None
    if args.block_dims is not None or block_lr is not None:
        block_dims, block_alphas, conv_block_dims, conv_block_alphas = block_dims_and_alphas(
            is_sdxl, args.block_dims, args.block_alphas, network_dim, network_alpha,
            args.conv_block_dims, args.conv_block_alphas, args.conv_dim, conv_alpha,
        )
        for i, w in enumerate(block_lr or []):
            if w == 0:  # a block that is never trained needs no adapter (kohya)
                block_dims[i] = 0
                if conv_block_dims is not None:
                    conv_block_dims[i] = 0

    network = LoRANetwork(
        text_encoder, unet, multiplier=multiplier, lora_dim=network_dim, alpha=network_alpha,
        dropout=neuron_dropout, rank_dropout=args.rank_dropout, module_dropout=args.module_dropout,
        conv_lora_dim=args.conv_dim, conv_alpha=conv_alpha, block_dims=block_dims, block_alphas=block_alphas,
        conv_block_dims=conv_block_dims, conv_block_alphas=conv_block_alphas, varbose=True, is_sdxl=is_sdxl,
    )
    if args.loraplus_lr_ratio or args.loraplus_unet_lr_ratio or args.loraplus_text_encoder_lr_ratio:
        network.set_loraplus_lr_ratio(args.loraplus_lr_ratio, args.loraplus_unet_lr_ratio, args.loraplus_text_encoder_lr_ratio)
    if block_lr is not None:
        network.set_block_lr_weight(block_lr)
    return network


def read_network_file(file: str | os.PathLike | None, weights_sd: Mapping[str, torch.Tensor] | None, text_encoder: Any,
                      unet: Any) -> tuple[dict[str, torch.Tensor], dict[str, str], Family | None]:
    """A LoRA-format file (or ``weights_sd``) checked against the models and in their naming.

    Returns:
        ``(weights_sd, metadata, base_family)``: SDXL files with sgm UNet names renamed to the
        diffusers UNet's modules; ``base_family`` of the given models (None if unknown).

    Raises:
        ModelLoadError: unreadable file, or a LoRA made for another model family than ``unet``.
    """
    metadata: dict[str, str] = {}
    if weights_sd is None:
        weights_sd, metadata = load_state_dict_file(file)
    weights_sd = keys.add_text_model_prefix(weights_sd)
    text_encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    base = keys.family_of_models(unet, text_encoders)
    check_compatible(weights_sd, metadata, None, file, base_family=base)
    if keys.uses_sdxl_layout(base) and unet is not None:
        weights_sd = keys.rename_modules(weights_sd, keys.sdxl_diffusers_name_aliases(unet, unet_layout_of(unet)))
    return weights_sd, metadata, base


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: Any,
    text_encoder: Any,
    unet: Any,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """kohya's factory for an existing file: ranks and alphas are read per module from the weights.

    The weights are *not* loaded into the network (callers either ``load_weights`` or ``merge_to``).

    Returns:
        ``(network, weights_sd)``.

    Raises:
        ModelLoadError: unreadable file, or a LoRA made for another model family than ``unet``.
    """
    weights_sd, metadata, base = read_network_file(file, weights_sd, text_encoder, unet)
    modules_dim, modules_alpha = keys.dims_and_alphas(weights_sd)
    network = LoRANetwork(
        text_encoder, unet, multiplier=multiplier, modules_dim=modules_dim, modules_alpha=modules_alpha,
        is_sdxl=keys.uses_sdxl_layout(base),
    )
    check_compatible(weights_sd, metadata, network, file)
    # Ranks come from the file; of the --network_args only the block lr weights still apply.
    args = parse_network_args(kwargs)
    block_lr = block_lr_weights(network.is_sdxl, args.down_lr_weight, args.mid_lr_weight, args.up_lr_weight, args.block_lr_zero_threshold or 0.0)
    if block_lr is not None:
        network.set_block_lr_weight(block_lr)
    return network, weights_sd
