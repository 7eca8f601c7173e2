"""Extended Textual Inversion (XTI, "P+"): one text conditioning per cross-attention layer of an SD 1.x UNet.

kohya names the 16 cross-attention layers of SD 1.x after the original (CompVis) layout's blocks;
in diffusers' ``UNet2DConditionModel`` they are the ``Transformer2DModel`` modules

====================  =================================  =======================
kohya layer           diffusers module                   original layout
====================  =================================  =======================
IN01, IN02            ``down_blocks.0.attentions.0/1``   ``input_blocks.1/2.1``
IN04, IN05            ``down_blocks.1.attentions.0/1``   ``input_blocks.4/5.1``
IN07, IN08            ``down_blocks.2.attentions.0/1``   ``input_blocks.7/8.1``
MID                   ``mid_block.attentions.0``         ``middle_block.1``
OUT03, OUT04, OUT05   ``up_blocks.1.attentions.0/1/2``   ``output_blocks.3-5.1``
OUT06, OUT07, OUT08   ``up_blocks.2.attentions.0/1/2``   ``output_blocks.6-8.1``
OUT09, OUT10, OUT11   ``up_blocks.3.attentions.0/1/2``   ``output_blocks.9-11.1``
====================  =================================  =======================

(IN00/03/06/09-11 and OUT00-02 hold no attention.) This is the order of kohya's ``XTI_LAYERS``
and of its hijacked forward (``encoder_hidden_states[0:6]`` down, ``[6]`` mid, ``[7:16]`` up).

**Mechanism.** kohya replaces the ``forward`` of diffusers' UNet and block classes globally. sdtk
keeps diffusers untouched: the per-layer states travel through the UNet call's
``cross_attention_kwargs`` (diffusers hands that dict unchanged to every block and transformer),
under the key :data:`XTI_KWARG`, as one tensor ``[16, B, L, D]``. :func:`enable_per_block_conditioning`
registers a forward pre-hook on each of the 16 ``Transformer2DModel`` instances of one UNet; the hook
takes the dict entry out and gives the transformer its own layer's ``[B, L, D]`` as
``encoder_hidden_states``. Hooks, not attention processors, because they work with whatever processor
is installed (SDPA, xformers, sdtk's LoRA hooks on the projections) and keep the extra key away from
the self-attention processors, which would warn about it. A UNet call without the key runs exactly as
before, so a hooked UNet can also be used normally; with 16 equal states the output is bit-identical to
the plain call with that state (the transformers receive the very same tensor values).

**Files** (kohya's layout, read by kohya's gen_img): one tensor ``[n, D]`` per layer name, ``n``
vectors for the token; sdtk also writes metadata naming the token and the vector count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from library.errors import ConfigError, ModelLoadError
from library.models.embedding_file import read_state

XTI_LAYERS: tuple[str, ...] = (
    "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
    "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
)
N_LAYERS = len(XTI_LAYERS)
XTI_KWARG = "xti_hidden_states"

# diffusers module of each layer, in XTI_LAYERS order
_MODULES = [f"down_blocks.{b}.attentions.{i}" for b in range(3) for i in range(2)] + ["mid_block.attentions.0"] + \
    [f"up_blocks.{b}.attentions.{i}" for b in range(1, 4) for i in range(3)]
LAYER_MODULES: dict[str, str] = dict(zip(XTI_LAYERS, _MODULES))


def cross_attention_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The 16 cross-attention transformers of an SD 1.x-layout UNet, in :data:`XTI_LAYERS` order.

    Raises:
        ConfigError: the UNet does not have SD 1.x's layout (SD 2.x has it too, but XTI files are
            SD 1.x only; callers check the family).
    """
    names = dict(unet.named_modules())
    found = [names.get(n) for n in _MODULES]
    n_transformers = sum(type(m).__name__ == "Transformer2DModel" for m in names.values())
    if any(m is None or type(m).__name__ != "Transformer2DModel" for m in found) or n_transformers != N_LAYERS:
        raise ConfigError(f"Extended Textual Inversion needs the SD 1.x UNet layout (16 cross-attention layers "
                          f"{', '.join(XTI_LAYERS)}); this UNet has {n_transformers} transformer blocks")
    return found


class PerBlockConditioning:
    """Pre-hooks on one UNet's 16 cross-attention transformers (see the module doc); ``remove()`` undoes them.

    Usable as a context manager: ``with enable_per_block_conditioning(unet): ...``.
    """

    def __init__(self, unet: torch.nn.Module):
        self.handles = [m.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, m in enumerate(cross_attention_layers(unet))]

    @staticmethod
    def _hook(index: int):
        def pre(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
            extra = kwargs.get("cross_attention_kwargs")
            if not extra or XTI_KWARG not in extra:
                return None
            states = extra[XTI_KWARG]
            rest = {k: v for k, v in extra.items() if k != XTI_KWARG}
            hidden = args[0] if args else kwargs["hidden_states"]
            if states.ndim != 4 or states.shape[0] != N_LAYERS or states.shape[1] != hidden.shape[0]:
                raise ValueError(f"{XTI_KWARG} must be [{N_LAYERS}, batch {hidden.shape[0]}, tokens, width], "
                                 f"got {list(states.shape)}")
            return args, {**kwargs, "encoder_hidden_states": states[index], "cross_attention_kwargs": rest or None}

        return pre

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> "PerBlockConditioning":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def enable_per_block_conditioning(unet: torch.nn.Module) -> PerBlockConditioning:
    """Let ``unet`` take per-layer states in ``cross_attention_kwargs[XTI_KWARG]`` (see :func:`per_block_kwargs`)."""
    return PerBlockConditioning(unet)


def per_block_kwargs(states: torch.Tensor, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``cross_attention_kwargs`` for a hooked UNet: ``states`` ``[16, B, L, D]`` (``XTI_LAYERS`` order)."""
    return {**(extra or {}), XTI_KWARG: states}


def predict_per_block(unet: torch.nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                      states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Output ``[B, C, h, w]`` of a hooked ``unet`` with ``states`` ``[16, B, L, D]``, one per cross-attention layer.

    The UNet's own ``encoder_hidden_states`` argument gets the MID layer's states (every transformer
    is given its own, so it is only a placeholder of the right shape).
    """
    extra = per_block_kwargs(states, kwargs.pop("cross_attention_kwargs", None))
    return unet(sample, timesteps, states[XTI_LAYERS.index("MID")], cross_attention_kwargs=extra,
                return_dict=False, **kwargs)[0]


# ---------------------------------------------------------------------------------------------- files
def xti_state_dict(vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """kohya's XTI layout ``{LAYER: [n, D]}`` from ``vectors`` ``[16, n, D]``."""
    if vectors.ndim != 3 or vectors.shape[0] != N_LAYERS:
        raise ValueError(f"XTI vectors must be [{N_LAYERS}, n, D], got {list(vectors.shape)}")
    return {name: vectors[i].detach().cpu().contiguous().clone() for i, name in enumerate(XTI_LAYERS)}


def is_xti_state(state: dict[str, Any]) -> bool:
    """Whether ``state`` has exactly kohya's 16 layer keys."""
    return set(state) == set(XTI_LAYERS)


def parse_xti_state(state: dict[str, Any], where: str) -> torch.Tensor:
    """``[16, n, D]`` float32 from a ``{LAYER: [n, D]}`` dict.

    Raises:
        ModelLoadError: other keys, or tensors of another shape, or layers of different shapes.
    """
    if not is_xti_state(state):
        missing = [k for k in XTI_LAYERS if k not in state]
        other = [str(k) for k in state if k not in XTI_LAYERS]
        detail = (f"missing {', '.join(missing[:4])}" if missing else "") + \
            ("; " if missing and other else "") + (f"unexpected {', '.join(other[:4])}" if other else "")
        hint = " (a plain embedding: use --textual_inversion_embeddings)" if "emb_params" in state else ""
        raise ModelLoadError(f"{where}: not an XTI embedding: an XTI file has one tensor per layer "
                             f"{XTI_LAYERS[0]} ... {XTI_LAYERS[-1]} ({detail}){hint}")
    parts = []
    for name in XTI_LAYERS:
        t = state[name]
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.numel() == 0:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ModelLoadError(f"{where}: layer {name} is {shape}, not a [vectors, width] embedding")
        if parts and t.shape != parts[0].shape:
            raise ModelLoadError(f"{where}: layer {name} is {list(t.shape)} but {XTI_LAYERS[0]} is "
                                 f"{list(parts[0].shape)}; every layer must have the same vectors and width")
        parts.append(t.float())
    return torch.stack(parts)


def read_xti_file(path: str | Path, flag: str, allow_pickle: bool = False) -> torch.Tensor:
    """Read an XTI file (``.safetensors``; ``.pt`` / ``.ckpt`` pickles with ``allow_pickle``) -> ``[16, n, D]``.

    Args:
        flag: the flag that named the file, for messages.

    Raises:
        ConfigError: a missing file, an unknown suffix, a pickle without ``allow_pickle``.
        ModelLoadError: an unreadable file or not kohya's XTI layout.
    """
    path = Path(path)
    where = f"{flag} {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: file not found")
    return parse_xti_state(read_state(path, allow_pickle, flag), where)


def layer_token_names(word: str, n_vectors: int, layer: str) -> list[str]:
    """The tokens that carry ``word``'s vectors for ``layer``: ``word_in01``, ``word_in01_1``, ... (lower case:
    CLIP lower-cases prompts). The ``_1`` suffixes are diffusers' multi-vector names."""
    base = f"{word}_{layer.lower()}"
    return [base] + [f"{base}_{i}" for i in range(1, n_vectors)]


__all__ = [
    "XTI_LAYERS", "XTI_KWARG", "LAYER_MODULES", "cross_attention_layers", "enable_per_block_conditioning",
    "per_block_kwargs", "predict_per_block", "xti_state_dict", "parse_xti_state", "read_xti_file",
    "is_xti_state", "layer_token_names",
]
