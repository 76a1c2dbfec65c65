#!/bin/sh
# Run the whole benchmark (python -m bench) from the repository root; arguments are passed on.
# Uses the dev venv when there is one. See bench/README.md.
set -e
cd "$(dirname "$0")/.."
if [ -z "$VIRTUAL_ENV" ] && [ -f /work/venv/bin/activate ]; then . /work/venv/bin/activate; fi
exec python -m bench "$@"
