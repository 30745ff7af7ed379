"""Topic names, built in one place, and their creation on the broker.

>>> names = TopicNames("pushrec")
>>> names.events("click"), names.items, names.dead_letter, names.item_deltas
('pushrec.events.click', 'pushrec.items', 'pushrec.dead-letter', 'pushrec.item-deltas')
>>> names.type_of("pushrec.events.add_to_cart")
'add_to_cart'
>>> partition_of("1000339", 4)
1
"""

from __future__ import annotations

from collections.abc import Iterable

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.partitioner.default import murmur2

from infra.kafka import KafkaAccess
from stream.events import EVENT_TYPES


def partition_of(user_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (kafka-python's, the Java client's) gives a
    record keyed by ``user_id``: where that user's events, and so their state, live."""
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


class TopicNames:
    """``<prefix>.events.<type>`` per event type, ``<prefix>.items``, ``<prefix>.dead-letter``,
    ``<prefix>.item-deltas`` (the workers' item changes, ``consumers.item_exchange``),
    ``<prefix>.pushes`` (the push sender's exposure log)."""

    def __init__(self, prefix: str = "pushrec") -> None:
        self.prefix = prefix
        self.items = f"{prefix}.items"
        self.dead_letter = f"{prefix}.dead-letter"
        self.item_deltas = f"{prefix}.item-deltas"
        self.pushes = f"{prefix}.pushes"  # the exposure log (stream.exposures)
        self._by_type = {kind: f"{prefix}.events.{kind}" for kind in EVENT_TYPES}
        self._type_by_topic = {topic: kind for kind, topic in self._by_type.items()}

    def events(self, kind: str) -> str:
        return self._by_type[kind]

    @property
    def all_events(self) -> list[str]:
        return list(self._by_type.values())

    @property
    def all(self) -> list[str]:
        return [*self.all_events, self.items, self.dead_letter, self.item_deltas, self.pushes]

    def type_of(self, topic: str) -> str:
        return self._type_by_topic[topic]


class TopicError(Exception):
    """Topics could not be created; the message names the broker."""


def ensure_topics(
    kafka: KafkaAccess,
    topics: Iterable[str],
    partitions: int = 1,
    replication_factor: int = 1,
    timeout_s: float = 10.0,
) -> list[str]:
    """Create the topics that do not exist yet; return the ones created."""
    try:
        admin = KafkaAdminClient(**kafka.client_options(), request_timeout_ms=int(timeout_s * 1000))
    except (KafkaError, OSError) as exc:
        raise TopicError(f"cannot reach Kafka at {kafka}: {exc}") from None
    try:
        existing = set(admin.list_topics())
        wanted = [t for t in dict.fromkeys(topics) if t not in existing]
        created = []
        for topic in wanted:
            try:
                admin.create_topics([NewTopic(topic, partitions, replication_factor)])
                created.append(topic)
            except TopicAlreadyExistsError:
                pass  # another process created it first
        return created
    except KafkaError as exc:
        raise TopicError(f"cannot create topics on {kafka}: {exc}") from None
    finally:
        admin.close()
