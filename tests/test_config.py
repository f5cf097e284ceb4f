"""Server settings from flags, RNNSTREAM_* variables and defaults."""

from __future__ import annotations

import argparse
import re

import pytest

from rnnstream.config import BUNDLED_MODELS_DIR, add_server_options, resolve_config


def parse(argv: list[str], environ: dict[str, str]):
    parser = argparse.ArgumentParser()
    add_server_options(parser)
    return resolve_config(parser.parse_args(argv), environ)


def test_defaults():
    config = parse([], {})
    assert config.models_dir == BUNDLED_MODELS_DIR
    assert config.redis_url is None
    assert config.port == 50051
    assert config.device == "auto"


def test_environment_sets_values():
    config = parse([], {"RNNSTREAM_REDIS_URL": "redis://127.0.0.1:1/0", "RNNSTREAM_MAX_BATCH": "8"})
    assert config.redis_url == "redis://127.0.0.1:1/0"
    assert config.max_batch == 8


def test_flag_wins_over_environment():
    config = parse(["--port", "7000"], {"RNNSTREAM_PORT": "6000"})
    assert config.port == 7000


@pytest.mark.parametrize("argv, environ, message", [
    (["--port", "70000"], {}, "invalid value '70000' for --port"),
    ([], {"RNNSTREAM_MAX_BATCH": "0"}, "invalid value '0' for RNNSTREAM_MAX_BATCH"),
    (["--log-level", "loud"], {}, "invalid value 'loud' for --log-level"),
    (["--default-ttl", "100", "--max-ttl", "10"], {}, "default TTL 100 s exceeds the maximum TTL 10 s"),
])
def test_invalid_values_name_the_option(argv, environ, message):
    with pytest.raises(ValueError, match=message):
        parse(argv, environ)


def test_invalid_device_is_rejected():
    from rnnstream.engine.runner import resolve_device

    with pytest.raises(ValueError, match="invalid device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.parametrize("argv, message", [
    (["--max-wait-ms", "inf"], "invalid value 'inf' for --max-wait-ms: inf is outside [0, 1000]"),
    (["--max-wait-ms", "nan"], "invalid value 'nan' for --max-wait-ms"),
    (["--redis-timeout", "0"], "invalid value '0' for --redis-timeout: 0.0 is outside (0, 60]"),
    (["--max-ttl", "5000000000"], "invalid value '5000000000' for --max-ttl: 5000000000 is outside [1, 4294967295]"),
    (["--grace", "-1"], "invalid value '-1' for --grace"),
])
def test_out_of_range_values_are_rejected(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(argv, {})


def test_torch_threads_setting():
    assert parse([], {}).torch_threads == 0
    assert parse(["--torch-threads", "1"], {}).torch_threads == 1
    with pytest.raises(ValueError, match="invalid value '-1' for --torch-threads"):
        parse(["--torch-threads", "-1"], {})
