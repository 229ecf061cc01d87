#!/usr/bin/env bash
# Creates the Night Guard's Podman secrets on this host without the values ever touching
# a command line, a file or the shell history.
#
#   Values from the environment:  TELEGRAM_BOT_TOKEN=... GEMINI_API_KEY=... ./setup_podman_secrets.sh
#     (export them from a password manager; a leading space keeps a typed line out of history)
#   Values typed at a prompt:     ./setup_podman_secrets.sh --prompt
#
# An existing secret is replaced. `inv secrets.push` does the same from a laptop's .env.
set -euo pipefail

declare -A SECRETS=([telegram_bot_token]=TELEGRAM_BOT_TOKEN [gemini_api_key]=GEMINI_API_KEY)
PODMAN=(podman)
[[ $(id -u) -eq 0 ]] || [[ ${NIGHTGUARD_ROOTLESS:-0} == 1 ]] || PODMAN=(sudo -n podman)

prompt=0
[[ ${1:-} == --prompt ]] && prompt=1

for name in "${!SECRETS[@]}"; do
    var=${SECRETS[$name]}
    if ((prompt)); then
        read -r -s -p "$var: " value
        echo
    else
        value=${!var:-}
    fi
    if [[ -z $value ]]; then
        echo "error: $var is empty or unset (needed for secret $name)" >&2
        exit 2
    fi
    if "${PODMAN[@]}" secret inspect "$name" >/dev/null 2>&1; then
        "${PODMAN[@]}" secret rm "$name" >/dev/null
    fi
    # printf is a shell builtin: the value reaches podman's stdin, never an argv.
    printf '%s' "$value" | "${PODMAN[@]}" secret create "$name" - >/dev/null
    unset value
    echo "secret $name: created"
done
