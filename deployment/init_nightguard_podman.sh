#!/usr/bin/env bash
# Idempotent host set-up for Night Guard, usable by hand on a fresh VM:
#   1. Podman present (installed from the distribution when missing)
#   2. a 2 GB /swapfile: mode 600, in /etc/fstab, swappiness persisted
#   3. the image built (--format docker keeps HEALTHCHECK)
#   4. a systemd unit that (re)creates the container with the seed's limits, restarts it
#      after a crash or a failed health check, and starts it at boot without a login
# Secrets must exist first (setup_podman_secrets.sh). `inv deploy` does all of this from
# a laptop, changing only what differs.
set -euo pipefail

APP_DIR=${APP_DIR:-/home/ubuntu/97layerOS}
DATA_DIR=${DATA_DIR:-/home/ubuntu/97layerOS-data}
NAME=${CONTAINER_NAME:-97layer-nightguard}
IMAGE=${IMAGE:-localhost/nightguard:manual}
BASE_IMAGE=${BASE_IMAGE:-docker.io/library/python:3.11-slim}
SWAP_SIZE_MB=${SWAP_SIZE_MB:-2048}
UNIT=/etc/systemd/system/container-$NAME.service

if [[ $(id -u) -ne 0 ]]; then
    exec sudo -n -E "$0" "$@"
fi

if ! command -v podman >/dev/null; then
    echo "installing podman"
    # a new VM's startup script or unattended-upgrades may hold apt's locks: apt waits for
    # dpkg's (DPkg::Lock::Timeout) but not for the lists lock of an update, so try again
    for _ in $(seq 60); do apt-get update -qq && break; sleep 10; done
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
        podman slirp4netns >/dev/null
fi
mkdir -p "$DATA_DIR"

if ! swapon --show=NAME --noheadings | grep -qx /swapfile; then
    if [[ ! -f /swapfile ]] || (( $(stat -c %s /swapfile) != SWAP_SIZE_MB * 1024 * 1024 )); then
        rm -f /swapfile
        fallocate -l "${SWAP_SIZE_MB}M" /swapfile
    fi
    chmod 600 /swapfile
    mkswap /swapfile >/dev/null
    swapon /swapfile
fi
grep -qE '^/swapfile[[:space:]]' /etc/fstab || echo '/swapfile none swap sw 0 0' >> /etc/fstab
echo 'vm.swappiness=10' > /etc/sysctl.d/99-nightguard.conf
sysctl -q -w vm.swappiness=10

for secret in telegram_bot_token gemini_api_key; do
    podman secret inspect "$secret" >/dev/null 2>&1 || {
        echo "error: secret $secret is missing: run setup_podman_secrets.sh first" >&2
        exit 2
    }
done

podman build --format docker --file "$APP_DIR/deployment/Dockerfile.nightguard" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --tag "$IMAGE" "$APP_DIR/deployment"

cat > "$UNIT.tmp" <<UNIT
[Unit]
Description=Night Guard agent ($NAME)
Wants=network-online.target
After=network-online.target

[Service]
Environment=PODMAN_SYSTEMD_UNIT=%n
Restart=always
RestartSec=2
TimeoutStopSec=30
ExecStart=/usr/bin/podman run --cidfile=%t/%n.ctr-id --cgroups=no-conmon --rm --sdnotify=conmon --replace --detach --name $NAME --memory 700m --memory-reservation 500m --memory-swap 2700m --cpus 1 --network slirp4netns --volume $APP_DIR:/app:ro,Z --volume $DATA_DIR:/data:Z,U --cap-drop all --security-opt no-new-privileges --env NG_DATA_DIR=/data --health-cmd "python3 /app/execution/system/health_check.py" --health-interval 30s --health-timeout 10s --health-retries 3 --health-start-period 60s --health-on-failure kill --secret telegram_bot_token,type=mount,mode=0400,uid=1000 --secret gemini_api_key,type=mount,mode=0400,uid=1000 $IMAGE
ExecStop=/usr/bin/podman stop --ignore --time 10 --cidfile=%t/%n.ctr-id
ExecStopPost=/usr/bin/podman rm --force --ignore --time 10 --cidfile=%t/%n.ctr-id
Type=notify
NotifyAccess=all

[Install]
WantedBy=multi-user.target
UNIT
mv -f "$UNIT.tmp" "$UNIT"
systemctl daemon-reload
systemctl enable --quiet "container-$NAME.service"
systemctl restart "container-$NAME.service"
podman ps --filter "name=$NAME"
