"""The local sandbox VM: an e2-micro look-alike under QEMU, the default deploy target.

  tasks     `inv sandbox.*`
  machine   boot, stop, reboot, address (the API the tasks, the deploy and the tests use)
  qemu      the QEMU process behind one sandbox
  image     the cached disk image, built offline from Debian's packages
  support   what this machine lacks to boot or build a sandbox, as one line
  guest/    files copied into the guest's root filesystem
"""
