"""Redis URL forms: parsing, Sentinel with a real failover, and TLS with a password, all on loopback."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
from redis.connection import SSLConnection
from rnnstream_client import Client

from rnnstream.errors import StoreUnavailable
from rnnstream.state.redis_connect import parse_redis_url
from rnnstream.state.redis_store import SAVE_SCRIPT, LuaScript, RedisStore

from .conftest import REDIS_SERVER, RedisProcess, free_port
from .test_store import make_record

OPENSSL = shutil.which("openssl")


def test_cluster_url():
    target = parse_redis_url("redis+cluster://app:secret@node-a:7000,node-b,[::1]:7002")
    assert target.kind == "cluster"
    assert target.nodes == [("node-a", 7000), ("node-b", 6379), ("::1", 7002)]
    assert target.options == {"username": "app", "password": "secret"}
    assert target.description == "redis cluster via node-a:7000,node-b:6379,[::1]:7002"


def test_tls_cluster_url_keeps_query_options():
    target = parse_redis_url("rediss+cluster://node-a:7000/0?ssl_ca_certs=/etc/ca.pem")
    assert target.options["connection_class"] is SSLConnection
    assert target.options["ssl_ca_certs"] == "/etc/ca.pem"


def test_sentinel_url():
    target = parse_redis_url("redis+sentinel://:secret@sentinel-a:26380,sentinel-b/sessions/2")
    assert target.kind == "sentinel"
    assert target.nodes == [("sentinel-a", 26380), ("sentinel-b", 26379)]
    assert target.service == "sessions"
    assert target.options == {"password": "secret", "db": 2}
    assert "secret" not in target.description


def test_tls_sentinel_url_sets_ssl_flag():
    target = parse_redis_url("rediss+sentinel://sentinel-a/sessions")
    assert target.options == {"ssl": True}


def test_single_server_urls():
    assert parse_redis_url("redis://:secret@10.0.0.5:6380/3").description == "redis at 10.0.0.5:6380/3"
    assert parse_redis_url("unix:///run/redis.sock?db=2").description == "redis at /run/redis.sock/2"


@pytest.mark.parametrize("url, message", [
    ("redis+cluster://node-a:7000/1", "Redis Cluster has only database 0"),
    ("redis+sentinel://sentinel-a:26379", "missing Sentinel service name"),
    ("redis+sentinel://sentinel-a/a/1/x", "missing Sentinel service name"),
    ("redis+cluster://node-a:port", "invalid port 'port'"),
    ("redis+cluster://node-a:70000", "invalid port 70000"),
    ("redis+cluster://", "no hosts"),
    ("memcached://user:secret@cache:11211", "unsupported Redis URL scheme 'memcached'"),
])
def test_invalid_urls_are_rejected(url, message):
    with pytest.raises(ValueError, match=message) as raised:
        parse_redis_url(url)
    assert "secret" not in str(raised.value)


class SentinelProcess:
    """redis-server in Sentinel mode, watching one master under the name `sessions`."""

    def __init__(self, directory: Path, master_port: int) -> None:
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "sentinel.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor sessions 127.0.0.1 {master_port} 1\n"
            "sentinel down-after-milliseconds sessions 1000\n"
            "sentinel failover-timeout sessions 10000\n"
        )
        self.process = subprocess.Popen(
            [REDIS_SERVER, str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.client = redis.Redis(port=self.port, socket_connect_timeout=0.5, decode_responses=True)

    def wait_for(self, check, event: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check(self.client):
                    return
            except redis.exceptions.RedisError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Sentinel on port {self.port}: {event} did not happen")
            time.sleep(0.1)

    def master_port(self) -> int:
        return int(self.client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "sessions")[1])

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def start_replica(directory: Path, master_port: int) -> tuple[subprocess.Popen, redis.Redis, int]:
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(directory), "--replicaof", "127.0.0.1", str(master_port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.5, decode_responses=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            if client.info("replication").get("master_link_status") == "up":
                return process, client, port
        except redis.exceptions.RedisError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            client.close()
            process.kill()
            process.wait(10)
            raise RuntimeError(f"replica on port {port} did not sync with its master")
        time.sleep(0.05)


def eventually(action, timeout: float = 30):
    """Retry `action` while the store reports StoreUnavailable, as a server's clients would."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_sentinel_store_follows_failover(tmp_path):
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed; .ci/run installs it with apt-get")
    with contextlib.ExitStack() as cleanup:
        master = RedisProcess(tmp_path / "master").start()
        cleanup.callback(master.stop)
        replica, replica_client, replica_port = start_replica(tmp_path / "replica", master.port)
        cleanup.callback(replica.wait, 10)
        cleanup.callback(replica.kill)
        cleanup.callback(replica_client.close)
        sentinel = SentinelProcess(tmp_path / "sentinel", master.port)
        cleanup.callback(sentinel.stop)
        store = RedisStore(f"redis+sentinel://127.0.0.1:{sentinel.port}/sessions/0", timeout_s=1.0)
        cleanup.callback(store.close)

        sentinel.wait_for(
            lambda client: len(client.execute_command("SENTINEL", "REPLICAS", "sessions")) == 1,
            "discovering the replica",
        )
        assert store.description == f"redis master 'sessions' via sentinels 127.0.0.1:{sentinel.port}, db 0"
        assert store.create(make_record("before-failover"))
        assert store.save(make_record("before-failover", position=3), 0).status.value == "saved"
        assert redis.Redis(port=master.port).wait(1, 5000) == 1  # the replica has the session
        # Redis 7 does not replicate its script cache, so the replica lacks the save script.
        assert replica_client.script_exists(LuaScript(SAVE_SCRIPT).sha) == [False]

        master.stop()
        sentinel.wait_for(lambda client: sentinel.master_port() == replica_port, "failover to the replica")

        assert eventually(lambda: store.load("before-failover")).position == 3
        # This save goes through the NOSCRIPT reload on the promoted replica.
        saved = eventually(lambda: store.save(make_record("before-failover", position=5), 3))
        assert saved.status.value == "saved"
        assert eventually(lambda: store.create(make_record("after-failover")))
        assert replica_client.hget("rnnstream:session:{after-failover}", "position") == "0"


def test_sentinel_without_master_is_unavailable():
    store = RedisStore(f"redis+sentinel://127.0.0.1:{free_port()}/sessions", timeout_s=0.5)
    with pytest.raises(StoreUnavailable, match="redis master 'sessions' via sentinels"):
        store.ping()
    store.close()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """redis-server accepting only TLS, with a certificate for 127.0.0.1 and a password."""
    if REDIS_SERVER is None or OPENSSL is None:
        pytest.fail("redis-server and openssl are not installed; .ci/run installs redis-server with apt-get")
    directory = tmp_path_factory.mktemp("redis-tls")

    def openssl(*args: str) -> None:
        subprocess.run([OPENSSL, *args], check=True, capture_output=True, cwd=directory, timeout=60)

    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec_key, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=rnnstream test CA",
            "-days", "2")
    openssl("req", *ec_key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.ext")

    port = free_port()
    log = directory / "redis.log"
    process = subprocess.Popen(
        [
            REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(directory / "server.crt"), "--tls-key-file", str(directory / "server.key"),
            "--tls-ca-cert-file", str(directory / "ca.crt"), "--tls-auth-clients", "no",
            "--requirepass", "s3cret-pass", "--save", "", "--appendonly", "no", "--dir", str(directory),
            "--logfile", str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = redis.Redis(
        host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(directory / "ca.crt"), password="s3cret-pass",
        socket_connect_timeout=0.5,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if process.poll() is not None:
                    output = log.read_text() if log.exists() else ""
                    if "TLS" in output and "not" in output.lower():
                        pytest.skip(f"this redis-server is built without TLS: {output.strip()[-200:]}")
                    raise RuntimeError(f"TLS redis-server did not start:\n{output}")
                if time.monotonic() > deadline:
                    raise RuntimeError("TLS redis-server did not respond to PING")
                time.sleep(0.05)
        yield port, directory / "ca.crt"
    finally:
        client.close()
        process.kill()
        process.wait(10)


def test_tls_with_password(tls_redis):
    port, ca = tls_redis
    store = RedisStore(f"rediss://default:s3cret-pass@127.0.0.1:{port}/0?ssl_ca_certs={ca}")
    try:
        assert store.create(make_record("tls-session"))
        assert store.load("tls-session").position == 0
        assert store.description == f"redis at 127.0.0.1:{port}/0"
    finally:
        store.close()


def test_tls_wrong_password_is_unavailable(tls_redis):
    port, ca = tls_redis
    store = RedisStore(f"rediss://default:wrong-pass@127.0.0.1:{port}/0?ssl_ca_certs={ca}", timeout_s=1.0)
    with pytest.raises(StoreUnavailable) as raised:
        store.ping()
    assert "wrong-pass" not in str(raised.value)
    store.close()


def test_plain_connection_to_tls_port_is_unavailable(tls_redis):
    port, _ = tls_redis
    store = RedisStore(f"redis://default:s3cret-pass@127.0.0.1:{port}/0", timeout_s=0.5)
    with pytest.raises(StoreUnavailable):
        store.ping()
    store.close()


def test_server_steps_sessions_over_tls(start_server, tls_redis):
    port, ca = tls_redis
    server = start_server(redis_url=f"rediss://default:s3cret-pass@127.0.0.1:{port}/0?ssl_ca_certs={ca}")
    with Client(server.target) as client:
        session = client.create_session("tiny-gru", prompt="In the beginning")
        assert session.step(" God").position == len("In the beginning God")
