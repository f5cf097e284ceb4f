"""docker-compose.yml, the Dockerfile and the configs they mount, checked without a Docker engine.

The commands go through the real CLI parser, the variables through the real
config resolver, the nginx config through `nginx -t`, the Prometheus config
through `promtool check config`, and Redis's command line through a real
redis-server.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
import yaml

from rnnstream.cli import build_parser
from rnnstream.config import OPTIONS, env_name, resolve_config

from .conftest import REDIS_SERVER, free_port
from .deploy_helpers import (
    COMPOSE_FILE,
    NGINX_CONF,
    ROOT,
    dockerfile_instructions,
    load_compose,
    loopback_nginx_conf,
    nginx_command,
    nginx_listen_ports,
    nginx_upstream_servers,
)

SERVER_VARIABLES = {env_name(field) for field in OPTIONS}
PROFILES = ("cpu", "gpu")


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def rnnstream_services(compose: dict) -> dict[str, dict]:
    """Services that run the rnnstream image (built from this repository's Dockerfile)."""
    return {name: service for name, service in compose["services"].items() if "build" in service}


def bind_mounts(service: dict) -> list[tuple[Path, str]]:
    """(host path, container path) of each bind mount given as ./PATH:CONTAINER[:MODE]."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts.append(((COMPOSE_FILE.parent / source).resolve(), target))
    return mounts


def parse_cli(argv: list[str], source: str) -> argparse.Namespace:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as error:
        pytest.fail(f"{source}: the rnnstream CLI rejects {argv} (exit status {error.code})")


def enabled_services(compose: dict, profile: str) -> set[str]:
    return {
        name for name, service in compose["services"].items()
        if not service.get("profiles") or profile in service["profiles"]
    }


def test_compose_file_has_the_topology(compose):
    services = compose["services"]
    assert {"redis", "rnnstream", "rnnstream-gpu", "nginx", "prometheus", "grafana"} <= set(services)
    assert services["rnnstream"]["deploy"]["replicas"] == 2
    assert services["rnnstream"]["profiles"] == ["cpu"]
    assert services["rnnstream-gpu"]["profiles"] == ["gpu"]
    assert services["nginx"]["ports"] == ["50051:50051"]


def test_default_profile_is_cpu():
    lines = (ROOT / ".env").read_text().splitlines()
    settings = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert settings["COMPOSE_PROFILES"] == "cpu"


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profile_has_replicas_and_balancer(compose, profile):
    enabled = enabled_services(compose, profile)
    replicas = [name for name in enabled if name in rnnstream_services(compose)]
    balancers = [name for name in enabled if compose["services"][name].get("image", "").startswith("nginx:")]
    assert len(replicas) == 1, f"profile {profile}: rnnstream services {replicas}"
    assert len(balancers) == 1, f"profile {profile}: nginx services {balancers}"


@pytest.mark.parametrize("profile", PROFILES)
def test_dependencies_are_enabled_with_dependents(compose, profile):
    """Compose rejects a project whose enabled service depends on one its profiles disable."""
    enabled = enabled_services(compose, profile)
    for name in enabled:
        for dependency in compose["services"][name].get("depends_on", {}):
            assert dependency in enabled, f"profile {profile}: {name} depends on disabled {dependency}"


def test_replicas_share_one_dns_name(compose):
    """nginx and Prometheus find replicas as `rnnstream`: the CPU service's name and the GPU one's alias."""
    gpu = compose["services"]["rnnstream-gpu"]
    assert "rnnstream" in gpu["networks"]["default"]["aliases"]
    assert [host for host, _ in nginx_upstream_servers(NGINX_CONF.read_text())] == ["rnnstream"]


def test_gpu_service_reserves_nvidia_gpus(compose):
    gpu = compose["services"]["rnnstream-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["RNNSTREAM_DEVICE"] == "cuda"
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    assert compose["services"]["rnnstream"]["build"]["args"]["VARIANT"] == "cpu"


def test_service_commands_parse_and_resolve(compose):
    for name, service in rnnstream_services(compose).items():
        args = parse_cli(service["command"], f"service {name}")
        assert args.command == "serve", name
        environment = {key: str(value) for key, value in service["environment"].items()}
        config = resolve_config(args, environment)
        assert config.redis_url == "redis://redis:6379/0", name
        assert config.host == "0.0.0.0" or "RNNSTREAM_HOST" not in environment


def test_service_variables_are_server_options(compose):
    for name, service in rnnstream_services(compose).items():
        unknown = set(service["environment"]) - SERVER_VARIABLES
        assert not unknown, f"service {name} sets variables the server does not read: {sorted(unknown)}"


def test_dockerfile_variables_are_server_options():
    variables = set()
    for instruction, arguments in dockerfile_instructions():
        if instruction == "ENV":
            variables |= set(re.findall(r"\b(RNNSTREAM_\w+)=", arguments))
    assert {"RNNSTREAM_HOST", "RNNSTREAM_PORT"} <= variables
    assert not variables - SERVER_VARIABLES, f"unknown variables {sorted(variables - SERVER_VARIABLES)}"


def test_dockerfile_commands_parse():
    instructions = dockerfile_instructions()
    last_stage = max(index for index, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    final = instructions[last_stage:]
    entrypoint = [yaml.safe_load(arguments) for keyword, arguments in final if keyword == "ENTRYPOINT"]
    command = [yaml.safe_load(arguments) for keyword, arguments in final if keyword == "CMD"]
    assert entrypoint == [["rnnstream"]]
    args = parse_cli(command[0], "Dockerfile CMD")
    assert args.command == "serve"

    healthchecks = [arguments for instruction, arguments in final if instruction == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    shell_command = healthchecks[0].split(" CMD ", 1)[1].replace("${RNNSTREAM_PORT}", "50051")
    argv = shlex.split(shell_command)
    assert argv[0] == "rnnstream"
    args = parse_cli(argv[1:], "Dockerfile HEALTHCHECK")
    assert args.command == "health"
    assert args.target == "127.0.0.1:50051"


def test_dockerfile_runs_as_unprivileged_user():
    instructions = dockerfile_instructions()
    last_stage = max(index for index, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    users = [arguments for instruction, arguments in instructions[last_stage:] if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_dockerfile_has_both_variants():
    stages = [arguments.split() for keyword, arguments in dockerfile_instructions() if keyword == "FROM"]
    names = {words[2] for words in stages if len(words) == 3 and words[1].upper() == "AS"}
    assert {"base-cpu", "base-cuda", "build"} <= names
    assert stages[-1][0] == "base-${VARIANT}"


def test_ports_agree(compose):
    conf = NGINX_CONF.read_text()
    for name, service in rnnstream_services(compose).items():
        environment = service["environment"]
        grpc_port = int(environment["RNNSTREAM_PORT"])
        metrics_port = int(environment["RNNSTREAM_METRICS_PORT"])
        assert {str(grpc_port), str(metrics_port)} <= set(service["expose"]), name
        assert [port for _, port in nginx_upstream_servers(conf)] == [grpc_port]
        assert metrics_port == 9100

    for name in ("nginx", "nginx-gpu"):
        published = [int(mapping.rsplit(":", 1)[1]) for mapping in compose["services"][name]["ports"]]
        assert published == nginx_listen_ports(conf), name


def test_prometheus_scrapes_the_metrics_port(compose):
    prometheus = compose["services"]["prometheus"]
    mounts = dict((target, source) for source, target in bind_mounts(prometheus))
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    discovery = jobs["rnnstream"]["dns_sd_configs"][0]
    assert discovery["names"] == ["rnnstream"]
    assert discovery["port"] == int(compose["services"]["rnnstream"]["environment"]["RNNSTREAM_METRICS_PORT"])


def test_bind_mounts_exist(compose):
    for name, service in compose["services"].items():
        for source, target in bind_mounts(service):
            assert source.exists(), f"service {name} mounts {source} at {target}, which does not exist"


def test_prometheus_config_passes_promtool(compose, tmp_path):
    """promtool checks prometheus.yml and the rule files it names, at the paths the container mounts them."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed; .ci/run installs Debian's prometheus package with apt-get")
    for source, target in bind_mounts(compose["services"]["prometheus"]):
        destination = tmp_path / target.lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, destination)
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "etc/prometheus/prometheus.yml")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in result.stdout, "promtool did not check the alert rules"


def test_nginx_config_passes_nginx_t(tmp_path):
    """`nginx -t` on the compose config, with only the replica addresses and file paths changed."""
    conf = loopback_nginx_conf(tmp_path, ["127.0.0.1:50051", "127.0.0.1:50052"], free_port())
    result = subprocess.run(nginx_command(tmp_path, conf, "-t"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_redis_command_runs_real_redis(compose, tmp_path):
    command = compose["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed; .ci/run installs it with apt-get")
    port = free_port()
    process = subprocess.Popen(
        [REDIS_SERVER, *command[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert process.poll() is None, f"redis-server rejected the compose command {command}"
                time.sleep(0.05)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("save") == {"save": ""}
    finally:
        client.close()
        process.kill()
        process.wait(10)
