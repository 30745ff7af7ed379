"""How stale the group's item state is, live (docs/benchmarks.md, "The group's item state"): two
workers on four partitions of the running stack, a slice of a log replayed at a fixed rate, each
worker's ``pushrec_item_state_lag_seconds`` sampled every 0.5 s.

    pushrec stack up
    python tools/item_state_lag.py ../shared/datasets/taobao/events.jsonl.gz --events 20000 --rate 1500

Uses fresh topic, group and key names; the servers come from the environment
(``PUSHREC_KAFKA_BOOTSTRAP``/``PUSHREC_REDIS_URL``) or the embedded stack.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.metrics import metric_sum, scrape  # noqa: E402
from infra.settings import load_settings  # noqa: E402
from infra.stack import free_port, resolve_addresses  # noqa: E402
from stream.replay import read_lines  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", help="JSON Lines log, may be .gz")
    parser.add_argument("--events", dest="count", type=int, default=20_000, help="events replayed")
    parser.add_argument("--rate", type=int, default=1500, help="events per second")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    kafka, redis_url = resolve_addresses(load_settings())
    prefix = f"lag{int(time.time())}"
    work = Path(tempfile.mkdtemp(prefix="pushrec-lag-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHREC_")}
    env.update(
        PUSHREC_KAFKA_BOOTSTRAP=kafka.bootstrap,
        PUSHREC_REDIS_URL=redis_url,
        PUSHREC_KAFKA__TOPIC_PREFIX=prefix,
        PUSHREC_KAFKA__CONSUMER_GROUP=f"{prefix}-worker",
        PUSHREC_REDIS__KEY_PREFIX=f"{prefix}:",
        PUSHREC_KAFKA__PARTITIONS="4",
        PUSHREC_STATE_DIR=str(work),
        PUSHREC_CHECKPOINT__STORE="redis",
    )
    log = work / "events.jsonl"
    lines = itertools.islice(read_lines(Path(args.events)), args.count)
    log.write_bytes(b"".join(line + b"\n" for _, line in lines))
    ports = [free_port() for _ in range(args.workers)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "pushrec.cli", "worker", "--metrics-port", str(port)],
            env=env,
            stdout=open(work / f"worker{n}.log", "wb"),  # noqa: SIM115 - owned by the child
            stderr=subprocess.STDOUT,
        )
        for n, port in enumerate(ports)
    ]
    try:
        time.sleep(20)  # the group forms
        replay = subprocess.Popen(
            [sys.executable, "-m", "pushrec.cli", "replay", str(log), "--rate", str(args.rate)],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        lags: list[list[float]] = [[] for _ in ports]
        while replay.poll() is None:
            for samples, port in zip(lags, ports, strict=True):
                samples.append(metric_sum(scrape(port), "pushrec_item_state_lag_seconds"))
            time.sleep(0.5)
        time.sleep(5)
        for n, (samples, port) in enumerate(zip(lags, ports, strict=True)):
            metrics = scrape(port)
            print(
                f"worker {n}: {metric_sum(metrics, 'pushrec_events_total'):.0f} events; item state lag "
                f"p50 {statistics.median(samples):.2f} s, max {max(samples):.2f} s; records published "
                f"{metric_sum(metrics, 'pushrec_item_delta_records_total', outcome='published'):.0f}, "
                f"applied {metric_sum(metrics, 'pushrec_item_delta_records_total', outcome='applied'):.0f}"
            )
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(60)


if __name__ == "__main__":
    main()
