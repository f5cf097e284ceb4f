"""Redis URLs for the session store: one server, a Redis Cluster, or a master found through Sentinel.

Accepted forms (USER:PASSWORD@ is optional everywhere; query options such as
ssl_ca_certs=PATH are those of redis-py's Redis.from_url):

  redis://HOST:PORT/DB, rediss://HOST:PORT/DB, unix:///PATH?db=DB
      one server, plain TCP, TLS or a Unix socket (redis-py's own URL forms)
  redis+cluster://HOST:PORT[,HOST:PORT...]    rediss+cluster://...
      a Redis Cluster; the listed nodes are the startup nodes the client
      discovers the cluster from. Database 0 only.
  redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]    rediss+sentinel://...
      the master that the listed Sentinels name for SERVICE (default port
      26379). USER:PASSWORD and rediss apply to the master; the Sentinels
      themselves are reached over plain TCP without a password.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.cluster
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.connection import parse_url
from redis.retry import Retry

REDIS_PORT = 6379
SENTINEL_PORT = 26379
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SENTINEL_SCHEMES = {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}


@dataclasses.dataclass
class RedisTarget:
    """A parsed Redis URL: which kind of deployment, its nodes, and the connection options."""

    kind: str  # "server", "cluster" or "sentinel"
    url: str  # for "server": the URL as given, for redis-py's from_url
    nodes: list[tuple[str, int]]  # startup nodes or Sentinels; empty for "server"
    service: str | None  # Sentinel service name
    options: dict  # connection keyword arguments: username, password, db, ssl options

    @property
    def description(self) -> str:
        """Where the sessions live, without credentials."""
        nodes = ",".join(_join_host_port(host, port) for host, port in self.nodes)
        if self.kind == "cluster":
            return f"redis cluster via {nodes}"
        if self.kind == "sentinel":
            return f"redis master {self.service!r} via sentinels {nodes}, db {self.options.get('db', 0)}"
        options = parse_url(self.url)
        where = options.get("path") or f"{options.get('host', 'localhost')}:{options.get('port', REDIS_PORT)}"
        return f"redis at {where}/{options.get('db', 0)}"


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_host_port(text: str, default_port: int, url: str) -> tuple[str, int]:
    """Split HOST[:PORT] or [IPV6][:PORT]."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid host {text!r} in Redis URL {_redact(url)}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"missing host in Redis URL {_redact(url)}")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError as error:
        raise ValueError(f"invalid port {port_text!r} in Redis URL {_redact(url)}") from error
    if not 0 < port < 65536:
        raise ValueError(f"invalid port {port} in Redis URL {_redact(url)}")
    return host, port


def _redact(url: str) -> str:
    """Return the URL with any password replaced by ***, for error messages."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    netloc = f"{userinfo}@{hosts}" if at else hosts
    return urlunsplit(parts._replace(netloc=netloc))


def parse_redis_url(url: str) -> RedisTarget:
    """Parse any accepted form; raise ValueError naming the problem (passwords are never echoed)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        parse_url(url)  # validates; raises ValueError on a bad query option
        return RedisTarget("server", url, [], None, {})
    if scheme in CLUSTER_SCHEMES:
        base_scheme, default_port = CLUSTER_SCHEMES[scheme], REDIS_PORT
    elif scheme in SENTINEL_SCHEMES:
        base_scheme, default_port = SENTINEL_SCHEMES[scheme], SENTINEL_PORT
    else:
        raise ValueError(
            f"unsupported Redis URL scheme {parts.scheme!r} in {_redact(url)}; expected redis, rediss, unix, "
            "redis+cluster, rediss+cluster, redis+sentinel or rediss+sentinel"
        )

    userinfo, at, hosts = parts.netloc.rpartition("@")
    nodes = [_split_host_port(item.strip(), default_port, url) for item in hosts.split(",") if item.strip()]
    if not nodes:
        raise ValueError(f"no hosts in Redis URL {_redact(url)}")
    segments = [segment for segment in parts.path.split("/") if segment]

    if scheme in CLUSTER_SCHEMES:
        service, path = None, ""
        if segments not in ([], ["0"]):
            raise ValueError(f"Redis Cluster has only database 0; remove the path from {_redact(url)}")
    else:
        if not 1 <= len(segments) <= 2:
            raise ValueError(f"missing Sentinel service name in {_redact(url)}; expected .../SERVICE[/DB]")
        service = segments[0]
        path = "/" + segments[1] if len(segments) == 2 else ""

    # redis-py parses credentials, database and query options from a one-host URL of the same scheme.
    placeholder = f"{base_scheme}://{userinfo}{at}placeholder{path}"
    options = parse_url(placeholder + (f"?{parts.query}" if parts.query else ""))
    options.pop("host", None)
    options.pop("port", None)
    if scheme in SENTINEL_SCHEMES and options.pop("connection_class", None) is not None:
        options["ssl"] = True  # Sentinel pools pick their own TLS connection class from this flag.
    return RedisTarget(scheme.split("+")[1], url, nodes, service, options)


def connect(target: RedisTarget, timeout_s: float):
    """Create a redis-py client for the target; only the Redis Cluster client connects at once."""
    common = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": 10,
    }
    retry = Retry(ExponentialBackoff(cap=0.05, base=0.01), 1)
    if target.kind == "server":
        return redis.Redis.from_url(target.url, retry=retry, **common)
    if target.kind == "cluster":
        startup_nodes = [redis.cluster.ClusterNode(host, port) for host, port in target.nodes]
        return redis.cluster.RedisCluster(
            startup_nodes=startup_nodes, retry=retry, **common, **target.options
        )
    sentinel = redis.sentinel.Sentinel(
        target.nodes,
        sentinel_kwargs={"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s},
    )
    return sentinel.master_for(target.service, retry=retry, **common, **target.options)
