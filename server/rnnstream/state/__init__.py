"""Session records, the codec between state tensors and bytes, and the stores that keep them."""
