"""The messages the Faust process (``consumers.ingest``) and the model process
(``consumers.model_process``) exchange over their pipe: ``(kind, payload)`` pickled, in order."""

EXIT_BUG = 70  # EX_SOFTWARE: the worker met an unexpected exception and stopped without a checkpoint

# What the Faust process sends the model process.
RECORDS = "records"  # payload: (read at, [(topic, partition, offset, key, value, timestamp s), ...])
# payload: (partition numbers the group gave this worker, partitions per event topic): take
# them (restore, catch up), then answer DONE
ASSIGN = "assign"
REVOKE = "revoke"  # payload: partition numbers taken away: checkpoint and drop them, answer DONE
HIGHWATER = "highwater"  # payload: {"topic:partition": next offset the broker will write}
LOOP_LAG = "loop_lag"  # payload: [seconds, ...] the Faust process's event-loop lags since its last
STOP = "stop"  # write pending lists, checkpoint, answer DONE and exit
# What the model process answers.
READY = "ready"  # restored and caught up: Faust may start
DONE = "done"
PENDING = "pending"  # payload: whether some refreshed lists are not in Redis yet (sent on change)
