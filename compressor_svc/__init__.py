"""The compressor service: turns weight deltas into compact encoded tensors."""
