"""Model bundles: a directory with config.json, model.safetensors and tokenizer.json.

config.json contains the architecture and sizes (ModelConfig), the tokenizer file
name and the training metadata. Weights are safetensors, so loading a bundle
never unpickles anything. README.md beside them is the model card.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .network import ModelConfig, RecurrentLM
from .tokenizer import ByteTokenizer, load_tokenizer, save_tokenizer

BUNDLE_FORMAT = "rnnstream-bundle"
BUNDLE_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


class BundleError(ValueError):
    """A model bundle is missing a file or its contents are invalid."""


@dataclass
class Bundle:
    name: str
    config: ModelConfig
    model: RecurrentLM
    tokenizer: ByteTokenizer
    fingerprint: str
    training: dict = field(default_factory=dict)
    path: Path | None = None


def fingerprint_of(config: ModelConfig, weights: bytes) -> str:
    """Hash of the model config and weight bytes: equal fingerprints mean interchangeable states."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    digest.update(weights)
    return digest.hexdigest()[:32]


def save_bundle(
    directory: Path,
    name: str,
    model: RecurrentLM,
    tokenizer: ByteTokenizer,
    training: dict | None = None,
) -> str:
    """Write model, config and tokenizer to directory; return the fingerprint."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": BUNDLE_FORMAT})
    save_tokenizer(tokenizer, directory / TOKENIZER_FILE)
    config = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "name": name,
        "model": model.config.to_dict(),
        "tokenizer": TOKENIZER_FILE,
        "training": training or {},
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return fingerprint_of(model.config, (directory / WEIGHTS_FILE).read_bytes())


def load_bundle(directory: Path) -> Bundle:
    """Load a bundle into an eval-mode RecurrentLM on the CPU."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise BundleError(f"{directory}: missing {CONFIG_FILE}") from error
    except json.JSONDecodeError as error:
        raise BundleError(f"{config_path}: invalid JSON: {error}") from error
    if raw.get("format") != BUNDLE_FORMAT or raw.get("format_version") != BUNDLE_VERSION:
        raise BundleError(
            f"{config_path}: unsupported bundle format {raw.get('format')!r} "
            f"version {raw.get('format_version')!r}; expected {BUNDLE_FORMAT!r} version {BUNDLE_VERSION}"
        )
    try:
        config = ModelConfig(**raw["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(f"{config_path}: invalid model config: {error}") from error

    tokenizer = load_tokenizer(directory / raw.get("tokenizer", TOKENIZER_FILE))
    if tokenizer.vocab_size != config.vocab_size:
        raise BundleError(
            f"{directory}: tokenizer vocabulary {tokenizer.vocab_size} does not match "
            f"model vocab_size {config.vocab_size}"
        )

    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise BundleError(f"{directory}: missing {WEIGHTS_FILE}")
    model = RecurrentLM(config)
    try:
        tensors = load_file(str(weights_path))
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise BundleError(f"{weights_path}: tensor {name} contains NaN or infinite values; the file is corrupt")
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise BundleError(f"{weights_path}: weights do not match config.json: {error}") from error
    except SafetensorError as error:
        raise BundleError(f"{weights_path}: not a valid safetensors file: {error}") from error
    model.eval()
    return Bundle(
        name=raw.get("name") or directory.name,
        config=config,
        model=model,
        tokenizer=tokenizer,
        fingerprint=fingerprint_of(config, weights_path.read_bytes()),
        training=raw.get("training", {}),
        path=directory,
    )


def find_bundles(models_dir: Path) -> list[Path]:
    """Return the bundle directories directly under models_dir, sorted by name."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise BundleError(f"models directory {models_dir} does not exist")
    return sorted(path for path in models_dir.iterdir() if (path / CONFIG_FILE).is_file())
