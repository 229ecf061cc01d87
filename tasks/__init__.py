"""The root collection of Night Guard Deploy: every namespace a user types after `inv`."""

from invoke import Collection

from tasks import deploy, health, sandbox, secrets, settings, steps, vm

ns = Collection()
for module_task in (settings.config, deploy.deploy, deploy.unlock, health.health, health.logs,
                    steps.sync, steps.rollback):
    ns.add_task(module_task)
for collection in (secrets.ns, steps.host_ns, steps.compose_ns, sandbox.ns, vm.ns):
    ns.add_collection(collection)
