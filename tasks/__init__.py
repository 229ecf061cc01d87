"""The root collection of Night Guard Deploy: every namespace a user types after `inv`."""

from invoke import Collection

from tasks import deploy, sandbox, settings

ns = Collection()
ns.add_task(settings.config)
ns.add_task(deploy.deploy)
ns.add_task(deploy.unlock)
ns.add_collection(sandbox.ns)
