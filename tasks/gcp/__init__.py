"""Google Compute Engine: the VM the agent runs on in production.

  tasks     `inv vm.*`
  api       clients, one-line errors, operations, the VM's lifecycle (google-cloud-compute)
  snapshots the boot disk's daily snapshot schedule (a resource policy) and its snapshots
  ssh       SSH keys in metadata, the project's key pair, the VM's address with its host
            key pinned
"""
