"""The framework's ceiling for `pushrec bench`: a Faust agent that consumes the event topics with
the worker's micro-batching and decodes every record with the worker's codec, and nothing else.

Run as ``python -m pushrec.bench_agent EXPECTED OUT_JSON`` with the worker's ``PUSHREC_*``
environment; writes ``{"count", "first", "last"}`` (wall-clock seconds of the first and last
decoded record) to OUT_JSON once EXPECTED records were decoded, then stops.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import faust

from infra.settings import load_settings
from infra.stack import resolve_addresses
from stream.app import make_app, raw_topic
from stream.events import BadEvent, decode_event
from stream.topics import TopicNames


def main(expected: int, out: Path) -> None:
    settings = load_settings()
    kafka, _ = resolve_addresses(settings)
    names = TopicNames(settings.kafka.topic_prefix)
    app = make_app(settings, kafka, app_id=f"{settings.kafka.consumer_group}-ceiling")
    topic = raw_topic(app, *names.all_events)
    seen = {"count": 0, "first": 0.0, "last": 0.0}

    @app.agent(topic, name="pushrec.ceiling")
    async def decode_only(stream: faust.StreamT) -> None:
        batch = settings.worker
        async for events in stream.take_events(batch.batch_max, within=batch.batch_within_s):
            if not seen["count"]:
                seen["first"] = time.time()
            for event in events:
                try:  # noqa: SIM105 - contextlib.suppress costs more per event than the ceiling allows
                    decode_event(event.value, expected_type=names.type_of(event.message.topic))
                except BadEvent:
                    pass
            seen["count"] += len(events)
            if seen["count"] >= expected:
                seen["last"] = time.time()
                out.write_text(json.dumps(seen))
                os.kill(os.getpid(), signal.SIGTERM)

    faust.Worker(app, loglevel="warn", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
