"""The network-module contract the trainer relies on, and explicit optional capabilities.

A network module (``--network_module``) is any importable module with kohya's two factory functions::

    create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet,
                   neuron_dropout=None, **network_args) -> network
    create_network_from_weights(multiplier, file, vae, text_encoder, unet,
                                weights_sd=None, for_inference=False, **kwargs) -> (network, weights_sd)

The returned network is a ``torch.nn.Module`` with the methods of :class:`Network`. Some methods are
optional in kohya's world (``on_step_start``, ``apply_max_norm_regularization``,
``prepare_optimizer_params_with_multiple_te_lrs``...) and kohya's trainer discovers them with
``hasattr``. sdtk's own networks instead *declare* what they support in a class attribute
``SDTK_CAPABILITIES`` (a :class:`NetworkCapabilities`); :func:`capabilities_of` reads it, and only for
foreign modules (``lycoris.kohya`` and friends) falls back to probing, in this one place.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, runtime_checkable

__all__ = ["NetworkCapabilities", "Network", "capabilities_of", "call_prepare_optimizer_params"]


@dataclass(frozen=True)
class NetworkCapabilities:
    """Optional features of a network object.

    Attributes:
        on_step_start: has ``on_step_start(text_encoder, unet)``, called before each step.
        max_norm_regularization: has ``apply_max_norm_regularization(max_norm_value, device)``
            returning ``(keys_scaled, mean_norm, max_norm)`` (``--scale_weight_norms``).
        mergeable: ``is_mergeable()`` may be true and ``merge_to(...)`` exists.
        multiple_te_lrs: ``prepare_optimizer_params`` accepts a list of text-encoder learning rates
            (one per text encoder; SDXL's ``--text_encoder_lr lr1 lr2``).
        optimizer_params_tuple: ``prepare_optimizer_params`` returns ``(param_groups, descriptions)``
            rather than only the groups.
        set_multiplier: has ``set_multiplier(float)``.
        network_dropout: honours ``neuron_dropout`` / ``rank_dropout`` / ``module_dropout``.
        gradient_checkpointing: ``enable_gradient_checkpointing()`` does something (LoRA's hooks
            run inside the base module, so base-model checkpointing already covers them).
    """

    on_step_start: bool = False
    max_norm_regularization: bool = False
    mergeable: bool = False
    multiple_te_lrs: bool = False
    optimizer_params_tuple: bool = False
    set_multiplier: bool = False
    network_dropout: bool = False
    gradient_checkpointing: bool = False


@runtime_checkable
class Network(Protocol):
    """Methods every network object must have (kohya's required interface)."""

    def apply_to(self, text_encoder: Any, unet: Any, apply_text_encoder: bool = True, apply_unet: bool = True) -> None: ...

    def prepare_optimizer_params(self, text_encoder_lr: Any, unet_lr: Any, default_lr: Any) -> Any: ...

    def load_weights(self, file: str) -> Any: ...

    def save_weights(self, file: str, dtype: Any, metadata: dict[str, str] | None) -> None: ...

    def prepare_grad_etc(self, text_encoder: Any, unet: Any) -> None: ...

    def on_epoch_start(self, text_encoder: Any, unet: Any) -> None: ...

    def get_trainable_params(self) -> Iterable: ...

    def enable_gradient_checkpointing(self) -> None: ...


def capabilities_of(network: Any) -> NetworkCapabilities:
    """What ``network`` supports: its declaration if it has one, else what a probe finds.

    Foreign networks are probed conservatively: ``optimizer_params_tuple`` is unknown until
    ``prepare_optimizer_params`` is called, so use :func:`call_prepare_optimizer_params`, which
    accepts both return shapes.
    """
    declared = getattr(type(network), "SDTK_CAPABILITIES", None)
    if isinstance(declared, NetworkCapabilities):
        return declared

    def has(name: str) -> bool:
        return callable(getattr(network, name, None))

    return NetworkCapabilities(
        on_step_start=has("on_step_start"),
        max_norm_regularization=has("apply_max_norm_regularization"),
        mergeable=has("is_mergeable") and has("merge_to"),
        multiple_te_lrs=has("prepare_optimizer_params_with_multiple_te_lrs"),
        optimizer_params_tuple=False,
        set_multiplier=has("set_multiplier"),
        network_dropout=False,
        gradient_checkpointing=False,
    )


def call_prepare_optimizer_params(
    network: Any, text_encoder_lr: float | list[float] | None, unet_lr: float | None, default_lr: float | None
) -> tuple[list, list[str] | None]:
    """Call ``prepare_optimizer_params`` with kohya's conventions and normalise the result.

    ``text_encoder_lr`` may be a list (one per text encoder); networks that cannot take a list get
    its first element, as kohya's trainer does. Old networks whose method takes two arguments are
    called with two. Returns ``(param_groups, descriptions or None)``.
    """
    caps = capabilities_of(network)
    te_lr: Any = text_encoder_lr
    if isinstance(te_lr, (list, tuple)):
        if caps.multiple_te_lrs:
            te_lr = list(te_lr)
        else:
            te_lr = te_lr[0] if te_lr else None
    if caps.multiple_te_lrs and not isinstance(getattr(type(network), "SDTK_CAPABILITIES", None), NetworkCapabilities):
        method = network.prepare_optimizer_params_with_multiple_te_lrs
    else:
        method = network.prepare_optimizer_params
    # Old networks take (text_encoder_lr, unet_lr) only. Check the signature rather than catching
    # TypeError around the call, which would also swallow real errors raised inside the method.
    try:
        inspect.signature(method).bind(te_lr, unet_lr, default_lr)
        takes_default = True
    except (TypeError, ValueError):
        takes_default = False
    result = method(te_lr, unet_lr, default_lr) if takes_default else method(te_lr, unet_lr)
    if isinstance(result, tuple):
        return list(result[0]), list(result[1]) if result[1] is not None else None
    return list(result), None
