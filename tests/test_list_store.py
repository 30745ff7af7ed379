"""The list store process: the model process's writes go to Redis from a process of its own, a
Redis outage comes back as the Redis error it is (the writer keeps the lists pending), and a
store process that died is a bug, not an outage."""

from __future__ import annotations

import os

import orjson
import pytest
import redis

from consumers.list_store import ListStore, ListStoreGone
from infra.stack import free_port
from infra.store import REDIS_UNAVAILABLE, redis_error_kind
from online_models.recommender import TopN
from stream.events import Item
from tests.conftest import Hermetic

pytestmark = pytest.mark.integration


def test_lists_and_items_are_written_by_a_process_of_its_own(hermetic: Hermetic) -> None:
    store = ListStore(hermetic.settings(), hermetic.servers.redis_url)
    top = TopN("ann", ["i1", "i2"], [0.9, 0.1], "pushrec", ["because", "popular right now"])
    try:
        store.send([Item("i1", title="red wool hat")], [top])
        written = store.answer()
        assert store.pid is not None and store.pid != os.getpid()
        client = redis.Redis.from_url(hermetic.servers.redis_url)
        stored = client.hgetall(f"{hermetic.prefix}:recs:ann")
        assert [i["item_id"] for i in orjson.loads(stored[b"items"])] == ["i1", "i2"]
        assert client.hget(f"{hermetic.prefix}:item:i1", "title") == b"red wool hat"
        assert float(stored[b"refreshed_at"]) <= written
        process = store.process
    finally:
        store.close()
    assert process.exitcode == 0  # ended when asked


def test_a_redis_away_comes_back_as_a_redis_error_and_a_dead_store_as_a_bug(hermetic: Hermetic) -> None:
    settings = hermetic.settings(PUSHREC_REDIS__RETRIES="0")
    away = ListStore(settings, f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
    try:
        away.send([], [TopN("ann", ["i1"], [1.0], "pushrec")])
        with pytest.raises(REDIS_UNAVAILABLE) as raised:
            away.answer()
        assert redis_error_kind(raised.value) == "connection"
        away.process.kill()  # the store process dies: no Redis error, the worker must stop
        away.process.join(5)
        with pytest.raises(ListStoreGone):
            away.send([], [TopN("ann", ["i1"], [1.0], "pushrec")])
            away.answer()
    finally:
        away.close()
