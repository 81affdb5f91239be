#!/usr/bin/env bash
# The full overhead benchmark in one run: direct to a stub, thrifty, a bare pass-through, LiteLLM.
#
#   bash bench/run_overhead.sh [extra `thrifty bench overhead` options, e.g. --duration 10]
#
# Installs wrk (apt-get, as root) and LiteLLM's proxy into bench/.litellm-venv when missing, then
# writes bench/results/overhead.json and prints the table.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if ! command -v wrk >/dev/null; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "installing wrk..."
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
    else
        echo "wrk is not installed (apt-get install wrk); falling back to the Python load generator" >&2
    fi
fi

bash bench/litellm.sh install

thrifty="${THRIFTY:-$root/.venv/bin/thrifty}"
mkdir -p bench/results
exec "$thrifty" bench overhead --with-litellm bench/.litellm-venv --json bench/results/overhead.json "$@"
