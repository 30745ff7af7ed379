"""Log format and levels, the same in every pushrec process."""

from __future__ import annotations

import logging
import sys

from infra.settings import Settings


def setup_logging(settings: Settings) -> None:
    level = {"crit": "CRITICAL", "warn": "WARNING"}.get(settings.log_level, settings.log_level.upper())
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.log_level != "debug":
        # kafka-python narrates every connection at INFO; keep its warnings only.
        logging.getLogger("kafka").setLevel(logging.WARNING)
