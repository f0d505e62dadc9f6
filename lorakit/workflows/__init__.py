"""What the commands run on trained adapters or around the trainer: evaluation, generation and export of a saved
adapter, predictions on a file, method comparisons and sweeps, the demo."""
