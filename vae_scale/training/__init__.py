"""What training needs: the loop, one step, the update policy, checkpoints, logs, W&B."""
