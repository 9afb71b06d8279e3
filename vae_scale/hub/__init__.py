"""Trained models outside the trainer: export a run to a portable folder (the Hugging Face
Hub layout), load one (or a run folder) from Python."""
