"""The one settings object: every tunable of pushrec, read once from ``PUSHREC_*`` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from online_models.mf import MAX_WEIGHT
from online_models.recommender import DEFAULT_TYPE_WEIGHTS
from stream.events import EventLimits


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    """Broker connection and consumer-group timing."""

    topic_prefix: str = Field("pushrec", description="topics are <prefix>.events.<type>, ...")
    partitions: int = Field(1, ge=1, description="partitions per topic when pushrec creates it")
    replication_factor: int = Field(1, ge=1)
    consumer_group: str = Field("pushrec-worker", description="the worker's consumer group / Faust app id")
    session_timeout_s: float = Field(6.0, gt=0, description="short: group joins wait for it")
    heartbeat_interval_s: float = Field(1.0, gt=0)
    rebalance_timeout_s: float = Field(6.0, gt=0)
    fetch_max_wait_ms: int = Field(
        50, ge=1, le=1500, description="longest a consumer fetch waits for data (latency floor on Tansu)"
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = Field(None, description="never logged")
    ssl_cafile: Path | None = Field(None, description="CA bundle for SSL / SASL_SSL")


class RedisSettings(_Section):
    """Where lists, push history and the refresh stream live."""

    key_prefix: str = Field("pushrec:", description="every key pushrec writes starts with this")
    retries: int = Field(5, ge=0, description="bounded retries on connection errors")
    stream_maxlen: int = Field(100_000, ge=1, description="approximate cap of the refresh stream")


class EventSettings(_Section):
    """What counts as a well-formed event (anything else is dead-lettered)."""

    max_payload_bytes: int = Field(64 * 1024, ge=64)
    max_id_length: int = Field(256, ge=1)
    min_rating: float = Field(0.0, ge=0, description="lowest rating accepted (the model reads 0-5 stars)")
    max_rating: float = Field(5.0, gt=0, le=5, description="highest rating accepted (bad_field above)")
    min_ts: float = Field(0.0, description="earliest event time accepted, unix seconds")
    max_ts: float = Field(
        4_102_444_800.0, description="latest event time accepted (default 2100-01-01: refuses milliseconds)"
    )

    @model_validator(mode="after")
    def _ordered(self) -> EventSettings:
        if self.min_rating > self.max_rating or self.min_ts >= self.max_ts:
            raise ValueError("min_rating must not exceed max_rating, and min_ts must be below max_ts")
        return self

    @property
    def limits(self) -> EventLimits:
        return EventLimits(**self.model_dump())


class ModelSettings(_Section):
    """The online recommender (defaults from the search in docs/quality.md)."""

    n_factors: int = Field(16, ge=1)
    learning_rate: float = Field(0.3, gt=0, description="SGD step of the online MF")
    l2: float = Field(0.001, ge=0)
    negatives: int = Field(1, ge=0, description="sampled negatives per positive event")
    popular_negatives: float = Field(
        0.5, ge=0, le=1, description="share of negatives drawn by recent popularity (rest uniform)"
    )
    seed: int = 42
    top_n: int = Field(20, ge=1, description="length of each stored list")
    popularity_half_life_s: float = Field(86_400.0, gt=0, description="event-time half-life")
    popularity_weight: float = Field(2.0, ge=0, description="blend weight of popularity (max = 1)")
    session_weight: float = Field(3.0, ge=0, description="blend weight of the last items' factors")
    session_items: int = Field(5, ge=1, description="how many last items make the session vector")
    recent_weight: float = Field(100.0, ge=0, description="blend weight of the user's own interest")
    recent_half_life_s: float = Field(86_400.0, gt=0, description="decay of the user's own interest")
    recent_memory: int = Field(100, ge=1, description="unconsumed items kept per user")
    min_user_events: int = Field(1, ge=1, description="below this a user gets the popularity list")
    type_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_TYPE_WEIGHTS),
        description="confidence per event type, JSON (a rating's is scaled by rating/5)",
    )
    ann_min_items: int = Field(
        100_000,
        ge=0,
        description="from this many items on, lists come from an HNSW index ([ann] extra); 0 = never",
    )
    ann_expansion: int = Field(
        128,
        ge=8,
        description="HNSW search and build breadth: higher = better recall, slower (re-inserts use 32)",
    )
    ann_pending_max: int = Field(
        4096,
        ge=1,
        description="changed items scored exactly until this many, then re-indexed in one batch "
        "(in a background thread)",
    )
    content_encoder: Literal["hashed", "minilm", "off"] = Field(
        "hashed", description="item text encoder: hashed (numpy), minilm ([content] extra), off"
    )
    content_dim: int = Field(256, ge=8, description="width of the hashed encoder's vectors")
    content_learning_rate: float = Field(0.01, gt=0, description="SGD step of the content-to-factors map")
    content_refresh_every: int = Field(
        1000, ge=1, description="positive events between re-predictions of untouched items' factors"
    )
    content_weight: float = Field(
        0.0,
        ge=0,
        description="starting blend weight of untouched items' text similarity (then learned online)",
    )
    n_segments: int = Field(8, ge=1, description="interest segments users are clustered into")
    covisit_weight: float = Field(
        20.0, ge=0, description="blend weight of the items shoppers engaged with after the user's last ones"
    )
    covisit_window: int = Field(5, ge=1, description="earlier items each positive event links to")
    covisit_neighbours: int = Field(30, ge=1, description="strongest rules kept per item")
    covisit_half_life_s: float = Field(30 * 86_400.0, gt=0, description="event-time decay of the rules")
    covisit_away_share: float = Field(
        0.25,
        ge=0,
        description="share of covisit_weight the rules keep in the list of a shopper who has left",
    )
    rebuy_weight: float = Field(
        50.0, ge=0, description="blend weight of bought items shoppers often buy again (0: never listed)"
    )
    rebuy_min_share: float = Field(
        0.05, ge=0, description="share of an item's purchases that repeat one, from which it comes back"
    )
    hit_rate_window: int = Field(1000, ge=1, description="events (visits) in the live HR@N windows")
    visit_gap_s: float = Field(
        1800.0,
        gt=0,
        description="stream time without an event after which a shopper has left (list re-ranked; new visit)",
    )

    @field_validator("type_weights")
    @classmethod
    def _known_types(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = set(weights) - set(DEFAULT_TYPE_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown event type(s) {sorted(unknown)}")
        if not all(0.0 <= w <= MAX_WEIGHT for w in weights.values()):
            raise ValueError(f"each weight must lie in [0, {MAX_WEIGHT:g}]")
        return weights

    @model_validator(mode="after")
    def _window_within_session(self) -> Self:
        if self.covisit_window > self.session_items:  # rules link the last session_items items only
            raise ValueError(
                f"covisit_window ({self.covisit_window}) cannot exceed session_items ({self.session_items}): "
                "a rule links an item to the user's last session_items items"
            )
        return self


class CheckpointSettings(_Section):
    """Where and how often workers save their partitions' state (users, offsets, dedupe memory)
    and the item state."""

    store: Literal["disk", "redis", "off"] = Field(
        "disk",
        description="disk: <state_dir>/checkpoints/<name>/{items,p<N>}.npz (one machine); redis: keys "
        "<prefix>checkpoint:<name>:{items,p<N>} (workers on several machines); off: none",
    )
    every_s: float = Field(30.0, gt=0, description="periodic checkpoint interval (also on stop/revoke)")
    name: str | None = Field(
        None, description="checkpoint set name; default the consumer group (shared by all its workers)"
    )
    dedupe_ids: int = Field(100_000, ge=1, description="event ids remembered per partition")


class WorkerSettings(_Section):
    """Micro-batching of the Faust agent, re-ranking, the group's item state."""

    batch_max: int = Field(500, ge=1, description="events per micro-batch at most")
    batch_within_s: float = Field(
        0.02,
        gt=0,
        description="wait at most this for a batch to fill (a backlog fills them at once; at a steady "
        "rate, half of it is every event's wait)",
    )
    refresh_max_delay_s: float = Field(
        0.25,
        ge=0,
        description="when behind (more records already waiting), re-rank touched users at most this "
        "often instead of after every batch; 0 = after every batch",
    )
    latency_target_s: float = Field(
        0.25,
        ge=0,
        description="when behind, re-rank sooner than REFRESH_MAX_DELAY_S if an event waiting for its "
        "list would otherwise miss this (record time to list in Redis), unless it was this old "
        "already when learned (catching up comes first then); 0 = off",
    )
    idle_clock_s: float = Field(
        60.0,
        ge=0,
        description="with no event learned for this long, the stream's clock (which says who has left, "
        "MODEL__VISIT_GAP_S) moves on with the wall clock from the last event time learned, so shoppers "
        "who leave in a quiet hour still get their away list; 0 = the clock waits for the next event",
    )
    faust_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="the worker's Faust process runs this much nicer than its model process, which it "
        "spawns first: on a busy machine the model (one thread, the worker's ceiling) then waits less "
        "for a core; Faust only has to keep the model's pipe full. 0 = the same priority",
    )
    loop_block_s: float = Field(
        0.1,
        ge=0,
        description="log when a worker process's event loop could run nothing else for at least this "
        "long (a minute's count and the longest; every lag is in pushrec_event_loop_lag_seconds; the "
        "model process learns and ranks a micro-batch without yielding, tens of ms); 0 = never",
    )
    item_sync_s: float = Field(
        1.0,
        ge=0,
        description="publish the item changes learned here to the group's item-delta topic this "
        "often, and apply every other worker's: one item state for the group; 0 = off (each "
        "worker learns items from its own partitions' events only)",
    )


class PushSettings(_Section):
    """The push policy of `pushrec push-sender`."""

    max_per_window: int = Field(3, ge=0, description="frequency cap: pushes per user per cap window")
    cap_window_s: float = Field(86_400.0, gt=0)
    dedupe_window_s: float = Field(7 * 86_400.0, gt=0, description="never the same item twice within")
    quiet_start_hour: int | None = Field(
        None, ge=0, le=23, description="UTC hour quiet time starts (pushes wait for its end)"
    )
    quiet_end_hour: int | None = Field(None, ge=0, le=23, description="UTC hour quiet time ends")
    away_after_s: float = Field(
        1800.0, ge=0, description="a shopper this long without an event has left: a push is considered"
    )
    cart_after_s: float = Field(
        4 * 3600.0, ge=0, description="a cart left this long after the shopper's last event is abandoned"
    )
    trigger_away: bool = Field(True, description="push an item new to a shopper who has left")
    trigger_browse: bool = Field(True, description="push an item a shopper who has left looked at")
    trigger_cart: bool = Field(True, description="push an item left in an abandoned cart")
    trigger_replenishment: bool = Field(True, description="push an item a shopper who has left buys again")
    trigger_price_drop: bool = Field(
        True, description="push an item a shopper looked at or carted when its catalogue price drops"
    )
    price_drop_min_share: float = Field(
        0.05, ge=0, lt=1, description="a price drop smaller than this share of the old price is not pushed"
    )
    min_score: float = Field(
        40.0, description="relevance threshold: no push unless an item scores this much (docs/quality.md)"
    )
    min_score_quantile: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="recent bar: no push unless it scores this quantile of the last score_window pushes "
        "that cleared min_score (0 = off; docs/quality.md)",
    )
    score_window: int = Field(1000, ge=20, description="recent bar: over this many of the last pushes")
    visits_per_push: float = Field(
        7.0, gt=0, description="budget: one more push per cap window per this many recent visits"
    )
    send_time: bool = Field(
        True, description="hold a push until the shopper's most active hour of the next day"
    )
    holdout_share: float = Field(
        0.05,
        ge=0,
        le=1,
        description="control group: this share of shoppers (by a hash of their id) never gets a push",
    )
    holdout_salt: str = Field(
        "pushrec", min_length=1, description="salt of the control group's hash: a new one draws a new group"
    )
    attribution_window_s: float = Field(
        86_400.0,
        gt=0,
        description="a click, cart or purchase of a pushed item this long after delivery converts it",
    )
    consumer_group: str = "pushrec-push-sender"
    claim_idle_s: float = Field(
        30.0, gt=0, description="claim entries another sender read but left unacked this long"
    )
    webhook_timeout_s: float = Field(
        5.0, gt=0, description="push gateway (--webhook): timeout of one request"
    )
    webhook_backoff_s: float = Field(
        0.5, gt=0, description="push gateway: first retry within this (doubling)"
    )
    webhook_backoff_max_s: float = Field(30.0, gt=0, description="push gateway: longest wait between retries")
    webhook_give_up_s: float = Field(
        600.0, gt=0, description="push gateway: a push refused this long goes to the push dead letters"
    )

    @model_validator(mode="after")
    def _quiet_hours_pair(self) -> PushSettings:
        if (self.quiet_start_hour is None) != (self.quiet_end_hour is None):
            raise ValueError("set both quiet_start_hour and quiet_end_hour, or neither")
        return self


class Settings(BaseSettings):
    """All of pushrec's configuration; frozen once loaded."""

    model_config = SettingsConfigDict(
        env_prefix="PUSHREC_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    # The two addresses the product contract names; unset = the embedded stack (`pushrec stack up`).
    kafka_bootstrap: str | None = Field(None, description="host:port[,host:port] of the Kafka brokers")
    redis_url: str | None = Field(None, description="redis://[:password@]host:port/db (rediss:// for TLS)")
    state_dir: Path = Field(Path.home() / ".pushrec", description="embedded stack state and logs")
    log_level: str = Field("info", pattern="^(crit|error|warn|info|debug)$")

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    events: EventSettings = EventSettings()
    model: ModelSettings = ModelSettings()
    worker: WorkerSettings = WorkerSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    push: PushSettings = PushSettings()


class ConfigError(Exception):
    """Configuration that cannot be loaded; the message names the variable."""


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment (and ``overrides``), naming the bad variable on error."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = "__".join(str(p) for p in first["loc"]).upper()
        raise ConfigError(f"bad setting PUSHREC_{loc}: {first['msg']}") from None


def env_example() -> str:
    """``.env.example``: every variable with its default and description, generated from the
    settings classes so the file cannot drift from the code (a test compares them)."""
    import json

    def value(v: object) -> str:
        if isinstance(v, dict):
            return json.dumps(v, separators=(",", ":"))
        if isinstance(v, Path) and v == Path.home() / ".pushrec":
            return "~/.pushrec"
        return str(v)

    def assign(variable: str, default: object) -> str:
        # Unset by default: commented out, since an empty value is not "unset".
        return f"# {variable}=" if default is None else f"{variable}={value(default)}"

    lines = [
        "# Every pushrec setting with its default; generated by `python -m infra.settings`.",
        '# Nested settings use "__" (PUSHREC_<SECTION>__<NAME>). Unset addresses = `pushrec stack up`.',
    ]
    defaults = Settings.model_construct()
    for name, field in Settings.model_fields.items():
        section = getattr(defaults, name)
        if isinstance(section, BaseModel):
            lines += ["", f"# --- {name}: {(type(section).__doc__ or '').strip()}"]
            for sub, subfield in type(section).model_fields.items():
                if subfield.description:
                    lines.append(f"# {subfield.description}")
                lines.append(assign(f"PUSHREC_{name.upper()}__{sub.upper()}", getattr(section, sub)))
        else:
            if field.description:
                lines.append(f"# {field.description}")
            lines.append(assign(f"PUSHREC_{name.upper()}", section))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(env_example(), end="")
