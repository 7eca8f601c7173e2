"""Output, saving, resume and metadata flags (and kohya's Hugging Face upload, unsupported)."""

from __future__ import annotations

from library.config.flags.base import DONE, F, at_least, in_group, unsupported
from library.config.flags.scripts import NETWORK_TRAINERS

_HF = unsupported("Hugging Face upload is not supported (offline toolkit)")

SAVING = in_group("saving", [
    F("--output_dir", str, None, DONE, "Folder for the trained files, states and samples."),
    F("--output_name", str, None, DONE,
      "Base file name of the trained files (NAME.safetensors, NAME-000001.safetensors, ...; "
      "default 'last')."),
    F("--save_model_as", str, "safetensors", DONE,
      "File format of the trained network.", choices=[None, "ckpt", "pt", "safetensors"],
      scripts=NETWORK_TRAINERS),
    F("--save_precision", str, None, DONE,
      "Data type of the saved weights (default: as trained).", choices=[None, "float", "fp16", "bf16"]),
    F("--save_every_n_epochs", int, None, DONE, "Save every N epochs.", check=at_least(1)),
    F("--save_every_n_steps", int, None, DONE, "Save every N steps.", check=at_least(1)),
    F("--save_n_epoch_ratio", int, None, DONE,
      "Save so that about N files are written over the whole run.", check=at_least(1)),
    F("--save_last_n_epochs", int, None, DONE,
      "Keep only the files of the last N epoch saves (older ones are deleted).", check=at_least(1)),
    F("--save_last_n_epochs_state", int, None, DONE,
      "Keep only the last N epoch states (default: --save_last_n_epochs).", check=at_least(1)),
    F("--save_last_n_steps", int, None, DONE,
      "Keep only the files saved within the last N steps.", check=at_least(1)),
    F("--save_last_n_steps_state", int, None, DONE,
      "Keep only the states saved within the last N steps (default: --save_last_n_steps).",
      check=at_least(1)),
    F("--save_state", bool, False, DONE,
      "Also save the full training state (optimizer, scheduler, RNG, position) with each save, "
      "for --resume."),
    F("--save_state_on_train_end", bool, False, DONE, "Save the training state at the end of training."),
    F("--resume", str, None, DONE,
      "Continue training exactly from a state folder written by --save_state."),
    F("--huggingface_repo_id", str, None, _HF, "Hugging Face repository to upload to."),
    F("--huggingface_repo_type", str, None, _HF, "Hugging Face repository type."),
    F("--huggingface_path_in_repo", str, None, _HF, "Path inside the Hugging Face repository."),
    F("--huggingface_token", str, None, _HF, "Hugging Face access token.", secret=True),
    F("--huggingface_repo_visibility", str, None, _HF, "Visibility of a new Hugging Face repository."),
    F("--save_state_to_huggingface", bool, False, _HF, "Upload training states to Hugging Face."),
    F("--resume_from_huggingface", bool, False, _HF, "Resume from a state stored on Hugging Face."),
    F("--async_upload", bool, False, _HF, "Upload to Hugging Face in the background."),
])

METADATA = in_group("metadata", [
    F("--no_metadata", bool, False, DONE,
      "Write only the minimal metadata into saved files (no training settings, no dataset info)."),
    F("--training_comment", str, None, DONE, "Free text stored as ss_training_comment in the metadata."),
    F("--metadata_title", str, None, DONE, "Title (modelspec.title; default: the output name)."),
    F("--metadata_author", str, None, DONE, "Author (modelspec.author)."),
    F("--metadata_description", str, None, DONE, "Description (modelspec.description)."),
    F("--metadata_license", str, None, DONE, "License (modelspec.license)."),
    F("--metadata_tags", str, None, DONE, "Comma-separated tags (modelspec.tags)."),
    F("--metadata_usage_hint", str, None, DONE, "Usage hint (modelspec.usage_hint)."),
    F("--metadata_thumbnail", str, None, DONE, "Thumbnail as a data URI (modelspec.thumbnail)."),
    F("--metadata_merged_from", str, None, DONE, "Source models of a merge (modelspec.merged_from)."),
    F("--metadata_trigger_phrase", str, None, DONE, "Trigger phrase (modelspec.trigger_phrase)."),
    F("--metadata_preprocessor", str, None, DONE, "Preprocessor (modelspec.preprocessor)."),
    F("--metadata_is_negative_embedding", str, None, DONE,
      "Mark an embedding as negative (modelspec.is_negative_embedding)."),
])

FLAGS = SAVING + METADATA
