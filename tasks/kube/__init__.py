"""Beyond one VM: the same service as Kubernetes manifests, from the settings `inv deploy` uses.

  tasks     `inv kube.export`: writes the manifests, a Containerfile with the agent's code
            inside, and NOTES.md (what does not map); prints the build and push commands
  render    pure: settings and the deploy's desired state in, file texts out
"""
