"""Model bundles: save and load without pickle, and clear errors for broken bundles."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from rnnstream.models.bundle import BundleError, load_bundle, save_bundle
from rnnstream.models.network import ModelConfig
from rnnstream.models.tokenizer import ByteTokenizer

from .conftest import build_tiny_model


def test_round_trip_keeps_weights_and_fingerprint(tmp_path):
    model = build_tiny_model("lstm", seed=3)
    fingerprint = save_bundle(tmp_path / "m", "m", model, ByteTokenizer(), training={"steps": 1})
    bundle = load_bundle(tmp_path / "m")
    assert bundle.fingerprint == fingerprint
    assert bundle.training == {"steps": 1}
    assert not bundle.model.training
    for key, value in model.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[key], value), key


def test_load_never_unpickles(tmp_path, monkeypatch):
    save_bundle(tmp_path / "m", "m", build_tiny_model("gru", seed=1), ByteTokenizer())

    def forbidden(*args, **kwargs):
        raise AssertionError("bundle loading called pickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert load_bundle(tmp_path / "m").config.architecture == "gru"


def test_fingerprint_changes_with_weights(tmp_path):
    first = save_bundle(tmp_path / "a", "a", build_tiny_model("gru", seed=1), ByteTokenizer())
    second = save_bundle(tmp_path / "b", "b", build_tiny_model("gru", seed=2), ByteTokenizer())
    assert first != second


def test_missing_weights_is_reported(tmp_path):
    save_bundle(tmp_path / "m", "m", build_tiny_model("gru", seed=1), ByteTokenizer())
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="missing model.safetensors"):
        load_bundle(tmp_path / "m")


def test_weights_not_matching_config_are_reported(tmp_path):
    save_bundle(tmp_path / "m", "m", build_tiny_model("gru", seed=1), ByteTokenizer())
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["hidden_size"] = 64
    config_path.write_text(json.dumps(config))
    with pytest.raises(BundleError, match="weights do not match config.json"):
        load_bundle(tmp_path / "m")


def test_unknown_architecture_is_reported(tmp_path):
    save_bundle(tmp_path / "m", "m", build_tiny_model("gru", seed=1), ByteTokenizer())
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["architecture"] = "transformer"
    config_path.write_text(json.dumps(config))
    with pytest.raises(BundleError, match="invalid architecture 'transformer'"):
        load_bundle(tmp_path / "m")


def test_invalid_config_size_is_rejected():
    with pytest.raises(ValueError, match="invalid hidden_size 0"):
        ModelConfig("lstm", 256, 8, 0, 1)


def test_bundled_models_load_and_beat_unigram():
    from rnnstream.config import BUNDLED_MODELS_DIR
    from rnnstream.models.bundle import find_bundles

    bundles = [load_bundle(path) for path in find_bundles(BUNDLED_MODELS_DIR)]
    assert sorted(bundle.config.architecture for bundle in bundles) == ["gru", "lstm"]
    sizes = [bundle.model.num_parameters() for bundle in bundles]
    assert max(sizes) / min(sizes) < 1.2
    total_bytes = sum(path.stat().st_size for path in BUNDLED_MODELS_DIR.rglob("*") if path.is_file())
    assert total_bytes < 20 * 1024 * 1024
    for bundle in bundles:
        training = bundle.training
        assert training["holdout_bits_per_char"] <= 0.6 * training["unigram_bits_per_char"], bundle.name
        assert (bundle.path / "README.md").is_file()


def test_copy_of_bundle_keeps_fingerprint(tmp_path):
    fingerprint = save_bundle(tmp_path / "m", "m", build_tiny_model("lstm", seed=4), ByteTokenizer())
    shutil.copytree(tmp_path / "m", tmp_path / "copy")
    assert load_bundle(tmp_path / "copy").fingerprint == fingerprint


def test_non_finite_weights_are_rejected(tmp_path):
    model = build_tiny_model("gru", seed=1)
    with torch.no_grad():
        model.embedding.weight[11, 0] = float("nan")
    save_bundle(tmp_path / "m", "m", model, ByteTokenizer())
    with pytest.raises(BundleError, match="tensor embedding.weight contains NaN or infinite values"):
        load_bundle(tmp_path / "m")
