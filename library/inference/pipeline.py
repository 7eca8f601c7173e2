"""The one way sdtk builds a diffusers pipeline over its own model components.

gen_img (:mod:`library.inference.generate`), sample images during training
(:mod:`library.training.sampling`) and the embedding loaders (:mod:`library.inference.textual_inversion`,
:mod:`library.inference.xti`, which use a pipeline for diffusers' token surgery) all call
:func:`build_pipeline`. The family adapter names the text-to-image class
(``FamilyAdapter.pipeline_class``); the image-to-image class is diffusers' own counterpart of it (the
table behind ``AutoPipelineForImage2Image``). Every pipeline is built without safety checker, feature
extractor, image encoder or watermark, and with its progress bar off (sdtk shows its own).
"""

from __future__ import annotations

import inspect
from typing import Any

from library.models.families import Family
from library.training.family import get_family_adapter

# optional pipeline arguments sdtk always turns off, where the class takes them
_OFF: dict[str, Any] = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                            image_encoder=None, add_watermarker=False)


def image_to_image_class(text_to_image: type) -> type:
    """diffusers' image-to-image pipeline class for a text-to-image one (``StableDiffusionPipeline`` ->
    ``StableDiffusionImg2ImgPipeline``).

    Raises:
        ValueError: diffusers knows no image-to-image counterpart of the class.
    """
    # on use: this table imports every pipeline diffusers has; only img2img jobs need it
    from diffusers.pipelines.auto_pipeline import AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, AUTO_TEXT2IMAGE_PIPELINES_MAPPING

    for key, cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.items():
        if cls is text_to_image and key in AUTO_IMAGE2IMAGE_PIPELINES_MAPPING:
            return AUTO_IMAGE2IMAGE_PIPELINES_MAPPING[key]
    raise ValueError(f"diffusers has no image-to-image pipeline for {text_to_image.__name__}")


def pipeline_class(family: Family, img2img: bool = False) -> type:
    """The pipeline class of ``family`` (asked of its adapter), or its image-to-image counterpart."""
    cls = get_family_adapter(family).pipeline_class()
    return image_to_image_class(cls) if img2img else cls


def model_components(model: Any) -> dict[str, Any]:
    """A loaded model's parts under the pipeline's names: ``unet``, ``vae``, ``text_encoder`` /
    ``tokenizer`` and, for a family with two text encoders, ``text_encoder_2`` / ``tokenizer_2``.

    Args:
        model: a ``LoadedModel`` (``family``, ``unet``, ``vae``, ``text_encoders``, ``tokenizers``).
    """
    parts: dict[str, Any] = {"unet": model.unet, "vae": model.vae}
    n = get_family_adapter(model.family).n_text_encoders
    for i, (te, tok) in enumerate(zip(model.text_encoders[:n], model.tokenizers[:n])):
        suffix = "" if i == 0 else f"_{i + 1}"
        parts[f"text_encoder{suffix}"], parts[f"tokenizer{suffix}"] = te, tok
    return parts


def assemble_pipeline(cls: type, components: dict[str, Any], scheduler: Any) -> Any:
    """An instance of the pipeline class ``cls`` over ``components`` (see :func:`model_components`) and
    ``scheduler``, with sdtk's optional parts turned off; :func:`build_pipeline` picks ``cls``."""
    params = inspect.signature(cls.__init__).parameters
    pipe = cls(**components, scheduler=scheduler, **{k: v for k, v in _OFF.items() if k in params})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(model: Any, scheduler: Any, *, img2img: bool = False) -> Any:
    """A diffusers pipeline over ``model``'s own components, of the class its family's adapter names.

    Args:
        model: a ``LoadedModel``; the pipeline shares its modules (nothing is copied).
        scheduler: a diffusers scheduler (:func:`library.inference.schedulers.make_scheduler`).
        img2img: the image-to-image pipeline instead of the text-to-image one.
    """
    return assemble_pipeline(pipeline_class(model.family, img2img), model_components(model), scheduler)
