"""Batch statistics of one model, read from a server's Prometheus metrics endpoint.

The server exports histograms labelled by model (see rnnstream.metrics). The
difference of their _sum and _count series between two scrapes gives the mean
batch size and the mean time of each batch phase over the time between them.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, fields

from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT_S = 5.0

# ServerStats field -> histogram name; each histogram contributes <name>_sum and <name>_count.
HISTOGRAMS = {
    "batch_size": "rnnstream_batch_size",
    "step": "rnnstream_model_step_seconds",
    "load": "rnnstream_state_load_seconds",
    "save": "rnnstream_state_save_seconds",
    "queue_wait": "rnnstream_queue_wait_seconds",
}


@dataclass(frozen=True)
class Totals:
    sum: float = 0.0
    count: float = 0.0

    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None


@dataclass(frozen=True)
class ServerStats:
    """Histogram totals of one model: cumulative from one scrape, or the change between two."""

    batch_size: Totals = Totals()
    step: Totals = Totals()
    load: Totals = Totals()
    save: Totals = Totals()
    queue_wait: Totals = Totals()

    def since(self, earlier: ServerStats) -> ServerStats:
        return ServerStats(
            **{
                item.name: Totals(
                    getattr(self, item.name).sum - getattr(earlier, item.name).sum,
                    getattr(self, item.name).count - getattr(earlier, item.name).count,
                )
                for item in fields(self)
            }
        )

    @property
    def batches(self) -> int:
        return int(self.batch_size.count)

    def summary(self) -> dict:
        """Return the means: batch size in sessions, phase times in milliseconds (None where nothing was observed)."""

        def milliseconds(totals: Totals) -> float | None:
            mean = totals.mean()
            return None if mean is None else mean * 1000

        return {
            "batches": self.batches,
            "mean_batch_size": self.batch_size.mean(),
            "mean_step_ms": milliseconds(self.step),
            "mean_load_ms": milliseconds(self.load),
            "mean_save_ms": milliseconds(self.save),
            "mean_queue_wait_ms": milliseconds(self.queue_wait),
        }


def parse_server_stats(text: str, model: str) -> ServerStats:
    """Sum the histograms of `model` (over every device and architecture label) in Prometheus text."""
    totals = {name: [0.0, 0.0] for name in HISTOGRAMS}
    by_metric = {metric: name for name, metric in HISTOGRAMS.items()}
    for family in text_string_to_metric_families(text):
        name = by_metric.get(family.name)
        if name is None:
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name == family.name + "_sum":
                totals[name][0] += sample.value
            elif sample.name == family.name + "_count":
                totals[name][1] += sample.value
    return ServerStats(**{name: Totals(*values) for name, values in totals.items()})


def scrape_server_stats(url: str, model: str) -> ServerStats:
    """Fetch `url` and parse the batch histograms of `model`; raise OSError when the request fails."""
    # An empty proxy handler reads the endpoint directly, ignoring http_proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=SCRAPE_TIMEOUT_S) as response:
        text = response.read().decode("utf-8")
    return parse_server_stats(text, model)
