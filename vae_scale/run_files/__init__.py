"""What a run folder holds, as files: JSON-lines logs and checkpoint folders. Training writes
them, analysis and the hub read them; neither imports the other for it."""
