"""One module per `pushrec` command: each adds its parser (``add_parser``) and runs it (``run``).
A new command is a new module here, listed in :data:`ALL` in the order ``--help`` shows them."""

from __future__ import annotations

from pushrec.commands import (
    bench,
    demo,
    dlq,
    evaluate,
    forget,
    push_report,
    push_sender,
    recs,
    replay,
    stack,
    worker,
)

ALL = (stack, worker, push_sender, push_report, replay, recs, evaluate, bench, dlq, forget, demo)
