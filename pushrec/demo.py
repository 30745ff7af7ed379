"""`pushrec demo`: the whole system, embedded, on a bundled sample; leaves nothing running.

The sample is the first 3,000 invoice lines of the UCI "Online Retail" data set (Daqing Chen,
2015; CC BY 4.0), converted to pushrec's event format.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import orjson
from kafka import KafkaProducer

from infra.kafka import KafkaAccess
from infra.metrics import metric_sum, scrape
from infra.settings import Settings
from infra.stack import EmbeddedStack, free_port
from stream.replay import Pacing, Replayer, read_lines
from stream.topics import TopicNames, ensure_topics

SAMPLE_EVENTS = Path(str(files("pushrec") / "data" / "sample-events.jsonl.gz"))
SAMPLE_ITEMS = Path(str(files("pushrec") / "data" / "sample-items.jsonl.gz"))

# Records produced straight to the topics, to show the dead-letter path.
MALFORMED = [
    ("purchase", b"this is not json"),
    ("click", b'{"event_id": "x1", "type": "like", "user_id": "u", "item_id": "i", "ts": 1}'),
    ("view", b'{"event_id": "x2", "type": "view", "user_id": "", "item_id": "i", "ts": 1}'),
    ("purchase", b'{"event_id": "x3", "type": "purchase", "user_id": "u", "item_id": "i", "ts": NaN}'),
]


def wait_for(
    what: str, check: Callable[[], bool], timeout_s: float, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {proc.returncode}")
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        time.sleep(0.25)
    raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_demo(settings: Settings, users_to_show: int = 3) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="pushrec-demo-"))
    stack = EmbeddedStack(workdir / "stack")
    children: list[subprocess.Popen] = []
    logs: list[Path] = []
    try:
        print("[1/5] starting the embedded Kafka broker (Tansu) and Valkey ...", flush=True)
        state = stack.up()
        names = TopicNames(settings.kafka.topic_prefix)
        ensure_topics(KafkaAccess(state.kafka_bootstrap), names.all, settings.kafka.partitions)
        print(f"      kafka={state.kafka_bootstrap} redis={state.redis_url}")
        env = {
            **os.environ,
            "PUSHREC_KAFKA_BOOTSTRAP": state.kafka_bootstrap,
            "PUSHREC_REDIS_URL": state.redis_url,
            "PUSHREC_STATE_DIR": str(stack.state_dir),
            # The sample is replayed in seconds: shoppers count as gone after 2 s of silence
            # (not half an hour), carts as abandoned after 4 s (not 4 h), and pushes go out when
            # decided (no waiting for the shopper's hour).
            "PUSHREC_PUSH__AWAY_AFTER_S": "2",
            "PUSHREC_PUSH__CART_AFTER_S": "4",
            "PUSHREC_PUSH__SEND_TIME": "false",
        }
        worker_port, sender_port = free_port(), free_port()
        outbox = workdir / "outbox.jsonl"
        for name, cmd in (
            ("worker", ["worker", "--metrics-port", str(worker_port)]),
            ("push-sender", ["push-sender", "--outbox", str(outbox), "--metrics-port", str(sender_port)]),
        ):
            log_path = workdir / f"{name}.log"
            logs.append(log_path)
            with open(log_path, "wb") as log_file:
                children.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "pushrec.cli", *cmd],
                        env=env,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
        worker, sender = children
        wait_for(
            "the worker to join its consumer group",
            lambda: metric_sum(scrape(worker_port), "pushrec_worker_assigned_partitions") > 0,
            60,
            worker,
        )
        print(f"[2/5] worker (metrics on :{worker_port}) and push sender running", flush=True)

        print(f"[3/5] replaying {SAMPLE_EVENTS.name} (UCI Online Retail excerpt, CC BY 4.0) ...")
        replayer = Replayer(
            KafkaAccess(state.kafka_bootstrap),
            names,
            settings.events.limits,
        )
        try:
            summary = replayer.replay(SAMPLE_EVENTS, SAMPLE_ITEMS, Pacing())
        finally:
            replayer.close()
        sent = sum(summary.sent.values())
        producer = KafkaProducer(bootstrap_servers=state.kafka_bootstrap)
        for kind, raw in MALFORMED:
            producer.send(names.events(kind), key=b"demo", value=raw)
        producer.flush()
        producer.close()
        print(
            f"      {sent} events and {summary.items_sent} items sent, "
            f"plus {len(MALFORMED)} malformed records produced straight to the topics"
        )

        expected = sent + len(MALFORMED)
        wait_for(
            "the worker to consume every record",
            lambda: metric_sum(scrape(worker_port), "pushrec_events_total") >= expected,
            120,
            worker,
        )
        wait_for(
            "the push sender to drain the refresh stream",
            lambda: _sender_drained(sender_port, worker_port),
            60,
            sender,
        )

        print("[4/5] results")
        samples = scrape(worker_port)
        _print_lists(state.redis_url, settings, _most_active_users(users_to_show))
        _print_pushes(outbox)
        _print_metrics(samples, scrape(sender_port))
        print("[5/5] stopping worker, sender and stack")
        return 0
    except BaseException as exc:
        for log_path in logs:
            with contextlib.suppress(OSError):
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                print(f"--- last lines of {log_path.name}:\n" + "\n".join(tail), file=sys.stderr)
        if isinstance(exc, RuntimeError):
            print(f"pushrec demo: {exc}", file=sys.stderr)
            return 1
        raise
    finally:
        for proc in children:
            stop_process(proc)
        stack.down()
        shutil.rmtree(workdir, ignore_errors=True)


def _sender_drained(sender_port: int, worker_port: int) -> bool:
    refreshes = metric_sum(scrape(worker_port), "pushrec_list_refreshes_total")
    sender = scrape(sender_port)
    observed = metric_sum(sender, "pushrec_push_entries_total") >= refreshes > 0
    return observed and metric_sum(sender, "pushrec_push_due") + metric_sum(sender, "pushrec_push_held") == 0


def _most_active_users(n: int) -> list[str]:
    counts = Counter(orjson.loads(line)["user_id"] for _, line in read_lines(SAMPLE_EVENTS))
    return [user for user, _ in counts.most_common(n)]


def _print_lists(redis_url: str, settings: Settings, users: list[str]) -> None:
    import asyncio

    from infra.store import Keys, RedisTopNStore, connect

    titles = {}
    for _, line in read_lines(SAMPLE_ITEMS):
        item = orjson.loads(line)
        titles[item["item_id"]] = item.get("title", "")

    async def read_all() -> list:
        client = connect(redis_url, retries=1)
        store = RedisTopNStore(client, Keys(settings.redis.key_prefix))
        try:
            return [await store.read(u) for u in users]
        finally:
            await client.aclose()

    for stored in asyncio.run(read_all()):
        if stored is None:
            continue
        segment = f", segment: {', '.join(stored.tags)}" if stored.tags else ""
        print(f"  user {stored.user_id} (list v{stored.version}, model {stored.model}{segment}):")
        for rank, entry in enumerate(stored.items[:5], 1):
            title = titles.get(entry["item_id"], "")
            reason = f"  <- {entry['reason']}" if entry.get("reason") else ""
            print(f"    {rank}. {entry['item_id']:<8} {entry['score']:+.3f}  {title}{reason}")


def _print_pushes(outbox: Path) -> None:
    lines = outbox.read_bytes().splitlines() if outbox.exists() else []
    print(f"  {len(lines)} push notifications in the outbox; the first three:")
    for line in lines[:3]:
        print(f"    {line.decode()}")


def _print_metrics(worker: dict, sender: dict) -> None:
    print("  metrics:")
    for outcome in ("processed", "dead_letter", "duplicate"):
        print(
            f"    pushrec_events_total{{outcome={outcome}}} = "
            f"{metric_sum(worker, 'pushrec_events_total', outcome=outcome):.0f}"
        )
    reasons = {
        dict(lab)["reason"]: v for (n, lab), v in worker.items() if n == "pushrec_dead_letters_total" and v
    }
    print(f"    pushrec_dead_letters_total by reason = {reasons}")
    print(f"    pushrec_list_refreshes_total = {metric_sum(worker, 'pushrec_list_refreshes_total'):.0f}")
    count = metric_sum(worker, "pushrec_event_to_list_seconds_count")
    total = metric_sum(worker, "pushrec_event_to_list_seconds_sum")
    if count:
        print(f"    mean event-to-list latency = {total / count * 1000:.1f} ms over {count:.0f} events")
    print(f"    pushrec_prequential_hit_rate = {metric_sum(worker, 'pushrec_prequential_hit_rate'):.3f}")
    pushes = {dict(lab)["outcome"]: int(v) for (n, lab), v in sender.items() if n == "pushrec_pushes_total"}
    print(f"    pushrec_pushes_total by outcome = {pushes}")
