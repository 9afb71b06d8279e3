"""Raw files -> WebDataset shards: one converter per dataset (frey, mnist, cifar10, celeba,
folder), the shard writers (shards.py; folder_sharder.py for image files, parallel and
resumable) and the registry `vae-scale shard` reads (recipes.py)."""
