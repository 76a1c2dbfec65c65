# chatledger: the same two steps as the README (install, then serve), in a container. docs/docker.md
# explains the volumes, the stop timeout and how to mount a config file.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY migrations ./migrations
RUN pip install --no-cache-dir '.[fast]'

# Run as an unprivileged user; the ledger and its spool live on a volume it owns.
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin chatledger \
    && mkdir -p /data && chown chatledger:chatledger /data
USER chatledger
WORKDIR /data
VOLUME ["/data"]
ENV CHATLEDGER_HOST=0.0.0.0 \
    CHATLEDGER_DATABASE_URL=sqlite+aiosqlite:////data/chatledger.db
EXPOSE 8080

# /_ledger/health answers 200 whenever the proxy serves; "degraded" in its body is for monitoring.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/_ledger/health' % os.environ.get('CHATLEDGER_PORT', '8080'), timeout=4)"]

ENTRYPOINT ["chatledger"]
CMD ["serve"]
