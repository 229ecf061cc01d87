"""Kubernetes manifests for the agent, rendered from the settings `inv deploy` uses. Pure.

In: the validated settings and the deploy's desired state (``tasks.deploy.plan.
desired_state``: the container spec - limits, the compose file's health check, secret
names, environment, command - the image `inv deploy` builds, the synced tree). Out: file
texts, which never hold a secret value (the Secret is described, never written).
``tasks.kube.tasks`` writes them; unit tests compare the structures.

The export is one directory:
  nightguard.yaml  ONE multi-document YAML - the PersistentVolumeClaim for /data, then the
                   Deployment - not a kustomization: `kubectl apply -f` and `podman kube
                   play` both take it as it is (Podman has no kustomize)
  Containerfile    FROM the image `inv deploy` builds, COPY of the synced tree into /app (a
                   cluster cannot bind-mount the laptop's tree); its tag is the image name
                   plus a hash of that image's tag and of the tree
  app/             the declared sync set and nothing else (the task copies it)
  NOTES.md         the commands, the Secret's shape, and what does not map (swap, the
                   host's swapfile, the systemd unit, ...)

Decisions:
  * A Deployment with ``replicas: 1`` and ``strategy: Recreate``, not a StatefulSet. Recreate
    stops the old pod before it starts the new one on every rollout. A Deployment alone
    still overlaps in two cases: a pod that is deleted or evicted is replaced at once, while
    the old one runs out its grace period; and a node cut off from the control plane keeps
    its pod running while a replacement starts elsewhere. The /data claim closes both: its
    access mode is ``ReadWriteOncePod``, so the scheduler places no second pod using it
    until the first pod object is gone - the StatefulSet's at-most-one guarantee. A
    StatefulSet is what `podman kube play` cannot run (it skips the kind, on 4.3 as on
    5.x), so it would leave nothing to rehearse on the VM. Two pollers on one bot token get
    409 Conflict from Telegram.
  * /data is that claim (``DATA_SIZE``, the cluster's default storage class), not an
    emptyDir: the agent's data outlives a pod, as the VM's data dir outlives a container.
  * The probe is an exec livenessProbe. With health.watchdog on (the VM's liveness is then
    systemd's watchdog, fed by ng-supervise while the heartbeat is fresh) it runs that same
    rule, ``ng-supervise --alive`` (on the VM ng-supervise applies it itself), every 5 s,
    failing after 2 misses; the full health check stays the VM's (a cluster has its own
    monitoring). With the watchdog off it runs the compose file's health check:
    periodSeconds = health.interval, timeoutSeconds = health.timeout, failureThreshold =
    health.retries, initialDelaySeconds = health.start_period. No startupProbe: Podman 4.3
    ignores it, while initialDelaySeconds is Podman's start period and, on a cluster, the
    wait before the first probe - either way a hang is noticed within the start period
    plus retries x interval. A failing probe restarts the container, as
    ``--health-on-failure=kill`` and systemd's ``Restart=always`` do on the VM.
  * Resources: limits.memory and limits.cpus are the limits, limits.memory_reservation is
    requests.memory; Podman's sizes (``700m`` is 700 MiB) become binary quantities
    (``700Mi``). requests.cpu is ``CPU_REQUEST`` unless told otherwise: the VM reserves no
    CPU, and without a request Kubernetes requests the limit - a whole CPU, which is what
    GKE Autopilot bills. limits.memory_swap has no Kubernetes field (NOTES.md says why).
  * Secrets: one Secret, ``<container_name>-secrets``, a key per configured secret, mounted
    read-only at /run/secrets (a file per key) with mode 0444. Podman ignores fsGroup and
    leaves the files root's, so any mode without read for others would lock the agent out
    under `podman kube play`; the pod holds one process, uid 1000, and nothing else.
    ``optional: false`` is spelled out: Podman 4.3 dereferences it unchecked.
  * Non-root: runAsNonRoot, uid/gid/fsGroup 1000, no privilege escalation, every capability
    dropped, RuntimeDefault seccomp, a read-only root filesystem; the heartbeat goes to
    /tmp, a small memory-backed emptyDir. No service account token and no service links:
    the agent talks to Telegram and Gemini, never to the cluster.

What cannot map stops with one ``ConfigError`` line naming the key: a container_name that
is not a Kubernetes name, a health duration that is not whole seconds, a CPU limit finer
than a millicore, a bad --image or --cpu-request.

Config keys: nightguard.container_name, image_name, base_image, limits.*, health.*,
secrets, env_file, agent_command, keep_images, compose_file and sync.* (through the
desired state).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

import yaml

from ..config import _IMAGE_NAME, Settings, parse_duration
from ..deploy.commands import (
    DATA_MOUNT,
    ContainerSpec,
    content_hash,
    image_build,
    unit_name,
)
from ..deploy.plan import Desired
from ..errors import ConfigError
from ..secret_spec import parse_sources

KUBERNETES_VERSION = "1.33"  # the schema the manifests are validated against (unit tests)
CONTAINER = "nightguard"  # the container's name inside the pod
DATA_SIZE = "1Gi"
CPU_REQUEST = "250m"
SECRETS_MOUNT = "/run/secrets"
SECRET_FILE_MODE = 0o444
TMP_MOUNT = "/tmp"
SUPERVISE = "/usr/local/bin/ng-supervise"  # the image's PID 1 (Dockerfile.nightguard)
LIVENESS_PERIOD = 5  # s between two `ng-supervise --alive` probes
TMP_SIZE = "16Mi"
# python-telegram-bot waits up to 30 s between failed polls, and a stop waits that pause
# out before it confirms the fetched updates; Recreate makes the new pod wait for this.
GRACE_SECONDS = 45
YAML_FILE = "nightguard.yaml"
CONTAINERFILE = "Containerfile"
NOTES_FILE = "NOTES.md"
APP_DIR = "app"
LABEL = "app.kubernetes.io/instance"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_CPU = re.compile(r"^(?:(\d+)m|(\d+(?:\.\d{1,3})?))$")
_SHELL_SYNTAX = re.compile(r"[|&;<>()$`\\*?\[\]#~{}\n]")


@dataclass(frozen=True)
class Names:
    """Every name the export gives out."""

    deployment: str
    secret: str
    claim: str
    container: str = CONTAINER


@dataclass(frozen=True)
class Bundle:
    """The export: file name -> text, the image to build, and the commands that build it."""

    files: dict[str, str]
    image: str
    names: Names
    commands: list[list[str]]


# -- settings -> Kubernetes values ------------------------------------------------------------
def _fail(settings: Settings, key: str, why: str) -> ConfigError:
    return ConfigError(f"{settings.source(key)}: nightguard.{key}: {why}")


def names_for(settings: Settings) -> Names:
    name = settings["container_name"]
    if not _DNS_LABEL.match(name):
        raise _fail(settings, "container_name",
                    f"{name!r} cannot name Kubernetes objects (lower-case letters, digits "
                    "and '-', starting and ending with a letter or digit)")
    return Names(deployment=name, secret=f"{name}-secrets", claim=f"{name}-data")


def memory_quantity(size: int) -> str:
    """Bytes as the largest binary unit that holds them exactly: 700 MiB -> '700Mi'."""
    if size == 0:
        return "0"
    for unit, factor in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _millicores(text: str) -> int | None:
    match = _CPU.match(text.strip())
    if not match:
        return None
    if match.group(1) is not None:
        return int(match.group(1))
    return round(float(match.group(2)) * 1000)


def cpu_quantity(settings: Settings) -> str:
    cpus = float(settings["limits.cpus"])
    milli = round(cpus * 1000)
    if milli < 1 or abs(cpus * 1000 - milli) > 1e-6:
        raise _fail(settings, "limits.cpus",
                    f"{settings['limits.cpus']} is finer than Kubernetes' millicore (0.001)")
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def cpu_request(settings: Settings, text: str) -> str:
    milli = _millicores(str(text))
    if milli is None or milli < 1:
        raise ConfigError(f"--cpu-request: {text!r} is not a CPU quantity (e.g. 250m or 0.5)")
    limit = _millicores(cpu_quantity(settings))
    if milli > limit:
        raise ConfigError(f"--cpu-request: {text} is above nightguard.limits.cpus "
                          f"{settings['limits.cpus']} (a request cannot exceed its limit)")
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def whole_seconds(settings: Settings, key: str, minimum: int) -> int:
    value = parse_duration(settings[key])
    if value != int(value) or value < minimum:
        raise _fail(settings, key, f"{settings[key]} does not fit a probe: Kubernetes counts "
                    f"whole seconds, at least {minimum}")
    return int(value)


def probe_command(health_cmd: str) -> list[str]:
    """The exec probe's argv: split like a shell would; through /bin/sh -c only when the
    command uses shell syntax (Podman 4.3 joins an exec probe's argv with spaces)."""
    if _SHELL_SYNTAX.search(health_cmd):
        return ["/bin/sh", "-c", health_cmd]
    return shlex.split(health_cmd)


def image_for(settings: Settings, desired: Desired, name: str | None = None) -> str:
    """``<name>:<hash>``; the name defaults to ``<image_name>-kube`` (apart from the deploy's
    own tags, which every deploy prunes). The tag changes with the base image and the tree."""
    name = name or f"{settings['image_name']}-kube"
    if not _IMAGE_NAME.match(name):
        why = ("image names are lowercase (registries and Podman refuse capitals)"
               if _IMAGE_NAME.match(name.lower()) else "not an image name without a tag")
        raise ConfigError(f"--image: {name!r}: {why} "
                          "(e.g. us-west1-docker.pkg.dev/my-project/nightguard/nightguard)")
    return f"{name}:{content_hash(desired.image_tag, desired.code_hash)}"


# GKE Autopilot's rules for a general-purpose Pod's requests (the README names the page):
# at least 50m CPU and 52 MiB memory where Pods may burst (GKE 1.29.2 and later; 250m and
# 512 MiB on older clusters), and between 1 and 6.5 GiB of memory per requested vCPU.
AUTOPILOT_MIN_CPU_MILLI = 50
AUTOPILOT_MIN_MEMORY = 52 * 1024**2
AUTOPILOT_GIB_PER_CPU = (1.0, 6.5)


def autopilot_warnings(cpu: str, memory: str) -> list[str]:
    """One line per Autopilot rule the rendered requests break (Autopilot then raises them,
    and bills what it raised them to); none for the defaults."""
    milli = _millicores(cpu) or 0
    size = _quantity_bytes(memory)
    lines = []
    if milli < AUTOPILOT_MIN_CPU_MILLI:
        lines.append(f"requests.cpu {cpu} is below Autopilot's minimum of "
                     f"{AUTOPILOT_MIN_CPU_MILLI}m")
    if size < AUTOPILOT_MIN_MEMORY:
        lines.append(f"requests.memory {memory} is below Autopilot's minimum of 52Mi")
    if milli:
        ratio = size / 1024**3 / (milli / 1000)
        low, high = AUTOPILOT_GIB_PER_CPU
        if not low <= ratio <= high:
            lines.append(f"requests {cpu} CPU / {memory} memory is {ratio:.2f} GiB per vCPU; "
                         f"Autopilot allows {low:g} to {high:g} (it raises the smaller one)")
    return lines


def _quantity_bytes(text: str) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(text[:-2]) * factor
    return int(text)


# -- manifests -------------------------------------------------------------------------------
def liveness_probe(settings: Settings, spec: ContainerSpec) -> dict:
    """The heartbeat contract's rule where a watchdog feeds the VM's liveness, else the full
    health check at its own pace (the module's docstring says why)."""
    probe = {"initialDelaySeconds": whole_seconds(settings, "health.start_period", 0),
             "timeoutSeconds": whole_seconds(settings, "health.timeout", 1)}
    if spec.watchdog_sec:
        return {"exec": {"command": [SUPERVISE, "--alive"]}, **probe,
                "periodSeconds": LIVENESS_PERIOD, "failureThreshold": 2}
    return {"exec": {"command": probe_command(spec.health_cmd)}, **probe,
            "periodSeconds": whole_seconds(settings, "health.interval", 1),
            "failureThreshold": settings["health.retries"]}


def _container(settings: Settings, spec: ContainerSpec, name: str, image: str,
               cpu: str) -> dict:
    """The agent's container: the deploy's command, environment, limits and health check."""
    environment = [("NG_DATA_DIR", DATA_MOUNT), *spec.environment]
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        **({"command": list(spec.command)} if spec.command else {}),
        "env": [{"name": key, "value": value} for key, value in environment],
        "resources": {
            "limits": {"cpu": cpu_quantity(settings),
                       "memory": memory_quantity(settings.size("limits.memory"))},
            "requests": {"cpu": cpu_request(settings, cpu),
                         "memory": memory_quantity(settings.size("limits.memory_reservation"))},
        },
        "livenessProbe": liveness_probe(settings, spec),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "secrets", "mountPath": SECRETS_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": TMP_MOUNT},
            {"name": "data", "mountPath": DATA_MOUNT},
        ],
    }


def _pod(names: Names, labels: dict, secrets: tuple[str, ...], container: dict) -> dict:
    """The Deployment's pod template: non-root, no service account, the three volumes."""
    return {
        "metadata": {"labels": dict(labels)},
        "spec": {
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": GRACE_SECONDS,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "fsGroup": 1000,
                "fsGroupChangePolicy": "OnRootMismatch",
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": [
                {"name": "secrets", "secret": {
                    "secretName": names.secret, "defaultMode": SECRET_FILE_MODE,
                    "optional": False,
                    "items": [{"key": name, "path": name} for name in secrets]}},
                {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": TMP_SIZE}},
                {"name": "data", "persistentVolumeClaim": {"claimName": names.claim}},
            ],
        },
    }


def manifests(settings: Settings, desired: Desired, image: str,
              cpu: str = CPU_REQUEST) -> list[dict]:
    """The PersistentVolumeClaim and the Deployment, in the order `podman kube play` needs
    (4.3 plays documents in order, and a claim after its pod finds the volume made)."""
    names = names_for(settings)
    spec = desired.spec
    labels = {"app.kubernetes.io/name": "nightguard", LABEL: names.deployment}
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": names.claim, "labels": dict(labels)},
        "spec": {"accessModes": ["ReadWriteOncePod"],
                 "resources": {"requests": {"storage": DATA_SIZE}}},
    }
    container = _container(settings, spec, names.container, image, cpu)
    pod = _pod(names, labels, spec.secrets, container)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": names.deployment, "labels": dict(labels)},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "revisionHistoryLimit": settings["keep_images"],
            "selector": {"matchLabels": {LABEL: names.deployment}},
            "template": pod,
        },
    }
    return [claim, deployment]


def secret_shape(names: Names, secrets: tuple[str, ...] | list[str]) -> dict:
    """The Secret the pod reads, with placeholders where the values go."""
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": names.secret},
            "type": "Opaque", "data": {name: "<base64 of the value>" for name in secrets}}


def manifests_text(settings: Settings, desired: Desired, docs: list[dict]) -> str:
    names = names_for(settings)
    shape = yaml.safe_dump(secret_shape(names, desired.spec.secrets), sort_keys=False)
    header = [
        "# Night Guard on Kubernetes, written by `inv kube.export` from the settings `inv deploy`",
        f"# uses (code tree {desired.code_hash}). Regenerate rather than edit. Checked against",
        f"# Kubernetes {KUBERNETES_VERSION}'s schema.",
        "#   kubectl apply -f nightguard.yaml     once the Secret below exists (NOTES.md)",
        "#   podman kube play nightguard.yaml     a rehearsal on the VM (NOTES.md)",
        "# The Secret is not in this file: its values stay in your .env. Its shape:",
        *(f"#   {line}" for line in shape.splitlines()),
        f"# Its files are mounted at {SECRETS_MOUNT} with defaultMode {SECRET_FILE_MODE} "
        f"(= {SECRET_FILE_MODE:#o}).",
    ]
    body = "---\n".join(yaml.safe_dump(doc, sort_keys=False) for doc in docs)
    return "\n".join(header) + "\n---\n" + body


def containerfile_text(desired: Desired) -> str:
    return "\n".join([
        "# Written by `inv kube.export`; regenerate rather than edit.",
        "# The image `inv deploy` builds (deployment/Dockerfile.nightguard), with the agent's",
        "# code inside: a cluster cannot bind-mount the laptop's tree. app/ is the declared",
        f"# sync set (nightguard.sync): {len(desired.manifest)} files, tree {desired.code_hash}.",
        f"FROM {desired.image_ref}",
        f"COPY {APP_DIR}/ /app/",
        "",
    ])


# -- commands and notes ----------------------------------------------------------------------
def build_commands(settings: Settings, desired: Desired, image: str, out: str,
                   deploy_context: str, needs_network: bool) -> list[list[str]]:
    """Build the deploy's image as `inv deploy` does on the VM, then the agent's image on
    it, then push (only for an image that lives in a registry)."""
    commands = [
        image_build(desired.image_ref, f"{deploy_context}/Dockerfile.nightguard",
                    deploy_context, settings["base_image"], needs_network),
        ["podman", "build", "--format", "docker", "--pull=never",
         "--file", f"{out}/{CONTAINERFILE}", "--tag", image, out],
    ]
    if not image.startswith("localhost/"):
        commands.append(["podman", "push", image])
    return commands


def _secret_commands(settings: Settings, names: Names) -> list[str]:
    """The kubectl command that makes the Secret, each value read from its source on the
    spot (a .env key through python-dotenv, the command as configured, gcloud for Secret
    Manager), so that no value is written in NOTES.md."""
    sources = parse_sources(settings["secrets"])
    lines = []
    if any(source.kind == "env" for source in sources.values()):
        lines.append("val() { .venv/bin/python -c 'import sys, dotenv; "
                     "sys.stdout.write(dotenv.dotenv_values(sys.argv[1])[sys.argv[2]])' "
                     f"{shlex.quote(settings['env_file'])} \"$1\"; }}")
    lines.append(f"kubectl create secret generic {names.secret} \\")
    for index, (name, source) in enumerate(sources.items()):
        if source.kind == "env":
            reader = f"val {source.ref}"
        elif source.kind == "command":  # printf drops the trailing newline, as a deploy does
            reader = f'printf %s "$({shlex.join(source.argv)})"'
        else:
            secret, version = source.ref.split("/versions/")
            reader = (f"gcloud secrets versions access {version} --secret="
                      f"{secret.rsplit('/', 1)[-1]} --project={source.project}")
        last = index == len(sources) - 1
        lines.append(f"  --from-file={name}=<({reader})" + ("" if last else " \\"))
    return lines


def _notes_build(settings: Settings, desired: Desired, image: str,
                 commands: list[list[str]]) -> list[str]:
    """NOTES.md's title and how to build and push the image."""
    lines = [
        "# Night Guard on Kubernetes: notes",
        "",
        f"Written by `inv kube.export` (code tree {desired.code_hash}); nothing here holds a "
        "secret value.",
        "",
        "## Build and push",
        "",
        "```sh",
        *(shlex.join(argv) for argv in commands),
        "```",
        "",
        "(Paths as seen from where `inv kube.export` ran.) "
        f"The first command builds `{desired.image_ref}` exactly as `inv deploy` does on the "
        f"VM; the second builds `{image}` from it with the synced tree in /app. A new tree "
        "or a new base gives a new tag.",
    ]
    if settings["base_image"].startswith("localhost/"):
        lines += ["", f"The base image `{settings['base_image']}` exists only where it was "
                  "loaded (the sandbox preloads it). For a registry build, export with a "
                  "public base: `NIGHTGUARD_BASE_IMAGE=docker.io/library/python:3.11-slim "
                  "inv kube.export ...` (or `--target gcp`)."]
    return lines


def _notes_secret(settings: Settings, desired: Desired, names: Names) -> list[str]:
    """How to create the Secret from .env with no file in between, then apply."""
    return [
        "## The Secret (never in these files)",
        "",
        f"The pod reads Secret `{names.secret}`, keys "
        + ", ".join(f"`{name}`" for name in desired.spec.secrets)
        + f", as files under `{SECRETS_MOUNT}`. Create it from `.env` through pipes, "
        "with no file in between (bash or zsh):",
        "",
        "```sh",
        *_secret_commands(settings, names),
        "```",
        "",
        "To change a value: the same command with `--dry-run=client -o yaml | kubectl apply "
        f"-f -`, then `kubectl rollout restart deployment/{names.deployment}` (the agent reads "
        "its secrets when it starts).",
        "",
        "## Apply",
        "",
        "```sh",
        "kubectl apply -f nightguard.yaml",
        f"kubectl rollout status deployment/{names.deployment}",
        f"kubectl logs -f deployment/{names.deployment}",
        "```",
    ]


def _notes_unmapped(settings: Settings, names: Names, unit: str) -> list[str]:
    """What the VM has and a cluster does not (swap, the unit, rollback, ...)."""
    swap = settings.size("limits.memory_swap") - settings.size("limits.memory")
    return [
        "## What does not map",
        "",
        f"- **Swap.** On the VM the container's RAM and swap together may reach "
        f"{settings['limits.memory_swap']} ({memory_quantity(swap)} of it swap) before the "
        "kernel kills it. "
        "Kubernetes sets no per-container swap (node swap, where a cluster has it, is the "
        f"node's), so the {memory_quantity(settings.size('limits.memory'))} memory limit is "
        "where the agent is killed. Size `nightguard.limits.memory` from the peak that "
        "`inv health` measured on the VM (its memory line: peak RAM, plus the swap in use), "
        "with a margin, rather than from the VM's limit.",
        f"- **The host's swapfile** ({settings['limits.swap_size']}, swappiness "
        f"{settings['limits.swappiness']}; `inv host.swap`): nodes are the cluster's; "
        "there is no host to prepare.",
        f"- **The systemd unit** (`{unit}`: start at boot, `Restart=always`, "
        "`--health-on-failure=kill`): the Deployment's controller and `restartPolicy: "
        "Always` restart the container, the livenessProbe restarts a hung one.",
        "- **Release markers, rollback, lock, audit log** (`inv rollback`, `inv history`): "
        f"`kubectl rollout undo deployment/{names.deployment}` (the last "
        f"{settings['keep_images']} ReplicaSets are kept) and the cluster's audit log.",
        f"- **`nightguard.network`** ({settings['network']}): the pod has the cluster's "
        "network; the agent only makes outbound calls.",
        "- **`inv health`, `inv logs`, `inv secrets.*`** talk to the VM: use `kubectl`.",
    ]


def _notes_rehearsal(settings: Settings, desired: Desired, names: Names,
                     unit: str) -> list[str]:
    """Running the export with `podman kube play` on the VM, and how Podman differs."""
    return [
        "## Rehearsal on the VM with `podman kube play`",
        "",
        f"Stop the VM's service first (`sudo systemctl stop {unit}`): two pollers on one "
        "token get 409 Conflict. The Containerfile's FROM is the image of the first build "
        "command `inv kube.export` printed; the VM already has that image from `inv deploy`, "
        "under a tag that also holds the id of the host's base image: give it the FROM name "
        f"(`sudo podman tag \"$(sudo podman container inspect --format "
        f"'{{{{.ImageName}}}}' {settings['container_name']})\" {desired.image_ref}`) "
        "instead of building it again. Podman looks the Secret up as a Podman secret of the same "
        "name whose content is a Kubernetes Secret document; create it from stdin (`sudo "
        f"podman secret create {names.secret} -`). Podman 4.4 or later reads `stringData` "
        "or base64 `data`; Podman 4.3 (Debian 12) ignores `stringData` and does not decode "
        "`data`, so there the document must carry the plain values under `data`. Differences "
        "from a cluster: Podman ignores `fsGroup`, `runAsNonRoot`, `requests.cpu` and the "
        "access mode; it sets no swap limit of its own; it copies the Secret's items into a "
        f"named volume `{names.secret}` on the host's disk (root only), which `podman kube "
        f"down` leaves behind with the data volume `{names.claim}`: remove both with `sudo "
        f"podman volume rm {names.secret} {names.claim}`, and the Podman secret with `sudo "
        f"podman secret rm {names.secret}`. The pod is `{names.deployment}-pod` "
        f"(`{names.deployment}-pod-0` on Podman 4.3), its container the pod's name plus "
        f"`-{names.container}`. Podman before 4.5 may leave a hung container stopped "
        "instead of restarting it (containers/podman#17777).",
    ]


def notes_text(settings: Settings, desired: Desired, image: str,
               commands: list[list[str]]) -> str:
    """NOTES.md: the commands, the Secret without values, what does not map."""
    names = names_for(settings)
    unit = unit_name(settings["container_name"])
    lines = _notes_build(settings, desired, image, commands)
    for section in (_notes_secret(settings, desired, names),
                    _notes_unmapped(settings, names, unit),
                    _notes_rehearsal(settings, desired, names, unit)):
        lines += ["", *section]  # a blank line before each heading
    return "\n".join([*lines, ""])


def render(settings: Settings, desired: Desired, *, image: str | None = None,
           cpu: str = CPU_REQUEST, out: str = "build/kube", deploy_context: str = "deployment",
           needs_network: bool = True) -> Bundle:
    """Everything but app/ (the task copies the tree). ``out`` and ``deploy_context`` are
    the paths the printed commands use."""
    names = names_for(settings)
    ref = image_for(settings, desired, image)
    docs = manifests(settings, desired, ref, cpu)
    commands = build_commands(settings, desired, ref, out, deploy_context, needs_network)
    files = {YAML_FILE: manifests_text(settings, desired, docs),
             CONTAINERFILE: containerfile_text(desired),
             NOTES_FILE: notes_text(settings, desired, ref, commands)}
    return Bundle(files=files, image=ref, names=names, commands=commands)
