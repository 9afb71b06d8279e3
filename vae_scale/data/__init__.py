"""Datasets -> shards (`sources`, `shards`) and shards -> batches (`loader`)."""
