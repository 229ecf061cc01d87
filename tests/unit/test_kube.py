"""`inv kube.export`: the manifests' structure, the schema of a pinned Kubernetes version
(offline), no .env value in anything written, and one-line errors for what cannot map."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tasks.config import load_settings
from tasks.deploy.plan import desired_state
from tasks.deploy.sync import local_manifest, rules_for
from tasks.errors import ConfigError, StepFailed
from tasks.kube import render as kube
from tasks.kube.tasks import (
    MARKER,
    check_no_values,
    check_outside_sync,
    check_schema,
    write_export,
)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOKEN = "123456:tg-kube-token-value"
GEMINI = "AIzaSy-kube-gemini-value"
MiB = 1024 * 1024
# a stand-in for the synced tree: the renderer only hashes it
MANIFEST = {"execution/system/night_guard.py": "a" * 64 + ":644",
            "knowledge/README.md": "b" * 64 + ":644"}


def settings_with(**overrides):
    return load_settings(root=ROOT, environ={}, overrides=overrides)


def bundle_for(settings=None, **kwargs):
    settings = settings or settings_with()
    desired = desired_state(settings, {}, MANIFEST)
    return kube.render(settings, desired, **kwargs), desired


def documents(bundle) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(bundle.files[kube.YAML_FILE])}


def container_of(bundle) -> dict:
    (container,) = documents(bundle)["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def pod_of(bundle) -> dict:
    return documents(bundle)["Deployment"]["spec"]["template"]["spec"]


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# -- the workload -------------------------------------------------------------------------------
def test_one_replica_that_is_stopped_before_its_successor_starts():
    bundle, _ = bundle_for()
    docs = list(yaml.safe_load_all(bundle.files[kube.YAML_FILE]))
    assert [doc["kind"] for doc in docs] == ["PersistentVolumeClaim", "Deployment"]
    spec = documents(bundle)["Deployment"]["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert spec["selector"] == {"matchLabels": {kube.LABEL: "97layer-nightguard"}}
    assert spec["template"]["metadata"]["labels"][kube.LABEL] == "97layer-nightguard"
    assert spec["revisionHistoryLimit"] == 3  # keep_images
    # the data claim admits one pod at a time: a replacement waits for its predecessor
    claim = documents(bundle)["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "97layer-nightguard-data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOncePod"]
    assert pod_of(bundle)["volumes"][2] == {
        "name": "data", "persistentVolumeClaim": {"claimName": "97layer-nightguard-data"}}
    assert pod_of(bundle)["restartPolicy"] == "Always"


def test_resources_are_the_settings_sizes_in_binary_units():
    bundle, _ = bundle_for()
    assert container_of(bundle)["resources"] == {
        "limits": {"cpu": "1", "memory": "700Mi"},
        "requests": {"cpu": "250m", "memory": "500Mi"},
    }
    other = settings_with(**{"limits.memory": "1g", "limits.memory_reservation": "768m",
                             "limits.memory_swap": "3g", "limits.cpus": "0.5"})
    bundle, _ = bundle_for(other, cpu="100m")
    assert container_of(bundle)["resources"] == {
        "limits": {"cpu": "500m", "memory": "1Gi"},
        "requests": {"cpu": "100m", "memory": "768Mi"},
    }


@pytest.mark.parametrize(("size", "quantity"), [
    (700 * MiB, "700Mi"), (2048 * MiB, "2Gi"), (1536 * MiB, "1536Mi"), (3 * 1024, "3Ki"),
    (1000, "1000"), (0, "0"),
])
def test_memory_quantities(size, quantity):
    assert kube.memory_quantity(size) == quantity


def test_probe_is_the_watchdogs_rule_at_the_watchdogs_pace():
    bundle, desired = bundle_for()
    assert container_of(bundle)["livenessProbe"] == {
        "exec": {"command": ["/usr/local/bin/ng-supervise", "--alive"]},
        "initialDelaySeconds": 60, "periodSeconds": 5, "timeoutSeconds": 10,
        "failureThreshold": 2,
    }
    assert "startupProbe" not in container_of(bundle)  # Podman 4.3 would ignore it
    env = {e["name"]: e["value"] for e in container_of(bundle)["env"]}
    assert env["NG_HEARTBEAT_MAX_AGE"] == "15"  # the probe reads the same limits
    probe = container_of(bundle_for(settings_with(**{"health.watchdog": "1m"}))[0])
    assert probe["livenessProbe"]["periodSeconds"] == 5  # the rule's own limits decide


def test_without_a_watchdog_the_probe_runs_the_compose_health_check():
    bundle, desired = bundle_for(settings_with(**{"health.watchdog": "off",
                                                  "health.interval": "30s"}))
    assert container_of(bundle)["livenessProbe"] == {
        "exec": {"command": ["python3", "/app/execution/system/health_check.py"]},
        "initialDelaySeconds": 60, "periodSeconds": 30, "timeoutSeconds": 10,
        "failureThreshold": 2,  # health.retries
    }
    assert desired.spec.health_cmd == "python3 /app/execution/system/health_check.py"
    other = settings_with(**{"health.watchdog": "off", "health.interval": "20s",
                             "health.timeout": "5s", "health.retries": "4",
                             "health.start_period": "2m"})
    probe = container_of(bundle_for(other)[0])["livenessProbe"]
    assert (probe["periodSeconds"], probe["timeoutSeconds"], probe["failureThreshold"],
            probe["initialDelaySeconds"]) == (20, 5, 4, 120)


def test_probe_command_keeps_shell_syntax_in_a_shell():
    assert kube.probe_command("python3 /app/x.py --max-age 30") == \
        ["python3", "/app/x.py", "--max-age", "30"]
    assert kube.probe_command("test -f /tmp/a && exit 0") == \
        ["/bin/sh", "-c", "test -f /tmp/a && exit 0"]


def test_secrets_are_files_under_run_secrets_from_a_secret_the_export_never_holds():
    bundle, _ = bundle_for()
    pod = pod_of(bundle)
    assert pod["volumes"][0] == {"name": "secrets", "secret": {
        "secretName": "97layer-nightguard-secrets", "defaultMode": 0o444, "optional": False,
        "items": [{"key": "telegram_bot_token", "path": "telegram_bot_token"},
                  {"key": "gemini_api_key", "path": "gemini_api_key"}]}}
    assert container_of(bundle)["volumeMounts"][0] == {
        "name": "secrets", "mountPath": "/run/secrets", "readOnly": True}
    assert "Secret" not in documents(bundle)  # only its shape, as a comment
    assert "#   kind: Secret" in bundle.files[kube.YAML_FILE]
    env = {e["name"]: e["value"] for e in container_of(bundle)["env"]}
    assert env["NG_REQUIRED_SECRETS"] == "telegram_bot_token,gemini_api_key"
    assert not any("valueFrom" in e for e in container_of(bundle)["env"])  # never env vars


def test_non_root_read_only_and_no_cluster_credentials():
    bundle, _ = bundle_for()
    pod = pod_of(bundle)
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
    assert container_of(bundle)["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]}}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    # the heartbeat's /tmp is the only other writable place
    assert pod["volumes"][1] == {"name": "tmp",
                                 "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}
    assert [(m["name"], m["mountPath"]) for m in container_of(bundle)["volumeMounts"]] == \
        [("secrets", "/run/secrets"), ("tmp", "/tmp"), ("data", "/data")]


def test_environment_and_command_are_the_deploys():
    bundle, desired = bundle_for()
    env = [(e["name"], e["value"]) for e in container_of(bundle)["env"]]
    assert env == [("NG_DATA_DIR", "/data"), *desired.spec.environment]
    assert "command" not in container_of(bundle)  # the image's CMD
    other = settings_with(agent_command="python3 execution/examples/telegram_night_guard.py")
    assert container_of(bundle_for(other)[0])["command"] == \
        ["python3", "execution/examples/telegram_night_guard.py"]


# -- the image ----------------------------------------------------------------------------------
def test_containerfile_builds_on_the_deploys_image_with_the_tree_inside():
    bundle, desired = bundle_for()
    lines = [line for line in bundle.files[kube.CONTAINERFILE].splitlines()
             if not line.startswith("#")]
    assert lines == [f"FROM {desired.image_ref}", "COPY app/ /app/"]
    assert desired.image_ref.startswith("localhost/nightguard:")
    assert container_of(bundle)["image"] == bundle.image


def test_containerfile_passes_hadolint(tmp_path):
    bundle, _ = bundle_for()
    path = tmp_path / "Containerfile"
    path.write_text(bundle.files[kube.CONTAINERFILE])
    done = subprocess.run([str(BIN / "hadolint"), str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_is_tagged_by_the_base_and_the_tree():
    settings = settings_with()
    first = kube.image_for(settings, desired_state(settings, {}, MANIFEST))
    assert first.startswith("localhost/nightguard-kube:")  # apart from what deploys prune
    changed = dict(MANIFEST, **{"knowledge/README.md": "c" * 64 + ":644"})
    assert kube.image_for(settings, desired_state(settings, {}, changed)) != first
    other_base = settings_with(base_image="docker.io/library/python:3.12-slim")
    assert kube.image_for(other_base, desired_state(other_base, {}, MANIFEST)) != first
    assert kube.image_for(settings, desired_state(settings, {}, MANIFEST)) == first
    registry = "us-west1-docker.pkg.dev/proj/repo/nightguard"
    bundle, _ = bundle_for(image=registry)
    assert bundle.image.startswith(registry + ":")
    assert bundle.commands[-1] == ["podman", "push", bundle.image]


def test_build_commands_are_the_deploys_build_then_the_code_layer():
    bundle, desired = bundle_for(out="build/kube", needs_network=False)
    base, code = bundle.commands  # a localhost/ image is not pushed
    assert base[:2] == ["podman", "build"] and base[base.index("--tag") + 1] == \
        desired.image_ref
    assert "--network=none" in base and "--pull=never" in base  # the sandbox's base
    assert code == ["podman", "build", "--format", "docker", "--pull=never", "--file",
                    "build/kube/Containerfile", "--tag", bundle.image, "build/kube"]


# -- schema and secrets -------------------------------------------------------------------------
def test_manifests_fit_the_pinned_kubernetes_schema_offline():
    assert kube.KUBERNETES_VERSION == "1.33"
    bundle, _ = bundle_for(image="us-west1-docker.pkg.dev/proj/repo/nightguard")
    for doc in yaml.safe_load_all(bundle.files[kube.YAML_FILE]):
        assert kubernetes_validate.validate(doc, kube.KUBERNETES_VERSION, strict=True) == \
            "1.33"
    check_schema(bundle.files[kube.YAML_FILE])


def test_schema_check_names_what_is_wrong():
    bundle, _ = bundle_for()
    docs = list(yaml.safe_load_all(bundle.files[kube.YAML_FILE]))
    docs[1]["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}  # a typo
    with pytest.raises(StepFailed) as info:
        check_schema(yaml.safe_dump_all(docs))
    assert "Deployment spec/template/spec/containers/0" in one_line(info)
    assert "livenesProbe" in str(info.value)


def test_no_env_value_in_anything_rendered():
    bundle, _ = bundle_for()
    text = "".join(bundle.files.values())
    assert TOKEN not in text and GEMINI not in text
    values = kube_values()
    check_no_values(bundle, values)  # passes
    leaky = kube.Bundle(files={"NOTES.md": f"oops {GEMINI}"}, image="x", names=bundle.names,
                        commands=[])
    with pytest.raises(StepFailed) as info:
        check_no_values(leaky, values)
    assert "NOTES.md would hold a .env value" in one_line(info)
    assert GEMINI not in str(info.value)


def kube_values():
    from tasks.deploy.envfile import SecretValues

    return SecretValues({"telegram_bot_token": TOKEN, "gemini_api_key": GEMINI})


# -- what cannot map ----------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "kwargs", "expected"), [
    ({"container_name": "Night_Guard"}, {},
     "command line: nightguard.container_name: 'Night_Guard' cannot name Kubernetes objects"),
    ({"health.interval": "1500ms", "health.watchdog": "off"}, {},
     "command line: nightguard.health.interval: 1500ms does not fit a probe"),
    ({"health.timeout": "0s"}, {},
     "command line: nightguard.health.timeout: 0s does not fit a probe"),
    ({"limits.cpus": "0.0005"}, {},
     "command line: nightguard.limits.cpus: 0.0005 is finer than Kubernetes' millicore"),
    ({}, {"image": "Registry/NightGuard"},
     "--image: 'Registry/NightGuard': image names are lowercase (registries and Podman refuse "
     "capitals)"),
    ({}, {"image": "registry/night guard"}, "--image: 'registry/night guard': not an image"),
    ({}, {"cpu": "2"}, "--cpu-request: 2 is above nightguard.limits.cpus 1.0"),
    ({}, {"cpu": "lots"}, "--cpu-request: 'lots' is not a CPU quantity"),
])
def test_what_cannot_map_is_one_line(overrides, kwargs, expected):
    settings = settings_with(**overrides)
    with pytest.raises(ConfigError) as info:
        bundle_for(settings, **kwargs)
    assert one_line(info).startswith(expected), str(info.value)


def test_a_reservation_above_the_limit_never_reaches_the_renderer():
    with pytest.raises(ConfigError) as info:
        settings_with(**{"limits.memory_reservation": "800m"})
    assert "nightguard.limits.memory_reservation: 800m is above limits.memory 700m" in \
        one_line(info)


# -- notes --------------------------------------------------------------------------------------
def test_notes_say_what_does_not_map():
    bundle, _ = bundle_for()
    notes = bundle.files[kube.NOTES_FILE]
    assert "**Swap.**" in notes and "2700m (2000Mi of it swap)" in notes
    assert "`inv health`" in notes
    assert "**The host's swapfile** (2g, swappiness 10" in notes
    assert "**The systemd unit** (`container-97layer-nightguard.service`" in notes
    assert "--from-file=telegram_bot_token=<(val TELEGRAM_BOT_TOKEN)" in notes
    assert "kubectl create secret generic 97layer-nightguard-secrets" in notes
    for argv in bundle.commands:
        assert " ".join(argv) in notes


def test_notes_read_each_secret_from_its_own_source():
    settings = load_settings(root=ROOT, environ={"NIGHTGUARD_SECRETS": (
        '{"telegram_bot_token": {"command": "op read \'op://ng/tg bot\'"}, '
        '"gemini_api_key": {"gcp": "projects/p-1/secrets/gem/versions/3"}}')})
    notes = bundle_for(settings)[0].files[kube.NOTES_FILE]
    assert "val() {" not in notes  # no .env entry, no .env reader
    assert "  --from-file=telegram_bot_token=<(printf %s \"$(op read 'op://ng/tg bot')\")" \
        " \\\n" in notes
    assert "  --from-file=gemini_api_key=<(gcloud secrets versions access 3 --secret=gem " \
        "--project=p-1)\n" in notes


# -- writing the export -------------------------------------------------------------------------
def test_export_writes_exactly_the_sync_set_and_replaces_a_stale_one(tmp_path):
    bundle, _ = bundle_for()
    source = tmp_path / "src"
    (source / "execution").mkdir(parents=True)
    (source / "execution" / "a.py").write_text("print('a')\n")
    (source / "execution" / "run.sh").write_text("#!/bin/sh\n")
    (source / "execution" / "run.sh").chmod(0o755)
    settings = load_settings(root=ROOT, environ={}, overrides={"source_dir": str(source)})
    manifest = local_manifest(source, rules_for(settings))
    out = tmp_path / "out"
    write_export(out, bundle, source, manifest)
    assert sorted(p.relative_to(out / "app").as_posix()
                  for p in (out / "app").rglob("*") if p.is_file()) == \
        ["execution/a.py", "execution/run.sh"]
    assert (out / "app" / "execution" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (out / kube.YAML_FILE).read_text() == bundle.files[kube.YAML_FILE]
    (source / "execution" / "a.py").unlink()
    write_export(out, bundle, source, local_manifest(source, rules_for(settings)))
    assert not (out / "app" / "execution" / "a.py").exists()
    assert (out / MARKER).exists()


def test_export_refuses_a_directory_it_did_not_write(tmp_path):
    bundle, _ = bundle_for()
    (tmp_path / "precious.txt").write_text("keep me\n")
    with pytest.raises(ConfigError) as info:
        write_export(tmp_path, bundle, ROOT, {})
    assert "not empty and not an earlier export" in one_line(info)
    assert (tmp_path / "precious.txt").exists()
    with pytest.raises(ConfigError) as info:
        write_export(tmp_path / "precious.txt", bundle, ROOT, {})
    assert one_line(info).endswith("precious.txt: is not a directory")


def test_export_stays_out_of_the_synced_tree(tmp_path):
    check_outside_sync(tmp_path / "build" / "kube", tmp_path, ["execution", "knowledge"])
    with pytest.raises(ConfigError) as info:
        check_outside_sync(tmp_path / "knowledge" / "kube", tmp_path, ["execution", "knowledge"])
    assert "inside the synced tree (knowledge, nightguard.sync.include)" in one_line(info)


def test_build_dir_is_ignored_by_git():
    assert "build/" in (ROOT / ".gitignore").read_text().splitlines()


# -- the task, as a user runs it ----------------------------------------------------------------
REGISTRY_IMAGE = "us-west1-docker.pkg.dev/my-project/nightguard/nightguard"


def run_export(tmp_path, *args, **env):
    env_file = tmp_path / ".env"
    env_file.write_text(f"TELEGRAM_BOT_TOKEN={TOKEN}\nGEMINI_API_KEY={GEMINI}\n")
    env_file.chmod(0o600)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTGUARD_")}
    environ.update({"NIGHTGUARD_ENV_FILE": str(env_file), **env})
    return subprocess.run([str(BIN / "inv"), "kube.export", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=120)


def test_inv_kube_export_writes_no_env_value_anywhere(tmp_path):
    out = tmp_path / "out"
    done = run_export(tmp_path, "--out", str(out), "--image", REGISTRY_IMAGE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid for Kubernetes 1.33" in done.stdout
    assert "warning" not in done.stdout and "note:" not in done.stdout  # Autopilot's rules met
    assert TOKEN not in done.stdout + done.stderr and GEMINI not in done.stdout + done.stderr
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {kube.YAML_FILE, kube.CONTAINERFILE, kube.NOTES_FILE} <= {p.name for p in written}
    for path in written:
        data = path.read_bytes()
        assert TOKEN.encode() not in data and GEMINI.encode() not in data, path
    expected = local_manifest(ROOT, rules_for(load_settings(root=ROOT, environ={})))
    assert sorted(p.relative_to(out / "app").as_posix()
                  for p in (out / "app").rglob("*") if p.is_file()) == sorted(expected)
    for argv_line in done.stdout.splitlines():
        if argv_line.startswith("  podman build") and "Containerfile" in argv_line:
            assert argv_line.split("--file ")[1].startswith(str(out / "Containerfile"))


def test_inv_kube_export_fails_in_one_line_before_writing(tmp_path):
    out = tmp_path / "out"
    done = run_export(tmp_path, "--out", str(out), NIGHTGUARD_LIMITS_MEMORY_RESERVATION="800m")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: environment (NIGHTGUARD_LIMITS_MEMORY_RESERVATION): "
        "nightguard.limits.memory_reservation: 800m is above limits.memory 700m"]
    assert not out.exists()
    done = run_export(tmp_path, "--out", str(out), "--image", "Registry/NightGuard")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --image: 'Registry/NightGuard': image names are lowercase (registries and "
        "Podman refuse capitals) (e.g. us-west1-docker.pkg.dev/my-project/nightguard/nightguard)"]
    assert not out.exists()


def test_inv_kube_export_needs_an_image_a_cluster_can_pull(tmp_path):
    out = tmp_path / "out"
    done = run_export(tmp_path, "--out", str(out))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: kube.export needs the image a cluster will pull: --image (e.g. "
        "us-west1-docker.pkg.dev/my-project/nightguard/nightguard) or nightguard.kube.image; "
        "nothing written"]
    assert not out.exists()
    done = run_export(tmp_path, "--out", str(out), NIGHTGUARD_KUBE_IMAGE=REGISTRY_IMAGE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"image: {REGISTRY_IMAGE}:" in (out / kube.YAML_FILE).read_text()
    done = run_export(tmp_path, "--out", str(out), "--image", "localhost/nightguard-kube")
    assert done.returncode == 0, done.stdout + done.stderr
    note, = [line for line in done.stdout.splitlines() if line.startswith("note: ")]
    assert note.startswith("note: localhost/nightguard-kube:") and note.endswith(
        " is on no registry: no cluster can pull it (a `podman kube play` rehearsal on the VM "
        "can); for GKE give --image a registry's name")


def test_the_readme_export_command_names_a_valid_image():
    readme = (ROOT / "README.md").read_text()
    names = re.findall(r"kube\.export --image (\S+)", readme)
    assert names == [REGISTRY_IMAGE]
    kube.image_for(settings_with(), desired_state(settings_with(), {}, MANIFEST), names[0])


def test_autopilot_rules_hold_for_the_defaults_and_are_named_when_broken():
    bundle, _ = bundle_for(image=REGISTRY_IMAGE)
    requests = container_of(bundle)["resources"]["requests"]
    assert requests == {"cpu": "250m", "memory": "500Mi"}
    assert kube.autopilot_warnings(requests["cpu"], requests["memory"]) == []
    assert kube.autopilot_warnings("40m", "50Mi") == [
        "requests.cpu 40m is below Autopilot's minimum of 50m",
        "requests.memory 50Mi is below Autopilot's minimum of 52Mi"]
    assert kube.autopilot_warnings("100m", "700Mi") == [
        "requests 100m CPU / 700Mi memory is 6.84 GiB per vCPU; Autopilot allows 1 to 6.5 (it "
        "raises the smaller one)"]
    assert kube.autopilot_warnings("1", "512Mi") == [
        "requests 1 CPU / 512Mi memory is 0.50 GiB per vCPU; Autopilot allows 1 to 6.5 (it "
        "raises the smaller one)"]
