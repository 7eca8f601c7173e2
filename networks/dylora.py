"""DyLoRA network module (``--network_module networks.dylora``), kohya sd-scripts' interface and file format.

DyLoRA (Valipour et al., 2023) trains one LoRA whose leading ranks are usable alone: at each step a
number of units ``b`` is drawn uniformly from ``1 .. network_dim / unit``, the adapters compute with
only their first ``b * unit`` ranks (scale ``alpha / (b * unit)``), and only the ``b``-th unit
(ranks ``(b-1)*unit .. b*unit-1``) is trained in that step; the lower units are frozen for the step,
as in kohya's implementation. A rank-``r`` slice of the file (see
:mod:`networks.extract_lora_from_dylora`) is then exactly what was trained at ``b * unit = r``.

Differences from kohya's ``networks/dylora.py``, on purpose:

* kohya adds *all* ranks in the forward and rescales by ``sqrt(dim / r)``, so a rank-``r`` slice was
  never what the model computed in training; here the forward is truncated (the DyLoRA paper).
* kohya draws the rank in every module's forward (different ranks per layer, and a different one
  again when gradient checkpointing recomputes); here one draw per step, in ``on_step_start``,
  seeded by the trainer's per-step seed, is shared by all modules.
* the frozen units get no gradient at all (``grad is None``), so the optimizer leaves them and their
  moments untouched, as kohya's ``requires_grad`` toggling does.
* dropouts, ``conv_alpha``, SDXL's ``lora_te1_``/``lora_te2_`` prefixes and sgm UNet names,
  merging and ``--scale_weight_norms`` work as in :mod:`networks.lora`.

The saved file is a plain kohya LoRA (``lora_down.weight``, ``lora_up.weight``, ``alpha``); the
rank units are separate parameters in memory and are concatenated in the state dict.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from library.errors import ConfigError
from networks import lora_keys as keys
from networks.lora import LoRANetwork, read_network_file
from networks.lora_args import VALID_KEYS as LORA_KEYS
from networks.lora_args import parse_network_args
from networks.lora_io import check_compatible
from networks.lora_modules import LoRAModule

logger = logging.getLogger(__name__)

SOURCE = "--network_args (networks.dylora)"
# networks.lora keys DyLoRA also takes (kohya's DyLoRA: conv_dim, conv_alpha, unit, LoRA+ ratios;
# the dropouts are sdtk additions, with networks.lora's meaning).
_SHARED_KEYS = (
    "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout",
    "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
)
VALID_KEYS = ("unit",) + _SHARED_KEYS


class UnitStack(torch.nn.ParameterList):
    """One LoRA weight kept as rank units (separate parameters), saved as the whole kohya tensor.

    Args:
        weight: ``lora_down`` (rank, in[, k, k]) split along dim 0, or ``lora_up`` (out, rank[, 1, 1])
            split along dim 1.
        unit: ranks per unit.
        rank_dim: 0 for ``lora_down``, 1 for ``lora_up``.
    """

    def __init__(self, weight: torch.Tensor, unit: int, rank_dim: int) -> None:
        super().__init__([torch.nn.Parameter(w.detach().clone()) for w in weight.split(unit, dim=rank_dim)])
        self.unit, self.rank_dim = unit, rank_dim

    @property
    def weight(self) -> torch.Tensor:
        """All units concatenated: the tensor a kohya LoRA file stores."""
        return torch.cat(list(self), dim=self.rank_dim)

    def first(self, n_units: int, train_last_only: bool) -> torch.Tensor:
        """The first ``n_units`` units concatenated; with ``train_last_only`` the others are detached."""
        parts = [self[i].detach() if train_last_only and i < n_units - 1 else self[i] for i in range(n_units)]
        return torch.cat(parts, dim=self.rank_dim)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 (torch's hook signature)
        w = self.weight
        destination[prefix + "weight"] = w if keep_vars else w.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # noqa: ANN001
        key = prefix + "weight"
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != key)
        if key not in state_dict:
            missing_keys.append(key)
            return
        value, own = state_dict[key], self.weight
        if value.shape != own.shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                              f"the parameter in the current model has shape {tuple(own.shape)}")
            return
        with torch.no_grad():
            for p, v in zip(self, value.split(self.unit, dim=self.rank_dim)):
                p.copy_(v)


class DyLoRAModule(LoRAModule):
    """A :class:`LoRAModule` whose ranks are trained in units, truncated to ``trained_units`` in training.

    Args:
        unit: ranks per unit; must divide ``lora_dim``.
        Others: as :class:`~networks.lora_modules.LoRAModule`.

    Attributes:
        trained_units: set by the network each step; in training mode the adapter computes with the
            first ``trained_units`` units and trains only the last of them. ``None`` (or eval mode):
            all ranks, all trainable (a plain LoRA).
    """

    def __init__(self, lora_name: str, org_module: torch.nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | torch.Tensor | None = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None, unit: int = 1) -> None:
        if unit <= 0 or int(lora_dim) % unit:
            raise ConfigError(f"{lora_name}: rank {lora_dim} is not a multiple of unit={unit}", source=SOURCE)
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, dropout, rank_dropout, module_dropout)
        self.unit = unit
        self.n_units = self.lora_dim // unit
        self.trained_units: int | None = None
        # The base class made Linear/Conv2d layers (kohya's init); keep their weights as units.
        self._conv = (org_module.stride, org_module.padding) if self.is_conv else None
        self.lora_down = UnitStack(self.lora_down.weight, unit, 0)
        self.lora_up = UnitStack(self.lora_up.weight, unit, 1)

    def _down(self, x: torch.Tensor) -> tuple[torch.Tensor, int, float, Callable[[torch.Tensor], torch.Tensor]]:
        """The first ``trained_units`` units in training (all units in eval mode); the scale is
        alpha / rank, what a rank-r slice of the saved file computes. The rest of the forward
        (dropouts, multiplier) is :class:`~networks.lora_modules.LoRAModule`'s."""
        dynamic = self.training and self.trained_units is not None
        n = min(self.trained_units, self.n_units) if dynamic else self.n_units
        down, up = self.lora_down.first(n, dynamic), self.lora_up.first(n, dynamic)
        rank = n * self.unit
        x = x.to(down.dtype)
        lx = F.conv2d(x, down, stride=self._conv[0], padding=self._conv[1]) if self._conv else F.linear(x, down)
        up_fn = (lambda t: F.conv2d(t, up)) if self._conv else (lambda t: F.linear(t, up))
        return lx, rank, self.scale * self.lora_dim / rank, up_fn


class DyLoRANetwork(LoRANetwork):
    """:class:`~networks.lora.LoRANetwork` of :class:`DyLoRAModule` adapters with a per-step rank draw.

    Args:
        unit: ranks per unit; every adapter's rank must be a multiple of it.
        Others: as :class:`~networks.lora.LoRANetwork`.
    """

    def __init__(self, text_encoder: Any, unet: Any, multiplier: float = 1.0, lora_dim: int = 4, alpha: float = 1.0,
                 unit: int = 1, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, conv_lora_dim: int | None = None, conv_alpha: float | None = None,
                 modules_dim: Mapping[str, int] | None = None, modules_alpha: Mapping[str, float] | None = None,
                 varbose: bool = False, is_sdxl: bool | None = None) -> None:
        dims = dict(modules_dim) if modules_dim is not None else {"--network_dim": lora_dim, "conv_dim": conv_lora_dim}
        bad = [f"{name}={d} is not a multiple of unit={unit}" for name, d in dims.items() if d is not None and d % unit]
        if bad:
            raise ConfigError(bad[:5] + ([f"and {len(bad) - 5} more"] if len(bad) > 5 else []), source=SOURCE)
        super().__init__(
            text_encoder, unet, multiplier=multiplier, lora_dim=lora_dim, alpha=alpha, dropout=dropout,
            rank_dropout=rank_dropout, module_dropout=module_dropout, conv_lora_dim=conv_lora_dim,
            conv_alpha=conv_alpha, modules_dim=modules_dim, modules_alpha=modules_alpha,
            module_class=functools.partial(DyLoRAModule, unit=unit), varbose=varbose, is_sdxl=is_sdxl,
        )
        self.unit = unit
        self.trained_units: int | None = None
        logger.info("DyLoRA: unit %d, up to %d units", unit, self.max_units)

    @property
    def max_units(self) -> int:
        return max((lora.n_units for lora in self.all_loras), default=0)

    def set_trained_units(self, n_units: int | None) -> None:
        """Train (and compute with) the first ``n_units`` units from now on; ``None``: all ranks."""
        self.trained_units = n_units
        for lora in self.all_loras:
            lora.trained_units = n_units

    def on_step_start(self, text_encoder: Any, unet: Any) -> None:
        """Draw this step's number of units ``b``, uniform in ``1 .. max_units`` (torch's RNG, seeded per step)."""
        if self.max_units:
            self.set_trained_units(int(torch.randint(1, self.max_units + 1, (1,)).item()))

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device: Any) -> tuple[int, float, float]:
        """As :meth:`LoRANetwork.apply_max_norm_regularization`, scaling the unit parameters in place."""
        keys_scaled, norms = 0, []
        for lora in self.all_loras:
            norm = lora.delta_weight(lora.lora_up.weight.to(device), lora.lora_down.weight.to(device), 1.0).norm()
            floored = norm.clamp(min=max_norm_value / 2)  # kohya's formula: tiny norms are not scaled up
            ratio = (floored.clamp(max=max_norm_value) / floored).cpu()
            if ratio != 1:
                keys_scaled += 1
                for p in list(lora.lora_up) + list(lora.lora_down):
                    p.mul_(ratio.sqrt().to(p))
            norms.append((norm.cpu() * ratio).item())
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)


def parse_dylora_args(kwargs: Mapping[str, Any], network_dim: int | None = None) -> tuple[int, Any]:
    """``(unit, LoRAArgs)`` from ``--network_args``; every problem is reported at once.

    Raises:
        ConfigError: unknown keys (LoRA-only keys named as such), bad values, ``conv_dim`` other
            than ``network_dim`` (kohya's rule: one rank ladder for all modules).
    """
    problems: list[str] = []
    unit = 1
    raw_unit = kwargs.get("unit")
    if raw_unit is not None:
        try:
            unit = int(str(raw_unit).strip())
            if unit <= 0:
                raise ValueError(raw_unit)
        except ValueError:
            problems.append(f"unit={raw_unit!r} is invalid: expected a positive integer (ranks per DyLoRA unit)")
    shared = {k: v for k, v in kwargs.items() if k in _SHARED_KEYS}
    for key in kwargs:
        if key not in VALID_KEYS:
            hint = " — it is an argument of networks.lora, which DyLoRA does not take" if key in LORA_KEYS else ""
            problems.append(f"unknown key {key!r}{hint}")
    try:
        args = parse_network_args(shared)
    except ConfigError as e:
        problems += [p for p in e.problems if not p.startswith("valid keys:")]
        args = None
    if args is not None and args.conv_dim is not None and network_dim is not None and args.conv_dim != network_dim:
        problems.append(f"conv_dim={args.conv_dim} must equal --network_dim ({network_dim}) for DyLoRA, as in kohya")
    if not problems and network_dim is not None and network_dim % unit:
        problems.append(f"--network_dim {network_dim} is not a multiple of unit={unit}: use a unit that divides it")
    if problems:
        raise ConfigError(problems + ["valid keys: " + ", ".join(VALID_KEYS)], source=SOURCE)
    return unit, args


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: Any, unet: Any, neuron_dropout: float | None = None, **kwargs: Any) -> DyLoRANetwork:
    """kohya's factory: a fresh DyLoRA network (``--network_dim`` is the largest rank).

    Args:
        text_encoder: a CLIP text model, or ``[te1, te2]`` for SDXL.
        neuron_dropout: ``--network_dropout``.
        kwargs: ``--network_args``: ``unit`` (default 1), ``conv_dim`` (= ``network_dim``; adds the 3x3
            convs), ``conv_alpha`` (default 1), dropouts, LoRA+ ratios.

    Raises:
        ConfigError: unknown keys or bad values, all listed at once.
    """
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    unit, args = parse_dylora_args(kwargs, network_dim)
    conv_alpha = (args.conv_alpha if args.conv_alpha is not None else 1.0) if args.conv_dim is not None else None
    tes = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    network = DyLoRANetwork(
        text_encoder, unet, multiplier=multiplier, lora_dim=network_dim, alpha=network_alpha, unit=unit,
        dropout=neuron_dropout if neuron_dropout is not None else args.dropout, rank_dropout=args.rank_dropout,
        module_dropout=args.module_dropout, conv_lora_dim=args.conv_dim, conv_alpha=conv_alpha, varbose=True,
        is_sdxl=keys.uses_sdxl_layout(keys.family_of_models(unet, tes)),
    )
    if args.loraplus_lr_ratio or args.loraplus_unet_lr_ratio or args.loraplus_text_encoder_lr_ratio:
        network.set_loraplus_lr_ratio(args.loraplus_lr_ratio, args.loraplus_unet_lr_ratio, args.loraplus_text_encoder_lr_ratio)
    return network


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoder: Any,
                                unet: Any, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, **kwargs: Any) -> tuple[DyLoRANetwork, dict[str, torch.Tensor]]:
    """kohya's factory for an existing file (``--dim_from_weights``, inference): ranks and alphas per module
    from the weights, ``unit`` from ``kwargs`` (default 1). The weights are not loaded.

    Raises:
        ModelLoadError: unreadable file, or a LoRA made for another model family.
        ConfigError: a rank in the file that is not a multiple of ``unit``.
    """
    weights_sd, metadata, base = read_network_file(file, weights_sd, text_encoder, unet)
    unit, args = parse_dylora_args(kwargs)
    modules_dim, modules_alpha = keys.dims_and_alphas(weights_sd)
    network = DyLoRANetwork(
        text_encoder, unet, multiplier=multiplier, unit=unit, lora_dim=max(modules_dim.values(), default=unit),
        modules_dim=modules_dim, modules_alpha=modules_alpha, is_sdxl=keys.uses_sdxl_layout(base),
        dropout=args.dropout, rank_dropout=args.rank_dropout, module_dropout=args.module_dropout,
    )
    check_compatible(weights_sd, metadata, network, file)
    return network, weights_sd
