"""The writer: the only code that writes the ledger. Records reach the database in batches, or the spool
on disk when the database cannot take them, and come back from the spool by replay.

- protocol.py  the Recorder interface the proxy talks to, and WriterStats
- recorder.py  BatchRecorder: queue, batches, guard, spool, replay (the writer itself)
- link.py      RecorderLink: the serving process's end of a writer process
- child.py     the writer process (`python -m proxy.writer.child`)
- framing.py   the messages between the two, and their framing
- ring.py      shared memory that carries long responses to the writer process
- spool.py     the spool files
- replay.py    walking the spool for replay
- errors.py    data errors versus an unreachable database
- file_watch.py  the SQLite file deleted or replaced under the writer
- wal.py       SQLite's WAL checkpointed in the background, not in the writer's commits
- summary.py   a batch reduced to its metric sums
- retention.py the background prune of calls older than [retention] days
"""
