# chatledger: the same two steps as the README (install, then serve), in a container.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY migrations ./migrations
RUN pip install --no-cache-dir '.[fast]'

# The ledger lives on a volume; listen on all interfaces inside the container.
WORKDIR /data
VOLUME ["/data"]
ENV CHATLEDGER_HOST=0.0.0.0 \
    CHATLEDGER_DATABASE_URL=sqlite+aiosqlite:////data/chatledger.db
EXPOSE 8080
ENTRYPOINT ["chatledger"]
CMD ["serve"]
