"""Engines: how a VM runs on a host - qemu processes on this machine, or libvirt domains on one or
more hosts - and everything that depends on it: starting a VM warm or cold, telling when it is
ready, stopping it, snapshots, its console, sweeping strays.

The rule of this folder: only engines know qemu and libvirt. Its modules import only
``pytest_ttenv.core``, ``pytest_ttenv.errors``, ``pytest_ttenv.quiet`` and each other - never
``backend.local`` (which calls them through ``base.Engine``, chosen by ``registry.Engines``), nor
the image store (``backend.images``): an image is handed to them as ``ImageInfo`` with its paths.

- ``base``: the ``Engine`` protocol, the ``Start`` job, the ``Boot`` decision, shared small types;
  ``registry``: the engines of one backend, by name;
- ``qemu`` (qemu itself: argv, processes, QMP), ``qemu_engine`` (the qemu engine), ``qemu_warm``
  (its warm starts); ``warm`` (templates: keys, making one), ``templates`` (their store),
  ``identity`` (the guest identity agent's channel), ``statecat`` (a saved state streamed into qemu,
  verified), ``deferred`` (VMs started once what they wait for is made);
- ``libvirt`` (the libvirt engine), ``libvirt_place`` (its hosts, placement), ``libvirt_xml`` (its
  XML, libvirt's save-image header), ``libvirt_upload`` (files copied once to a host, verified),
  ``libvirt_warm`` (its warm starts), ``virt`` (the only importer of libvirt-python);
- shared: ``accel`` (KVM or TCG, boot timeouts), ``seed`` (host keys and the NoCloud seed ISO),
  ``console`` (console tails safe to print, capped logs), ``net`` (host ports, the SSH banner probe).
"""
