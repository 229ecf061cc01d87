"""`inv kube.export`: the agent as Kubernetes manifests, from the settings `inv deploy` uses.

Runs the deploy's preflight and nothing on a host: settings, the .env check, the compose
file, and the declared tree scanned for .env values (that tree goes into an image, which
may go to a registry). Renders with ``tasks.kube.render`` and writes the export directory
(``--out``, default build/kube/, git-ignored; a relative path is taken from the project
root): nightguard.yaml, Containerfile, app/ (the synced tree), NOTES.md. Writes nothing if a
.env value would land in any of them; checks the manifests against Kubernetes
``KUBERNETES_VERSION``'s schema offline (kubernetes-validate). Prints the build and push
commands.

Config keys: as `inv deploy` (``inv config``); which ones the manifests use:
``tasks.kube.render``.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import yaml
from invoke import Collection, task

from ..cli import TARGET_HELP, one_line_errors, settings_for
from ..deploy.envfile import SecretValues
from ..deploy.pipeline import preflight
from ..deploy.plan import build_needs_network, desired_state
from ..deploy.sync import file_entry
from ..errors import ConfigError, StepFailed
from .render import (
    APP_DIR,
    CPU_REQUEST,
    KUBERNETES_VERSION,
    NOTES_FILE,
    YAML_FILE,
    Bundle,
    autopilot_warnings,
    render,
)

DEFAULT_OUT = "build/kube"
MARKER = ".nightguard-kube-export"  # an earlier export: safe to overwrite
MIN_VALUE_LENGTH = 6  # as the sync's scan: a shorter value matches text by chance


def shown(path: Path) -> str:
    """A path as the printed commands use it: relative to the current directory if under
    it."""
    try:
        return str(path.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(path)


def check_schema(text: str) -> bool:
    """Every document against the pinned Kubernetes version's schema, strictly (an unknown
    field is an error). Offline: the schemas ship inside kubernetes-validate (about 100 MB,
    so an extra: `pip install -e '.[kube]'`; the unit tests always run it). False when it
    is not installed."""
    try:
        import kubernetes_validate
    except ImportError:
        return False

    for doc in yaml.safe_load_all(text):
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            raise StepFailed("export", f"{doc['kind']} {where}: {exc.message} (Kubernetes "
                             f"{KUBERNETES_VERSION} schema)") from None
    return True


def container_resources(bundle: Bundle) -> dict:
    """The requests the rendered Deployment's container makes."""
    for doc in yaml.safe_load_all(bundle.files[YAML_FILE]):
        if doc.get("kind") == "Deployment":
            container = doc["spec"]["template"]["spec"]["containers"][0]
            return (container.get("resources") or {}).get("requests") or {}
    return {}


def check_no_values(bundle: Bundle, values: SecretValues) -> None:
    for name, text in bundle.files.items():
        for value in values.values.values():
            if len(value) >= MIN_VALUE_LENGTH and value in text:
                raise StepFailed("export", f"{name} would hold a .env value; nothing written")


def check_outside_sync(out: Path, source: Path, include: list[str]) -> None:
    """The export must not land in the synced tree: it would travel to the host, and into
    the next export's image."""
    for top in include:
        root = (source / top).resolve()
        if out.resolve() == root or root in out.resolve().parents:
            raise ConfigError(f"--out {out}: inside the synced tree ({top}, "
                              "nightguard.sync.include); choose a directory outside it")


def write_export(out: Path, bundle: Bundle, source: Path, manifest: dict[str, str]) -> None:
    """Write the files and app/ (exactly the manifest's files, with their modes)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is not a directory")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ConfigError(f"--out {out}: not empty and not an earlier export; "
                          "choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    app = out / APP_DIR
    if app.exists():
        shutil.rmtree(app)  # a file gone from the tree must be gone from the image
    for rel in sorted(manifest):
        data = (source / rel).read_bytes()
        mode = (source / rel).stat().st_mode
        if file_entry(data, mode) != manifest[rel]:
            raise StepFailed("export", f"{rel} changed while it was copied; run again")
        target = app / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        os.chmod(target, mode & 0o777)
    for name, text in bundle.files.items():
        (out / name).write_text(text)


@task(help={
    "out": f"directory to write (default {DEFAULT_OUT}; relative to the project root)",
    "image": "the image a cluster pulls, without a tag, e.g. "
             "us-west1-docker.pkg.dev/my-project/nightguard/nightguard (lowercase; default: "
             "nightguard.kube.image; required: a localhost/ name is for a `podman kube play` "
             "rehearsal only)",
    "cpu_request": f"requests.cpu (default {CPU_REQUEST}; the VM reserves no CPU)",
    "target": TARGET_HELP["target"] + "; picks the base image",
}, auto_shortflags=False)
@one_line_errors
def export(c, out=DEFAULT_OUT, image=None, cpu_request=CPU_REQUEST, target=None):
    """Write Kubernetes manifests, a Containerfile with the agent's code, NOTES (no values)."""
    settings = settings_for(c, target)
    values, manifest = preflight(settings)
    image = image or settings["kube.image"]
    if not image:
        raise ConfigError("kube.export needs the image a cluster will pull: --image (e.g. "
                          "us-west1-docker.pkg.dev/my-project/nightguard/nightguard) or "
                          "nightguard.kube.image; nothing written")
    desired = desired_state(settings, {}, manifest)
    out_dir = Path(os.path.expanduser(out))
    out_dir = out_dir if out_dir.is_absolute() else settings.root / out_dir
    source = settings.path("source_dir")
    check_outside_sync(out_dir, source, settings["sync.include"])
    bundle = render(settings, desired, image=image, cpu=cpu_request, out=shown(out_dir),
                    deploy_context=shown(source / "deployment"),
                    needs_network=build_needs_network(settings))
    check_no_values(bundle, values)
    checked = check_schema(bundle.files[YAML_FILE])
    write_export(out_dir, bundle, source, manifest)
    verdict = (f"valid for Kubernetes {KUBERNETES_VERSION}" if checked else
               "not checked against a schema (pip install -e '.[kube]' adds the check)")
    print(f"kube.export: {shown(out_dir)}: {', '.join(bundle.files)}, {APP_DIR}/ "
          f"({len(manifest)} files); no .env value in them; {verdict}")
    if bundle.image.startswith("localhost/"):
        print(f"note: {bundle.image} is on no registry: no cluster can pull it (a `podman "
              "kube play` rehearsal on the VM can); for GKE give --image a registry's name")
    requests = container_resources(bundle)
    for line in autopilot_warnings(requests.get("cpu", "0"), requests.get("memory", "0")):
        print(f"warning: GKE Autopilot: {line}")
    print("build and push:")
    for argv in bundle.commands:
        print(f"  {shlex.join(argv)}")
    print(f"then create the Secret and apply: {shown(out_dir / NOTES_FILE)}")


ns = Collection("kube", export)
