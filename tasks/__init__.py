"""The root collection of Night Guard Deploy: every namespace a user types after `inv`.

  tasks/deploy/    the product: deploy, health, logs, secrets, rollback, alerts, single steps
  tasks/sandbox/   the local e2-micro look-alike (QEMU)
  tasks/gcp/       the Compute Engine VM
  tasks/kube/      the same service as Kubernetes manifests (`inv kube.export`)
  tasks/ssh/       SSH and targets: the one connection, host keys, ssh_config, the helper's link
  config, invoke_config, cli, errors, progress, show_config: shared by all of them

The root collection carries every setting's default as Invoke configuration
(``c.config.nightguard``), so Invoke layers its config files and INVOKE_NIGHTGUARD_*
variables over them; tasks read them typed and checked through ``tasks.cli.settings_for``.
"""

import copy

from invoke import Collection

from . import show_config
from .cli import use_flag_scheme
from .config import DEFAULTS
from .deploy import alerts, data, deploy, health, history, manage, secrets, steps
from .deploy import move as vm_move
from .gcp import ssh as gcp_ssh
from .gcp import tasks as vm
from .kube import tasks as kube
from .sandbox import machine as sandbox_machine
from .sandbox import tasks as sandbox
from .ssh import targets

# the low layer (tasks/ssh) imports nothing above it: the targets it cannot address from
# ssh_config alone are wired up here
targets.register("sandbox", sandbox_machine.ssh_target)
targets.register("gcp", gcp_ssh.resolve_target)

vm_move.configure(vm.ns)  # `vm.move` needs the deploy; the vm collection imports none of it
ns = Collection()
ns.configure({"nightguard": copy.deepcopy(DEFAULTS)})
for module_task in (show_config.config, deploy.deploy, deploy.unlock, health.health, health.logs,
                    steps.sync, history.rollback, history.history, manage.exec_, manage.remove):
    ns.add_task(module_task)
for collection in (secrets.ns, alerts.ns, data.ns, steps.host_ns, steps.compose_ns, sandbox.ns,
                   vm.ns, kube.ns):
    ns.add_collection(collection)
use_flag_scheme(ns)  # one set of short flags for every task (tasks.cli.SHORT_FLAGS)
