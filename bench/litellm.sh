#!/usr/bin/env bash
# LiteLLM's proxy, for the fourth column of `thrifty bench overhead`.
#
#   bench/litellm.sh install              create bench/.litellm-venv with litellm[proxy] (once; ~2 min, ~740 MB)
#   bench/litellm.sh serve STUB_URL PORT  run the proxy on 127.0.0.1:PORT against an OpenAI-style stub
#                                         (e.g. http://127.0.0.1:9000/v1); prints the master key to use
#
# It lives in its own venv so its pins never touch thrifty's. `thrifty bench overhead --with-litellm
# bench/.litellm-venv` starts the same proxy itself against the bench's own stub; `serve` is for
# running it by hand with `--litellm-url`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${LITELLM_VENV:-$here/.litellm-venv}"
python="${PYTHON:-python3}"

install() {
    if [[ -x "$venv/bin/litellm" ]]; then
        echo "litellm venv ready: $venv ($("$venv/bin/python" -m pip show litellm 2>/dev/null | sed -n 's/^Version: //p'))"
        return
    fi
    echo "creating $venv and installing litellm[proxy] (takes a few minutes)..."
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "litellm[proxy]"
    echo "installed litellm $("$venv/bin/python" -m pip show litellm | sed -n 's/^Version: //p')"
}

serve() {
    local stub_url="${1:?usage: litellm.sh serve STUB_URL PORT}" port="${2:?usage: litellm.sh serve STUB_URL PORT}"
    install
    local dir
    dir="$(mktemp -d)"
    # No database_url: the proxy runs without Postgres. The master key comes from the environment
    # because the proxy refuses weak literal keys; a random one per run.
    cat >"$dir/config.yaml" <<YAML
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: $stub_url
      api_key: dummy
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
litellm_settings:
  telemetry: false
YAML
    export LITELLM_MASTER_KEY="sk-$("$python" -c 'import secrets; print(secrets.token_hex(24))')"
    # Use the bundled price map instead of fetching it from GitHub at start (no internet here).
    export LITELLM_LOCAL_MODEL_COST_MAP=True
    echo "LiteLLM master key (send as Bearer): $LITELLM_MASTER_KEY"
    echo "config: $dir/config.yaml"
    "$venv/bin/litellm" --config "$dir/config.yaml" --host 127.0.0.1 --port "$port" &
    local pid=$!
    trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT INT TERM
    for _ in $(seq 1 120); do
        if curl -fs -o /dev/null "http://127.0.0.1:$port/health/liveliness"; then
            echo "LiteLLM ready on http://127.0.0.1:$port (pid $pid); Ctrl-C stops it"
            wait "$pid"
            return
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "LiteLLM exited during start" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "LiteLLM did not become ready in 60 s" >&2
    exit 1
}

case "${1:-install}" in
    install) install ;;
    serve) shift; serve "$@" ;;
    *) echo "usage: $0 [install | serve STUB_URL PORT]" >&2; exit 2 ;;
esac
