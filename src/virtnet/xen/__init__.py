"""Xen paravirtual networking, emulated: XenStore, netif rings, grants, netback/netfront.

Submodules: ``xs_wire`` (codec), ``store`` (XenStore semantics), ``xenstored``
(daemon), ``client`` (a XenStore client), ``rings`` (netif.h/ring.h layouts),
``grant``/``evtchn`` (hypervisor emulation), ``ctrl_ring``, ``netback``,
``netfront``, ``demo``.
"""
