"""The root collection of Night Guard Deploy: every namespace a user types after `inv`."""

from invoke import Collection

from tasks import settings

ns = Collection()
ns.add_task(settings.config)
