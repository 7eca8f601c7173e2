"""The model-family interface: what differs between SD1.x, SD2.x, SDXL (and any family added later).

A family is two objects, both defined in the family's own module (:mod:`.sd1`, :mod:`.sd2`,
:mod:`.sdxl`) and registered there with :func:`register`:

* a :class:`Family` — the facts: its name, how to recognise its checkpoints, its tokenizers,
  the original-layout prefixes of its text encoders, its modelspec strings, the tiny test model,
  latent scale, bucket multiple, LoRA key layout. A ``Family`` is a ``str`` (its name, what users
  write: ``sd1``), one instance per family, so ``family is Family.SDXL``, ``Family("sdxl")``,
  ``family.value``, ``family.pretty`` and ``for f in Family`` work as they did with the enum.
* a :class:`FamilyAdapter` (``family.adapter()``) — the behaviour the trainer, the text-encoder
  cache and sampling call: tokenize, encode, predict, pipeline class.

Adding a family means one module: subclass :class:`Family` (or an existing family, for a variant
such as a tiny or v-prediction flavour), subclass :class:`FamilyAdapter` if its conditioning
differs, and ``register`` an instance. ``Family.<NAME>`` then finds it (the name upper-cased).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterator, Mapping

import torch

# ------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, "Family"] = {}


class _FamilyMeta(type):
    """``Family("sd1")`` looks a registered family up; ``Family.SD1``, ``iter(Family)``, ``len(Family)``
    and ``x in Family`` see the registry, as they saw an enum's members."""

    def __call__(cls, value: Any = None, *args: Any, **kwargs: Any):
        if cls is Family:
            return get(value)
        return super().__call__(*args, **kwargs)

    def __getattr__(cls, name: str):
        if name.isupper():
            for family in _REGISTRY.values():
                if family.constant == name:
                    return family
        raise AttributeError(f"type object {cls.__name__!r} has no attribute {name!r}")

    def __iter__(cls) -> Iterator["Family"]:
        return iter(list(_REGISTRY.values()))

    def __len__(cls) -> int:
        return len(_REGISTRY)

    def __contains__(cls, item: object) -> bool:
        return isinstance(item, str) and str(item) in _REGISTRY


def register(family: "Family") -> "Family":
    """Register ``family`` (an instance) under its name; a second family of the same name is an error."""
    if not isinstance(family, Family) or not family.value:
        raise TypeError("register() takes a Family instance with a name (value)")
    if family.value in _REGISTRY:
        raise RuntimeError(f"a model family named {family.value!r} is already registered")
    _REGISTRY[family.value] = family
    return family


def unregister(family: "Family") -> None:
    """Remove ``family`` from the registry (tests that register a family of their own clean up with it)."""
    if _REGISTRY.get(family.value) is family:
        del _REGISTRY[family.value]


def get(name: "str | Family") -> "Family":
    """The registered family named ``name`` (``"sd1"``; a Family is returned as is)."""
    family = _REGISTRY.get(str(name)) if isinstance(name, str) else None
    if family is None:
        raise ValueError(f"{name!r} is not a model family sdtk knows (known: {', '.join(_REGISTRY)})")
    return family


def families() -> list["Family"]:
    """Every registered family, in registration order (built-ins first)."""
    return list(_REGISTRY.values())


def detection_order() -> list["Family"]:
    """Families in the order checkpoints are matched against them: variants (which refine the key
    test of their base family) before the rest, each group in registration order."""
    fams = families()
    return [f for f in fams if f.base is not None] + [f for f in fams if f.base is None]


class FamilyFacts(Mapping):
    """A read-only ``{Family: value}`` view of one per-family attribute (``TOKENIZER_IDS[Family.SD1]``)."""

    def __init__(self, attribute: str):
        self._attribute = attribute

    def __getitem__(self, family: "str | Family") -> Any:
        return getattr(get(family), self._attribute)

    def __iter__(self) -> Iterator["Family"]:
        return iter(families())

    def __len__(self) -> int:
        return len(_REGISTRY)


# -------------------------------------------------------------------------------------- facts
@dataclass(frozen=True)
class TinyTextEncoder:
    """One text encoder of a family's tiny test model (see :mod:`library.models.tiny`)."""

    width: int
    act: str  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP)
    projection: bool = False  # CLIPTextModelWithProjection
    pad_token: str = "<|endoftext|>"


class Family(str, metaclass=_FamilyMeta):
    """A Stable Diffusion model family and the facts that differ between families (module docstring).

    Subclasses set the class attributes and override the methods; the defaults are SD1.x's.
    """

    value: str = ""  # the name users write (``--family sd1``), also stored in embedded model configs
    pretty: str = ""  # for messages: "SD1.x"
    base: "Family | None" = None  # a variant of this family: its scripts, LoRA layout and key test
    train_network_script: str = "train_network.py"
    v2: bool = False  # kohya's ``--v2`` (SD2.x text encoder and layout)

    # tokenizers: kohya's hub ids (also the folder names in --tokenizer_cache_dir) and pad tokens
    tokenizer_ids: tuple[tuple[str, str | None], ...] = (("openai/clip-vit-large-patch14", None),)
    tokenizer_pads: tuple[str | None, ...] = (None,)
    # text encoders: transformers classes, and where each lives in the original single-file layout
    # (prefix, is OpenCLIP layout)
    text_encoder_classes: tuple[str, ...] = ("CLIPTextModel",)
    te_prefixes: tuple[tuple[str, bool], ...] = (("cond_stage_model.transformer.", False),)
    pads_last_te_layer: bool = False  # write a dummy last OpenCLIP layer diffusers drops (SD2)

    lora_key_layout: str = "sd"  # LoRA module names: "sd" (diffusers paths) or "sdxl" (sgm paths)
    bucket_multiple: int | None = None  # bucket sides (px) must be multiples of this; None: no rule
    supports_te_cache: bool = False  # --cache_text_encoder_outputs
    size_conditioning: bool = False  # the UNet also takes the pooled text embedding and size/crop ids (SDXL)
    latent_scale: float = 0.18215  # the real VAE's scaling_factor
    latent_shift: float = 0.0  # the real VAE's shift_factor (0: none)
    pipeline_name: str = "StableDiffusionPipeline"  # diffusers class (model_index.json, sampling)
    scheduler_name: str = "DDIMScheduler"  # what a saved diffusers folder's model_index names
    modelspec_lora_sgm: bool = False  # LoRAs name Stability's repo as implementation (SDXL)
    default_resolution: tuple[int, int] = (512, 512)
    shipped_config: str = ""  # library/models/configs/<name>.json: the real architecture

    def __new__(cls) -> "Family":
        if not cls.value:
            raise TypeError(f"{cls.__name__} has no value (family name)")
        return super().__new__(cls, cls.value)

    # enum-like behaviour -----------------------------------------------------------------------
    @property
    def constant(self) -> str:
        """The attribute name on :class:`Family` (``Family.SD1``)."""
        return self.value.upper()

    def __repr__(self) -> str:
        return f"<Family.{self.constant}: {self.value!r}>"

    def __reduce__(self):  # pickling (data loader workers) gives back the registered instance
        return (Family, (self.value,))

    def __copy__(self) -> "Family":
        return self

    def __deepcopy__(self, memo: dict) -> "Family":
        return self

    # derived facts -----------------------------------------------------------------------------
    @property
    def n_text_encoders(self) -> int:
        return len(self.text_encoder_classes)

    @property
    def root(self) -> "Family":
        """The built-in family this one is (a variant of)."""
        return self if self.base is None else self.base.root

    def is_a(self, other: "Family") -> bool:
        """``other`` is this family or one it is a variant of."""
        return self is other or (self.base is not None and self.base.is_a(other))

    # detection ---------------------------------------------------------------------------------
    def detect_keys(self, keys: set[str], config: Mapping | None) -> bool:
        """Whether an original-layout checkpoint with ``keys`` (and embedded sdtk ``config``, or None)
        is of this family (a built-in family's own test; see :meth:`matches_keys`)."""
        raise NotImplementedError(f"{type(self).__name__}.detect_keys")

    def detect_diffusers(self, unet_config: Mapping, te_config: Mapping, model_index: Mapping) -> bool:
        """Whether a diffusers folder with these configs is of this family (see :meth:`matches_diffusers`)."""
        raise NotImplementedError(f"{type(self).__name__}.detect_diffusers")

    def matches_keys(self, keys: set[str], config: Mapping | None) -> bool:
        """:meth:`detect_keys`; a variant: its base's test and its own name in the embedded config
        (a variant shares its base's keys; sdtk records the family in every file it saves)."""
        if self.base is None:
            return self.detect_keys(keys, config)
        return self.base.matches_keys(keys, config) and (config or {}).get("family") == self.value

    def matches_diffusers(self, unet_config: Mapping, te_config: Mapping, model_index: Mapping) -> bool:
        """:meth:`detect_diffusers`; a variant: its base's test and its name under ``_sdtk_family`` in
        model_index.json (written by :meth:`model_index_extras`)."""
        if self.base is None:
            return self.detect_diffusers(unet_config, te_config, model_index)
        return self.base.matches_diffusers(unet_config, te_config, model_index) and \
            model_index.get("_sdtk_family") == self.value

    # configs -----------------------------------------------------------------------------------
    def full_config(self, v_parameterization: bool = False) -> dict:
        """The diffusers configs of the family's real architecture (shipped with sdtk, never downloaded)."""
        name = self.shipped_config or self.root.value
        cfg = json.loads(resources.files("library.models").joinpath(f"configs/{name}.json").read_text())
        cfg["family"] = self.value
        if v_parameterization:
            cfg["scheduler"]["prediction_type"] = "v_prediction"
        return cfg

    def model_index_extras(self) -> dict:
        """Family-specific entries of a saved diffusers folder's model_index.json."""
        extras: dict = dict(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        if self.base is not None:
            extras["_sdtk_family"] = self.value
        return extras

    # metadata ----------------------------------------------------------------------------------
    modelspec_architectures: tuple[str, ...] = ("stable-diffusion-v1",)

    def modelspec_architecture(self, v_parameterization: bool) -> str:
        """``modelspec.architecture`` without an adapter suffix."""
        return self.modelspec_architectures[0]

    def resolution(self, v_parameterization: bool) -> tuple[int, int]:
        """Default training / modelspec resolution (W, H)."""
        return self.default_resolution

    def base_model_version(self, v_parameterization: bool) -> str:
        """kohya's ``ss_base_model_version``."""
        return ("sd_v2" if self.v2 else "sd_v1") + ("_v" if v_parameterization else "")

    # tiny test model ---------------------------------------------------------------------------
    tiny_text_encoders: tuple[TinyTextEncoder, ...] = (TinyTextEncoder(32, "quick_gelu"),)

    def tiny_unet_config(self) -> dict:
        """Tiny ``UNet2DConditionModel`` config with the family's real block layout (8x8 latents)."""
        raise NotImplementedError(f"{type(self).__name__}.tiny_unet_config")

    def tiny_vae_config(self) -> dict:
        return dict(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 32), layers_per_block=2,
            latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=self.latent_scale,
        )

    # behaviour ---------------------------------------------------------------------------------
    adapter_class: "type[FamilyAdapter] | None" = None

    def adapter(self) -> "FamilyAdapter":
        """A new training / encoding adapter for this family."""
        cls = self.adapter_class or (self.base.adapter_class if self.base is not None else None)
        if cls is None:
            raise KeyError(f"no trainer adapter for model family {self.value}")
        adapter = cls()
        adapter.family = self
        return adapter

    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_name)

    def check_bucket_steps(self, steps: int) -> str | None:
        """A problem with ``bucket_reso_steps`` for this family, or None."""
        m = self.bucket_multiple
        if m and steps % m:
            return f"bucket_reso_steps {steps} is not a multiple of {m}, which {self.pretty} needs; use {m} or {2 * m}"
        return None


# ------------------------------------------------------------------------------- conditioning
@dataclass
class Conditioning:
    """What a family's text encoding produces for the UNet.

    Attributes:
        hidden_states: ``[B, L, D]`` cross-attention states (``L`` = 77 or 75 * chunks + 2).
        pooled: ``[B, P]`` pooled text embedding (SDXL), else None.
        layers: ``[16, B, L, D]`` one state per UNet cross-attention layer (Extended Textual Inversion,
            :mod:`library.models.xti`), else None; ``hidden_states`` is then one of them.
    """

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None
    layers: torch.Tensor | None = None

    def repeat(self, n: int) -> "Conditioning":
        rep = lambda t, dim=0: None if t is None else t.repeat_interleave(n, dim=dim)  # noqa: E731
        return Conditioning(rep(self.hidden_states), rep(self.pooled), rep(self.layers, 1))


class FamilyAdapter(ABC):
    """Family behaviour the trainer, the text-encoder cache and sampling call (see module docstring).

    ``family`` is set by :meth:`Family.adapter`. Wrappers (textual inversion) subclass ``type(adapter)``
    and construct it without arguments, so adapters take none.
    """

    family: Family

    @abstractmethod
    def tokenize(self, tokenizers: list, captions: list[str], max_token_length: int | None) -> list[torch.Tensor]:
        """Token ids per tokenizer, each ``LongTensor[B, n_chunks, 77]``."""

    @abstractmethod
    def encode(self, text_encoders: list, tokenizers: list, token_ids: list[torch.Tensor],
               clip_skip: int | None) -> Conditioning:
        """Run the text encoder(s) on ``token_ids`` (from :meth:`tokenize`)."""

    @abstractmethod
    def predict(self, unet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning, batch: dict[str, Any] | None = None) -> torch.Tensor:
        """UNet output ``[B, 4, h, w]`` for ``noisy_latents`` ``[B, 4, h, w]`` at ``timesteps`` ``[B]``."""

    @abstractmethod
    def prompt_hidden_states(self, text_encoder: torch.nn.Module, index: int, input_ids: torch.Tensor,
                             clip_skip: int | None) -> tuple[torch.Tensor, Any]:
        """gen_img's prompt encoding: ``[N, 77, D]`` states of text encoder ``index`` for ``input_ids``
        ``[N, 77]``, and the raw encoder output (for :meth:`prompt_pooled`)."""

    def prompt_pooled(self, text_encoder: torch.nn.Module, index: int, output: Any, input_ids: torch.Tensor,
                      eos_token_id: int) -> torch.Tensor | None:
        """The pooled embedding ``[N, P]`` text encoder ``index`` contributes to a prompt, or None."""
        return None

    def base_model_version(self, v2: bool, v_parameterization: bool) -> str:
        """kohya's ``ss_base_model_version`` string (``v2`` kept for callers; the family knows it)."""
        return self.family.base_model_version(v_parameterization)

    def pipeline_class(self) -> type:
        """The diffusers pipeline class that renders samples for this family."""
        return self.family.pipeline_class()

    @property
    def n_text_encoders(self) -> int:
        """How many of the model's tokenizers/text encoders the family uses."""
        return self.family.n_text_encoders

    def encode_prompts(self, text_encoders: list, tokenizers: list, prompts: list[str],
                       max_token_length: int | None, clip_skip: int | None, device: torch.device,
                       weighted: bool = False, keep_mean: bool = False) -> Conditioning:
        """Tokenize and encode ``prompts`` in one call (sampling, caching); ``weighted`` /
        ``keep_mean``: see :meth:`tokenize_weighted` and :meth:`apply_token_weights`."""
        if not weighted:
            ids = [t.to(device) for t in self.tokenize(tokenizers, prompts, max_token_length)]
            return self.encode(text_encoders, tokenizers, ids, clip_skip)
        ids, weights = self.tokenize_weighted(tokenizers, prompts, max_token_length)
        cond = self.encode(text_encoders, tokenizers, [t.to(device) for t in ids], clip_skip)
        return self.apply_token_weights(cond, weights, text_encoders, keep_mean=keep_mean)

    def tokenize_weighted(self, tokenizers: list, captions: list[str], max_token_length: int | None
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``--weighted_captions``: ids as :meth:`tokenize` gives them for the captions without the
        attention syntax, and per-token weights, each ``[B, n_chunks, 77]`` per tokenizer."""
        from library.data.tokenize import tokenize_captions_weighted

        pairs = [tokenize_captions_weighted(tok, captions, max_token_length)
                 for tok in tokenizers[: self.n_text_encoders]]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def apply_token_weights(self, cond: Conditioning, weights: list[torch.Tensor], text_encoders: list,
                            keep_mean: bool = False) -> Conditioning:
        """Multiply each token's hidden state by its weight; the pooled embedding is not weighted.

        Weighted captions (training) use the plain product, as kohya does. ``keep_mean`` then
        rescales each sample so the mean of its states is unchanged, as the long-prompt-weighting
        pipelines kohya samples with do. The states of several text encoders are concatenated
        along features; each part gets its own tokenizer's weights (and its own rescaling).
        """
        from library.data.tokenize import merge_chunk_weights

        widths = [te.config.hidden_size for te in text_encoders[: self.n_text_encoders]]
        parts = []
        for part, w in zip(cond.hidden_states.split(widths, dim=-1), weights):
            w = merge_chunk_weights(w).to(part.device, part.dtype)
            weighted = part * w.unsqueeze(-1)
            if keep_mean and not bool((w == 1).all()):
                ratio = part.float().mean(dim=(1, 2)) / weighted.float().mean(dim=(1, 2))
                ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))  # a zero mean stays as is
                weighted = weighted * ratio.to(part.dtype)[:, None, None]
            parts.append(weighted)
        return Conditioning(torch.cat(parts, dim=-1), cond.pooled)

