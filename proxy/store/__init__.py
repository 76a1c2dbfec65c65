"""The ledger in SQL: the schema, how rows get in, and every read of them.

- models.py      the schema (ORM models): the one source of tables and columns
- types.py       column types and every value conversion (ORM and driver level)
- rows.py        records as rows; column lists derived from the models
- insert.py      the one insert path (batch, one transaction), rollups included
- histogram.py   the rollups' duration buckets and percentiles read from them
- rollups.py     rows folded into per-group sums for the rollup tables
- rollup_write.py  those sums added to the tables (upserts, in the insert's transaction)
- rollup_rebuild.py  the rollup tables recomputed from the rows, a day at a time
- engine.py      the engine factory (SQLite pragmas)
- migrate.py     applying the Alembic migrations shipped in the package
- filters.py     filters -> WHERE clauses, shared by every read
- queries.py     pages, single calls, streamed exports
- stats.py       aggregates and percentiles per group
- series.py      requests and cost per hour or day, by the top models (the dashboard's chart)
- latency.py     p50/p95 duration over a whole selection
- key_labels.py  labels for key fingerprints
- retention.py   deleting old calls in short batches; the prune horizon (ledger_meta)
- pricing/       price book, the prices table, OpenRouter sync, reprice, the running pricer
"""
