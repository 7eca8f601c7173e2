"""Flags of the textual-inversion trainers (``train_textual_inversion.py``, ``sdxl_train_textual_inversion.py``)."""

from __future__ import annotations

from library.config.flags.base import DONE, F, at_least, in_group, unsupported
from library.config.flags.scripts import EMBEDDING_TRAINERS

FLAGS = in_group("textual inversion", [
    F("--token_string", str, None, DONE,
      "The new word to learn (must not be a token of the tokenizer yet). With N vectors the tokens "
      "TOKEN, TOKEN1, ..., TOKEN{N-1} are added, and TOKEN in captions and sample prompts stands for all "
      "of them. Also the default --output_name.", scripts=EMBEDDING_TRAINERS),
    F("--init_word", str, None, DONE,
      "Start the vectors from this word's tokens (repeated when it has fewer tokens than vectors; more "
      "tokens than --num_vectors_per_token is an error). Default: the mean of the existing token vectors "
      "with a little noise.", scripts=EMBEDDING_TRAINERS),
    F("--num_vectors_per_token", int, 1, DONE,
      "How many vectors the token stands for (more vectors hold more detail, use more of the 75-token "
      "prompt).", check=at_least(1), scripts=EMBEDDING_TRAINERS),
    F("--weights", str, None, DONE,
      "Continue from this embedding file (.safetensors; .pt with --allow_pickle); its vector count and "
      "width must match.", scripts=EMBEDDING_TRAINERS),
    F("--use_object_template", bool, False, DONE,
      "Ignore the captions and train with kohya's object templates ('a photo of a TOKEN', ...).",
      scripts=EMBEDDING_TRAINERS),
    F("--use_style_template", bool, False, DONE,
      "Ignore the captions and train with kohya's style templates ('a painting in the style of TOKEN', ...).",
      scripts=EMBEDDING_TRAINERS),
    F("--save_model_as", str, "safetensors", DONE,
      "File format of the embedding: safetensors (sdtk's default; kohya's is pt), or pt / ckpt (a pickle "
      "in A1111's layout).", choices=[None, "ckpt", "pt", "safetensors"], scripts=EMBEDDING_TRAINERS),
    F("--fused_backward_pass", bool, False, unsupported("kohya uses it only for full fine-tuning (sdxl_train)"),
      "Apply the optimizer step inside the backward pass to save memory (AdaFactor only).",
      scripts=EMBEDDING_TRAINERS),
])
