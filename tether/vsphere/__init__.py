"""`tether vsphere`: run container VMs on vSphere through its API, playing VIC's port layer.

Host-side only, and the only part of the project that uses pyVmomi (the `vsphere` extra):
the agent never imports this package.

    connection.py   the URL, login, lookups, tasks, datastore file transfer
    guestinfo.py    a VM's extraConfig as the host reads and writes guestinfo
    spec.py         the VM's ConfigSpec: CD-ROM, serial ports, NICs, containerfs disk, keys
    containers.py   run, ps, logs, stop, rm: the operations on container VMs
    cli.py          the `tether vsphere` command
"""
