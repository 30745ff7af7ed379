"""How to reach Kafka: the address and the security settings every Kafka client is built from.

kafka-python clients (admin, catch-up, dead-letter tools) take :meth:`client_options`; the
replay's librdkafka producer takes :meth:`librdkafka_options`; the Faust worker takes
:meth:`faust_credentials`. The password never appears in ``repr``/``str``.

>>> access = KafkaAccess("k1:9093", "SASL_SSL", "SCRAM-SHA-512", "svc", "s3cret")
>>> str(access), "s3cret" in repr(access)
('k1:9093', False)
>>> sorted(access.client_options())
['bootstrap_servers', 'sasl_mechanism', 'sasl_plain_password', 'sasl_plain_username', 'security_protocol']
>>> options = access.librdkafka_options()
>>> options["sasl.mechanism"], options["ssl.ca.location"]  # (no CA file: the system's)
('SCRAM-SHA-512', 'probe')
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infra.settings import Settings


@dataclass(frozen=True)
class KafkaAccess:
    bootstrap: str
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str | None = None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, bootstrap: str) -> KafkaAccess:
        k = settings.kafka
        return cls(
            bootstrap,
            k.security_protocol,
            k.sasl_mechanism,
            k.sasl_username,
            k.sasl_password.get_secret_value() if k.sasl_password is not None else None,
            str(k.ssl_cafile) if k.ssl_cafile is not None else None,
        )

    def __str__(self) -> str:
        return self.bootstrap

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python's KafkaProducer / KafkaConsumer / KafkaAdminClient."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            options.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.ssl_cafile:
            options["ssl_cafile"] = self.ssl_cafile
        return options

    def librdkafka_options(self) -> dict[str, str]:
        """The same settings as :meth:`client_options`, in librdkafka's names (confluent-kafka)."""
        options = {"bootstrap.servers": self.bootstrap, "security.protocol": self.security_protocol}
        if self.sasl_mechanism:
            options["sasl.mechanism"] = self.sasl_mechanism
            options["sasl.username"] = self.sasl_username or ""
            options["sasl.password"] = self.sasl_password or ""
        if self.security_protocol.endswith("SSL"):  # as the others: this CA file, else the system's
            options["ssl.ca.location"] = self.ssl_cafile or "probe"
        return options

    def faust_credentials(self) -> Any:
        """``broker_credentials`` for ``faust.App`` (None for PLAINTEXT)."""
        import faust

        context = None
        if self.security_protocol.endswith("SSL"):
            context = ssl.create_default_context(cafile=self.ssl_cafile)
        if self.security_protocol.startswith("SASL"):
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password,
                mechanism=self.sasl_mechanism,
                ssl_context=context,
            )
        if context is not None:
            return faust.SSLCredentials(context)
        return None
