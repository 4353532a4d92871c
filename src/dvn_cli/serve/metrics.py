"""The counters of ``dvn serve``'s ``/metrics`` (Prometheus text) and ``/v1/status``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

__all__ = ["LATENCY_BUCKETS", "Metrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds, in seconds, of the buckets of the request latency histogram."""


@dataclass
class Metrics:
    """Requests by endpoint and status, their latency, switches and predictions served; updated on the event loop
    only."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)  # (endpoint, status) -> count
    latency: dict[str, list[int]] = field(default_factory=dict)  # endpoint -> count per bucket (last: +Inf)
    latency_sum: dict[str, float] = field(default_factory=dict)
    switches: int = 0
    served: int = 0

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1
        counts = self.latency.setdefault(endpoint, [0] * (len(LATENCY_BUCKETS) + 1))
        counts[next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))] += 1
        self.latency_sum[endpoint] = self.latency_sum.get(endpoint, 0.0) + seconds

    def text(self, choices: dict[str, int], held: int) -> str:
        """The Prometheus text exposition format (version 0.0.4), with the running levels and the bytes held."""
        lines = [
            "# HELP dvn_requests_total Requests answered, by endpoint and status.",
            "# TYPE dvn_requests_total counter",
        ]
        lines += [f'dvn_requests_total{{endpoint="{e}",code="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
        lines += ["# HELP dvn_request_seconds Time to answer a request.", "# TYPE dvn_request_seconds histogram"]
        for endpoint, counts in sorted(self.latency.items()):
            for bound, total in zip([*map(str, LATENCY_BUCKETS), "+Inf"], itertools.accumulate(counts), strict=True):
                lines.append(f'dvn_request_seconds_bucket{{endpoint="{endpoint}",le="{bound}"}} {total}')
            lines.append(f'dvn_request_seconds_sum{{endpoint="{endpoint}"}} {self.latency_sum[endpoint]}')
            lines.append(f'dvn_request_seconds_count{{endpoint="{endpoint}"}} {sum(counts)}')
        lines += ["# HELP dvn_level The level each task runs at.", "# TYPE dvn_level gauge"]
        lines += [f'dvn_level{{task="{task}"}} {level}' for task, level in choices.items()]
        lines += ["# HELP dvn_held_bytes Weight bytes held for the running levels.", "# TYPE dvn_held_bytes gauge"]
        lines += [f"dvn_held_bytes {held}", "# HELP dvn_switches_total Level switches so far."]
        lines += ["# TYPE dvn_switches_total counter", f"dvn_switches_total {self.switches}"]
        return "\n".join(lines) + "\n"
