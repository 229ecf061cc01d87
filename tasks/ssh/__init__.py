"""SSH and targets: the low layer every task reaches a host through.

  targets      the configured target -> an SSH address; the task layer registers the
               resolvers of the sandbox and the GCP VM (tasks/__init__.py)
  sshconfig    a host the user names, as their ssh_config describes it
  address      SshTarget: where and how to log in
  hostkeys     host-key pinning: what a connection accepts; the pin and unpin commands
  remote       the one SSH connection per run: connect, log in, steps, the pipe
  hostlink     the link to the host helper over that pipe (the bootstrap, framing)

Imports only tasks.config, tasks.errors and tasks.progress: nothing of deploy, sandbox,
gcp or kube (tests/unit/test_architecture.py checks it).
"""
