"""Recurrent language models, their tokenizers and on-disk bundles."""
