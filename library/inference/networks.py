"""Several networks (LoRA, LyCORIS, ...) at once for generation, each with its multiplier; hooked or merged.

kohya's gen_img conventions: ``--network_module`` / ``--network_weights`` / ``--network_mul`` /
``--network_args`` are parallel lists (one item per network; ``--network_args`` items are
``key=value;key=value``). sdtk checks the counts instead of filling gaps silently: one module
may stand for all files, ``--network_mul`` is empty (1.0 each) or one value per file.
``--network_merge`` adds every network into the base weights (faster, multiplier fixed);
``--network_merge_n_models N`` merges the first N and hooks the rest. A network whose module
cannot merge is hooked, with a warning.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from library.errors import ConfigError, ModelLoadError
from library.network_contract import capabilities_of
from library.training.plugin_compat import apply_fixes

logger = logging.getLogger(__name__)


@dataclass
class NetworkSpec:
    """One network to apply."""

    module: str
    weights: str
    multiplier: float = 1.0
    kwargs: dict[str, str] = field(default_factory=dict)


def network_specs(modules: Sequence[str] | None, weights: Sequence[str] | None, muls: Sequence[float] | None,
                  net_args: Sequence[str] | None) -> list[NetworkSpec]:
    """Check kohya's parallel network lists and pair them up (all problems at once).

    Raises:
        ConfigError: counts that do not match, a missing file, a malformed ``--network_args`` item.
    """
    modules, weights, muls, net_args = list(modules or []), list(weights or []), list(muls or []), list(net_args or [])
    problems = []
    if not weights:
        if modules or muls or net_args:
            problems.append("--network_module / --network_mul / --network_args need --network_weights (the files)")
        if problems:
            raise ConfigError(problems)
        return []
    n = len(weights)
    if not modules:
        problems.append("--network_weights needs --network_module (e.g. networks.lora)")
    elif len(modules) not in (1, n):
        problems.append(f"--network_module has {len(modules)} values for {n} --network_weights files; "
                        "give one module for all, or one per file")
    if muls and len(muls) != n:
        problems.append(f"--network_mul has {len(muls)} values for {n} --network_weights files; give one per file")
    if len(net_args) > n:
        problems.append(f"--network_args has {len(net_args)} items for {n} networks; give at most one per network")
    for w in weights:
        if not Path(w).is_file():
            problems.append(f"--network_weights {w}: file not found")
    kwargs_list = []
    for item in net_args:
        kw = {}
        for pair in filter(None, (p.strip() for p in item.split(";"))):
            if "=" not in pair:
                problems.append(f"--network_args {item!r}: items must look like key=value;key=value")
                continue
            k, v = pair.split("=", 1)
            kw[k.strip()] = v.strip()
        kwargs_list.append(kw)
    if problems:
        raise ConfigError(problems)
    return [NetworkSpec(modules[i] if len(modules) == n else modules[0], w, muls[i] if muls else 1.0,
                        kwargs_list[i] if i < len(kwargs_list) else {}) for i, w in enumerate(weights)]


def _import(module: str):
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        hint = " (pip install 'sdtk[lycoris]')" if module.startswith("lycoris") else ""
        raise ConfigError(f"--network_module {module}: cannot import it ({e}){hint}") from e
    apply_fixes(module, mod)  # known third-party bugs (lycoris 4.1 on SD UNets)
    return mod


def _show_meta(path: str) -> None:
    from safetensors import safe_open

    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            logger.info("metadata of %s: %s", path, f.metadata())


@torch.no_grad()
def attach_networks(specs: list[NetworkSpec], model: Any, *, merge_count: int = 0, dtype: torch.dtype,
                    device: torch.device, show_meta: bool = False) -> tuple[list[Any], list[float]]:
    """Create each network from its file and hook it into (or merge it into) ``model``'s modules.

    Args:
        model: a ``LoadedModel`` (its ``unet``, ``vae`` and ``text_encoders`` are used in place).
        merge_count: merge the first ``merge_count`` networks into the weights.

    Returns:
        the hooked networks, in order (their multiplier can still be changed), and their multipliers.
    """
    tes = list(model.text_encoders)
    hooked, muls = [], []
    for i, spec in enumerate(specs):
        mod = _import(spec.module)
        if show_meta:
            _show_meta(spec.weights)
        try:
            network, weights_sd = mod.create_network_from_weights(
                spec.multiplier, spec.weights, model.vae, tes, model.unet, for_inference=True, **spec.kwargs)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise ModelLoadError(f"--network_weights {spec.weights}: cannot create the network from this file "
                                 f"({str(e).splitlines()[0][:200]})") from e
        if network is None:
            raise ModelLoadError(f"--network_weights {spec.weights}: {spec.module} created no network from it")
        mergeable = capabilities_of(network).mergeable and network.is_mergeable()
        if i < merge_count and not mergeable:
            logger.warning("%s (%s) cannot be merged; it is hooked instead", spec.weights, spec.module)
        if i < merge_count and mergeable:
            network.merge_to(tes, model.unet, weights_sd, dtype, device)
            logger.info("merged %s (multiplier %s)", spec.weights, spec.multiplier)
            continue
        network.apply_to(tes, model.unet, True, True)  # lycoris insists on explicit flags
        info = network.load_state_dict(weights_sd, False)
        if getattr(info, "missing_keys", None):
            logger.warning("%s: %d network weights missing in the file", spec.weights, len(info.missing_keys))
        network.to(device, dtype).eval().requires_grad_(False)
        hooked.append(network)
        muls.append(spec.multiplier)
        logger.info("applied %s (multiplier %s)", spec.weights, spec.multiplier)
    return hooked, muls


def set_multipliers(networks: list[Any], multipliers: Sequence[float]) -> None:
    """Set the multiplier of each hooked network (kohya's per-prompt ``--am``)."""
    for net, m in zip(networks, multipliers):
        if not capabilities_of(net).set_multiplier:
            raise ConfigError(f"network {type(net).__name__} cannot change its multiplier (--am)")
        net.set_multiplier(m)
