"""The deploy files: promtool checks, alert rules on synthetic series, a real Prometheus scraping a server."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import grpc
import pytest
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2 as pb
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2_grpc as pb_grpc

from rnnstream.config import METRICS_PORT_AUTO, ServerConfig

from .conftest import ServerThread, free_port
from .test_metrics import HTTP, Scrape

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/rnnstream.json"
OBSERVABILITY_DOC = ROOT / "docs/observability.md"

# Exported only by a server with a model on a CUDA device.
CUDA_ONLY_METRICS = {"rnnstream_device_memory_allocated_bytes", "rnnstream_device_memory_reserved_bytes"}
METRIC_NAME = re.compile(r"\brnnstream_[a-z0-9_]*[a-z0-9]")
# Grafana's variables, replaced by values Prometheus accepts; 15 s spans several 1 s scrapes.
DASHBOARD_VARIABLES = {"$__rate_interval": "15s", "$instance": ".*", "$architecture": ".*"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; install Debian's prometheus package (.ci/run does)")
    return path


def dashboard_queries() -> list[str]:
    """Return the PromQL of every panel target and template variable of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+), \w+\)", variable["definition"])
            assert match, variable["definition"]
            queries.append(match.group(1))
    return queries


def expand(query: str) -> str:
    for variable, value in DASHBOARD_VARIABLES.items():
        query = query.replace(variable, value)
    return query


# -- promtool -------------------------------------------------------------------


def test_prometheus_config_valid():
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_alert_rules_valid():
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def firing(alertname: str, severity: str, **labels: str) -> dict:
    """An expected sample of the ALERTS series of a firing alert."""
    all_labels = {
        "__name__": "ALERTS",
        "alertname": alertname,
        "alertstate": "firing",
        "severity": severity,
        **labels,
    }
    series = ", ".join(f'{key}="{value}"' for key, value in all_labels.items() if key != "__name__")
    return {"labels": f"ALERTS{{{series}}}", "value": 1}


def test_alert_rules_fire(tmp_path):
    instance = {"job": "rnnstream", "instance": "10.0.0.2:9100"}
    lstm = {**instance, "model": "en-lstm", "architecture": "lstm", "device": "cpu"}
    gru = {**instance, "model": "en-gru", "architecture": "gru", "device": "cpu"}

    def series(name: str, values: str, **labels: str) -> dict:
        selector = ", ".join(f'{key}="{value}"' for key, value in labels.items())
        return {"series": f"{name}{{{selector}}}", "values": values}

    input_series = [
        series("up", "0x20", **instance),
        series("rnnstream_store_available", "1 0x19", **instance),
        # Step: 10 of every 70 calls UNAVAILABLE. GetSession: many NOT_FOUND, which is a client error.
        series("rnnstream_requests_total", "0+60x20", rpc="Step", code="OK", **instance),
        series("rnnstream_requests_total", "0+10x20", rpc="Step", code="UNAVAILABLE", **instance),
        series("rnnstream_requests_total", "0+1x20", rpc="GetSession", code="OK", **instance),
        series("rnnstream_requests_total", "0+60x20", rpc="GetSession", code="NOT_FOUND", **instance),
        # LSTM steps all take 250-500 ms; GRU steps all finish within 250 ms.
        series("rnnstream_model_step_seconds_bucket", "0x20", le="0.25", **lstm),
        series("rnnstream_model_step_seconds_bucket", "0+10x20", le="0.5", **lstm),
        series("rnnstream_model_step_seconds_bucket", "0+10x20", le="+Inf", **lstm),
        series("rnnstream_model_step_seconds_bucket", "0+10x20", le="0.25", **gru),
        series("rnnstream_model_step_seconds_bucket", "0+10x20", le="0.5", **gru),
        series("rnnstream_model_step_seconds_bucket", "0+10x20", le="+Inf", **gru),
        series("rnnstream_queue_wait_seconds_bucket", "0x20", le="0.5", **gru),
        series("rnnstream_queue_wait_seconds_bucket", "0+5x20", le="1.0", **gru),
        series("rnnstream_queue_wait_seconds_bucket", "0+5x20", le="+Inf", **gru),
        series("rnnstream_queued_steps", "100x20", **gru),
        series(
            "rnnstream_queued_steps", "0 200 0 200 0 200 0 200 0 200 0 200 0 200 0 200 0 200 0 200", **lstm
        ),
    ]
    expected = [
        firing("RnnstreamTargetDown", "critical", **instance),
        firing("RnnstreamNoReplicaUp", "critical"),
        firing("RnnstreamStoreUnavailable", "critical", **instance),
        firing("RnnstreamErrorRatioHigh", "warning", rpc="Step"),
        firing(
            "RnnstreamStepLatencyHigh",
            "warning",
            instance=lstm["instance"],
            architecture="lstm",
            device="cpu",
        ),
        firing(
            "RnnstreamQueueWaitHigh", "warning", instance=gru["instance"], model="en-gru", architecture="gru"
        ),
        firing("RnnstreamQueueBackingUp", "warning", **gru),
    ]
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": input_series,
                "promql_expr_test": [
                    {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "19m", "exp_samples": expected},
                    # Nothing fires before the `for` durations have passed.
                    {
                        "expr": 'ALERTS{alertstate="firing", alertname!="RnnstreamQueueBackingUp"}',
                        "eval_time": "1m",
                        "exp_samples": [],
                    },
                ],
            }
        ],
    }
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(json.dumps(tests, indent=2))  # JSON is YAML
    result = subprocess.run(
        [tool("promtool"), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- a real Prometheus --------------------------------------------------------------


class PrometheusProcess:
    """A Prometheus server on a free loopback port, scraping `targets` every second.

    Its data directory and log live under `directory`.
    """

    def __init__(self, directory: Path, targets: list[str]) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "rnnstream", "static_configs": [{"targets": targets}]}],
        }
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "prometheus.yml").write_text(json.dumps(config))
        self.log = (directory / "prometheus.log").open("w+")
        self.process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not self._ready():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"prometheus on port {self.port} did not start:\n{self.output()}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with HTTP.open(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with HTTP.open(url, timeout=10) as response:
            reply = json.load(response)
        assert reply["status"] == "success", reply
        return reply["data"]

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def monitored(redis_process, tiny_models_dir, tmp_path_factory):
    """A real rnnstream server with metrics on a free port, and a real Prometheus scraping it."""
    config = ServerConfig(
        models_dir=tiny_models_dir, port=0, redis_url=redis_process.url, metrics_port=METRICS_PORT_AUTO
    )
    server = ServerThread(config)
    try:
        prometheus = PrometheusProcess(
            tmp_path_factory.mktemp("prometheus"), [f"127.0.0.1:{server.app.metrics_port}"]
        )
    except BaseException:
        server.stop()
        raise
    yield server, prometheus
    prometheus.stop()
    server.stop()


def send_traffic(target: str) -> None:
    """Steps on both architectures, one Generate, and one NOT_FOUND."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RnnStreamStub(channel)
        for model in ("tiny-lstm", "tiny-gru"):
            session_id = stub.CreateSession(
                pb.CreateSessionRequest(model=model, prompt="ab"), timeout=10
            ).session_id
            for text in ("cd", "efg", "h"):
                stub.Step(pb.StepRequest(session_id=session_id, text=text), timeout=10)
            list(stub.Generate(pb.GenerateRequest(session_id=session_id, max_tokens=3), timeout=10))
            stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.GetSession(pb.GetSessionRequest(session_id="missing"), timeout=10)


def test_prometheus_p99_per_architecture(monitored):
    server, prometheus = monitored
    query = (
        "histogram_quantile(0.99, sum by (architecture, le) (rate(rnnstream_model_step_seconds_bucket[15s])))"
    )
    deadline = time.monotonic() + 40
    while True:
        send_traffic(server.target)
        result = prometheus.api("query", query=query)["result"]
        p99 = {item["metric"]["architecture"]: float(item["value"][1]) for item in result}
        if {"lstm", "gru"} <= p99.keys() and not any(math.isnan(value) for value in p99.values()):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"no p99 for both architectures within 40 s: {result}\n{prometheus.output()}")
        time.sleep(0.5)
    for architecture in ("lstm", "gru"):
        assert 0 < p99[architecture] <= 60, architecture  # within the histogram's finite buckets


def test_alert_rules_evaluate_in_prometheus(monitored):
    server, prometheus = monitored
    send_traffic(server.target)
    deadline = time.monotonic() + 30
    while True:
        rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        errors = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] == "err"}
        assert not errors, errors
        if rules and all(rule["health"] == "ok" for rule in rules):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"rules not evaluated within 30 s: {rules}")
        time.sleep(0.5)
    assert len(rules) == 7
    firing = [rule["name"] for rule in rules if rule["state"] == "firing"]
    assert firing == []


def test_dashboard_queries_return_data(monitored):
    server, prometheus = monitored
    queries = [
        query for query in dashboard_queries() if not CUDA_ONLY_METRICS & set(METRIC_NAME.findall(query))
    ]
    deadline = time.monotonic() + 40
    while True:
        send_traffic(server.target)
        empty = [query for query in queries if not prometheus.api("query", query=expand(query))["result"]]
        if not empty:
            break
        if time.monotonic() > deadline:
            pytest.fail("dashboard queries without data:\n" + "\n".join(empty))
        time.sleep(0.5)


# -- names the deploy files and docs use ------------------------------------------


def exported_names(server: ServerThread) -> set[str]:
    send_traffic(server.target)
    return Scrape(server.app.metrics_port).names()


def test_dashboard_and_alert_metrics_are_exported(monitored):
    server, _ = monitored
    exported = exported_names(server)
    used = {name for query in dashboard_queries() for name in METRIC_NAME.findall(query)}
    used |= set(METRIC_NAME.findall(ALERTS.read_text()))
    assert len(used) > 10
    cuda = any(model.runner.device.type == "cuda" for model in server.app.manager.models.values())
    expected = used if cuda else used - CUDA_ONLY_METRICS
    assert expected - exported == set()
    if not cuda:
        assert CUDA_ONLY_METRICS & exported == set()


def test_docs_list_every_metric(monitored):
    server, _ = monitored
    send_traffic(server.target)
    families = Scrape(server.app.metrics_port).families
    # prometheus_client also exports NAME_created gauges beside each counter and histogram.
    timed = {family.name for family in families if family.type in ("counter", "histogram")}
    exported = {
        family.name + "_total" if family.type == "counter" else family.name
        for family in families
        if not (family.name.endswith("_created") and family.name.removesuffix("_created") in timed)
    }
    documented = set(METRIC_NAME.findall(OBSERVABILITY_DOC.read_text()))
    assert exported - documented == set()
    assert CUDA_ONLY_METRICS <= documented
