"""The HTTP side: the application factory and the proxy's own endpoints under /_ledger/.

- app.py        create_app: routes and one cleanup_ctx per resource
- router.py     the router: everything outside /_ledger/ goes straight to the relay
- appkeys.py    typed application keys
- health.py     /_ledger/health
- startup.py    the start-up migration, retried in the background while the database is down
- api.py        the JSON query API (/_ledger/api/*) and /_ledger/metrics
- auth.py       who may use the ledger's endpoints (token, session cookie, loopback Host rule)
- dashboard/    the HTML dashboard at /_ledger/
- metrics.py    the Prometheus registry
- responses.py  JSON bodies and errors
"""
