"""The template for textual-inversion scripts (``train_textual_inversion.py``, ``sdxl_train_textual_inversion.py``).

An :class:`EmbeddingTrainer` is the shared :class:`~library.training.trainer.Trainer` with the
embeddings target (:mod:`.embeddings`). It adds the tokens right after the model is loaded (so a
bad ``--token_string`` / ``--init_word`` / ``--weights`` fails before any cache or output is
written), checks the captions before loading anything, expands the token into its N tokens
wherever text is tokenized, and replaces the captions by kohya's templates when asked.

Hooks for a subclass (Extended Textual Inversion): :meth:`make_target` (a subclass of
:class:`~.embeddings.EmbeddingTarget`), :meth:`expand_text` (how the token is written out for the
tokenizers), and the template's :meth:`encode_text` / :meth:`compute_loss` (how the conditioning is
computed and fed to the UNet).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from library.errors import ConfigError
from library.models.families import Family
from library.training import saving as S
from library.training.targets.embedding_captions import (check_captions, expand_token, expanding_adapter,
                                                          template_captions, templates_for)
from library.training.targets.embeddings import EmbeddingTarget
from library.training.targets.full_trainer import complete_namespace, require_family
from library.training.trainer import Trainer

logger = logging.getLogger(__name__)


class EmbeddingTrainer(Trainer):
    """Train a textual-inversion embedding on an SD 1.x / 2.x model (kohya's ``TextualInversionTrainer``)."""

    script_name = "train_textual_inversion"
    tracker_name = "textual_inversion"
    other_scripts: dict[Family, str] = {Family.SDXL: "sdxl_train_textual_inversion.py"}

    def __init__(self, args: Any):
        super().__init__(complete_namespace(args))
        if self.args.output_name is None:  # kohya: the file is named after the token
            self.args.output_name = self.args.token_string
        self.target: EmbeddingTarget | None = None

    # ------------------------------------------------------------------ hooks: what is trained
    def make_target(self) -> EmbeddingTarget:
        self.target = EmbeddingTarget(self.args)
        return self.target

    def output_label(self) -> str:
        return "embedding"

    def expand_text(self, text: str) -> str:
        """A caption or prompt as the tokenizers see it: the token written out as its N tokens."""
        return expand_token(text, self.args.token_string, self.target.token_strings())

    def family_adapter(self, family: Family) -> Any:
        return expanding_adapter(super().family_adapter(family), self.expand_text)

    def load_model(self) -> Any:
        """The base model with the new tokens in its tokenizers and text encoders."""
        model = super().load_model()
        self.target.add_tokens(model)
        return model

    # ------------------------------------------------------------------ per step
    def compute_loss(self, s: Any, batch: dict[str, Any], gens: list, n_real: int, global_size: int,
                     fixed_timestep: int | None = None) -> Any:
        templates = templates_for(self.args)
        if templates is not None:
            batch = {**batch, "captions": template_captions(templates, self.args.token_string, gens)}
        return super().compute_loss(s, batch, gens, n_real, global_size, fixed_timestep)

    # ------------------------------------------------------------------ checks before loading
    def preflight(self) -> None:
        """Every flag problem at once, the model's family, the ``--weights`` file and the captions."""
        a = self.args
        problems = []
        token = a.token_string
        if token is None or not token.strip():
            problems.append("--token_string is required: the new word the embedding is learned for (e.g. 'mychar')")
        elif token != token.strip() or any(c.isspace() for c in token):
            problems.append(f"--token_string {token!r} must be one word without spaces")
        if a.use_object_template and a.use_style_template:
            problems.append("--use_object_template and --use_style_template exclude each other; give one")
        if a.init_word is not None and not a.init_word.strip():
            problems.append("--init_word is empty; give a word close to the concept (e.g. 'dog') or leave it out")
        if problems:
            raise ConfigError(problems)
        require_family(self, "embeddings for ")
        if a.weights:
            vectors = self.target.read_weights(a.weights)
            if vectors[0].shape[0] != len(self.target.token_strings()):
                raise ConfigError(f"--weights {a.weights} holds {vectors[0].shape[0]} vectors, but "
                                  f"--num_vectors_per_token is {a.num_vectors_per_token}; use "
                                  f"--num_vectors_per_token {vectors[0].shape[0]}")
        if templates_for(a) is None and not a.debug_dataset:
            check_captions(a, token)
        super().preflight()
        logger.info("textual inversion: %r, %d vector(s), saved as %s", token, a.num_vectors_per_token,
                    Path(a.output_dir or ".") / (S.last_name(a.output_name) + self.target.output_suffix()))
