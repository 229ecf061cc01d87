"""The product: what users type every day (deploy, health, logs, secrets, rollback).

Layers, each importing only those below it:
  deploy · steps · history · secrets · health · alerts · manage
                                         tasks (siblings; none imports another)
  pipeline                               the deploy: preflight -> facts -> plan -> apply ->
                                         restart -> gate, shared by deploy and compose.up
  session                                lock -> work -> record, once, for every changing task
  apply                                  change the host one step at a time
  plan                                   pure rules: desired state versus facts
  commands · sync · compose · envfile · secretstore
                                         pure argv builders; the code tree; the compose
                                         file; secret values from their sources
  tasks/ssh (below them all)             the one SSH connection and the helper's link
  ../contract                            what both sides agree on (paths, constants, op names,
                                         the shape of facts)
What runs on the host is tasks/hostside/ (stdlib only; sent as one bundle per program).
"""
