"""What reads a trained model: evaluation, pictures, attribute edits, run comparison."""
