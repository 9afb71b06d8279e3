"""Shards -> batches: where shards live and fetching them (remote.py), what index.json says
of them (catalog.py), reading and checking samples (tar_members.py, reader.py, decode.py), the
epoch order (order.py), the loader (loader.py) and batches -> model inputs (inputs.py)."""
