"""The product: what users type every day (deploy, health, logs, secrets, rollback).

Layers, each importing only those below it:
  deploy · secrets · steps · health · alerts
                                         tasks (siblings; none imports another)
  session                                lock -> work -> record, once, for every changing task
  apply · facts                          change the host one step at a time; read it in one go
  plan                                   pure rules: desired state versus facts
  remote · commands · sync · compose · envfile
                                         the one SSH executor; pure argv builders; the code
                                         tree; the compose file; secret values from .env
  ../contract                            what both sides agree on (paths, constants, op names,
                                         the shape of facts)
What runs on the host is tasks/hostside/ (stdlib only; sent as one bundle per program).
"""
