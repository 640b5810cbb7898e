#!/usr/bin/python3
"""Turns scrapes of the metrics endpoint (files named by their Unix time in ms, one a
second) into one table for scripts/bench/metrics.gp: the dashboard's queries
(scripts/grafana-dashboard.json) computed between consecutive scrapes, with Python's
OpenMetrics parser (Debian's python3-prometheus-client), as Prometheus would compute them
over a 1 s window.

    metrics-samples.py SCRAPE_DIR WORKERS [T0_MS] > samples.dat

Time is in seconds from T0_MS (Unix ms), or from the first scrape.
"""

import os
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

CAUSES = ["crash", "hang", "panic", "memory", "requests", "reload", "scale"]
PROTOCOLS = ["http1", "http2", "upgraded"]


def parse(path):
    """{(sample name, frozenset(labels)): value} for one scrape."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def get(scrape, name, **labels):
    return scrape.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def total(scrape, name, **labels):
    """Sum over every series of `name` whose labels include `labels` (PromQL `sum`)."""
    want = {(k, str(v)) for k, v in labels.items()}
    return sum(v for (n, ls), v in scrape.items() if n == name and want <= ls)


def quantile(q, buckets):
    """histogram_quantile over [(le, cumulative count)], le ascending, +Inf last."""
    count = buckets[-1][1]
    if count <= 0:
        return float("nan")
    rank = q * count
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-12)
        prev_le, prev_c = le, c
    return prev_le


def bucket_bounds(scrape):
    """The histogram's `le` labels, as (bound, label text), ascending."""
    les = {dict(ls)["le"] for (n, ls) in scrape if n == "app_http_request_duration_seconds_bucket"}
    return sorted((float(le), le) for le in les)


def main():
    folder, workers = sys.argv[1], int(sys.argv[2])
    files = sorted(os.listdir(folder), key=int)
    scrapes = [(int(f) / 1000.0, parse(os.path.join(folder, f))) for f in files]
    t0 = int(sys.argv[3]) / 1000.0 if len(sys.argv) > 3 else scrapes[0][0]
    base = scrapes[0][1]
    cols = ["t", "rps_2xx", "rps_other", "p50_ms", "p99_ms"]
    cols += [f"w{w}_rps" for w in range(workers)]
    cols += PROTOCOLS
    cols += [f"w{w}_conns" for w in range(workers)]
    cols += CAUSES
    cols += ["reloads_ok", "reloads_failed", "reload_mean_ms"]
    cols += [f"w{w}_cpu" for w in range(workers)]
    cols += [f"w{w}_pss_mib" for w in range(workers)]
    cols += [f"w{w}_rtt_ms" for w in range(workers)]
    cols += ["in_kib_s", "out_kib_s", "budget_used", "budget_limit", "generation"]
    cols += [f"w{w}_accepts" for w in range(workers)]
    print(" ".join(cols))
    for (ta, a), (tb, b) in zip(scrapes, scrapes[1:]):
        dt = tb - ta
        rate = lambda name, **l: (total(b, name, **l) - total(a, name, **l)) / dt
        all_req = rate("app_http_requests_total")
        ok = rate("app_http_requests_total", status="2xx")
        les = bucket_bounds(b)
        buckets = [
            (
                bound,
                get(b, "app_http_request_duration_seconds_bucket", le=le)
                - get(a, "app_http_request_duration_seconds_bucket", le=le),
            )
            for bound, le in les
        ]
        row = [tb - t0, ok, all_req - ok, quantile(0.5, buckets) * 1e3, quantile(0.99, buckets) * 1e3]
        row += [rate("app_worker_requests_total", worker=w) for w in range(workers)]
        row += [total(b, "app_http_connections_open", protocol=p) for p in PROTOCOLS]
        row += [total(b, "app_http_connections_open", worker=w) for w in range(workers)]
        # increase() since the first scrape, as the dashboard's [5m] window shows a short run.
        row += [
            get(b, "app_worker_restarts_total", cause=c) - get(base, "app_worker_restarts_total", cause=c)
            for c in CAUSES
        ]
        row += [
            get(b, "app_reloads_total", outcome=o) - get(base, "app_reloads_total", outcome=o)
            for o in ("ok", "failed")
        ]
        n = get(b, "app_reload_duration_seconds_count")
        row += [get(b, "app_reload_duration_seconds_sum") / n * 1e3 if n else float("nan")]
        row += [rate("app_worker_cpu_seconds_total", worker=w) for w in range(workers)]
        row += [get(b, "app_worker_pss_bytes", worker=w) / 2**20 for w in range(workers)]
        row += [get(b, "app_worker_heartbeat_rtt_seconds", worker=w) * 1e3 for w in range(workers)]
        row += [
            rate("app_http_request_body_bytes_total") / 1024,
            rate("app_http_response_body_bytes_total") / 1024,
            get(b, "app_restart_budget_used"),
            get(b, "app_restart_budget_limit"),
            get(b, "app_generation"),
        ]
        row += [rate("app_worker_accepted_connections_total", worker=w) for w in range(workers)]
        print(" ".join(f"{v:.6g}" for v in row))


if __name__ == "__main__":
    main()
