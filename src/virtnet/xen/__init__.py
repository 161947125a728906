"""Xen paravirtual networking, emulated: XenStore, netif rings, grants, netback/netfront.

No hypervisor runs; its services are emulated, but every byte on the XenStore
wire and in the shared rings follows Xen's public headers
(``io/xs_wire.h``, ``io/ring.h``, ``io/netif.h``, ``grant_table.h``).

Modules, bottom up:

``xs_wire``
    sans-I/O ``xsd_sockmsg`` codec (16-byte header, payload <= 4096).
``store``
    XenStore semantics: tree, per-node owner + ACL, watches (fire once at
    once), transactions (``EAGAIN`` on conflict), quotas.  Sans-I/O.
``xenstored``
    the daemon: one Unix socket for dom0, one per guest domain
    (``--domain-socket DOMID=PATH``), optionally the hypervisor service.
``client``
    a synchronous XenStore client (transactions, watches).
``rings``
    ``sring`` header, netif tx/rx/ctrl entries, front/back ring state with the
    ring.h notification hold-off rules and overflow checks.
``grant``, ``evtchn``, ``hyp``
    a domain's memory is one memfd whose first frames are its v1 grant table;
    the backend maps only refs granted to it (read-only honoured); event
    channels are eventfd pairs; ``hyp`` hands fds over ``SCM_RIGHTS``.
``ctrl_ring``
    XEN_NETIF_CTRL_TYPE_* (Toeplitz hash key, flags, mapping table).
``datapath``
    per-queue netback and netfront ring processing.
``xenbus``
    XenbusState, paths, the toolstack's part (``create_vif``).
``netback``, ``netfront``
    the two halves, each a process, Linux's xenbus handshake; one worker
    process per queue.
``demo``, ``cli``
    ``virtnet xen demo|back|front``.

By hand::

    virtnet xenstored --socket /tmp/xs --domain-socket 1=/tmp/xs1 \\
        --hypervisor-socket /tmp/hyp &
    virtnet xen back --xenstore /tmp/xs --hypervisor /tmp/hyp --max-queues 4 --toolstack &
    virtnet xen front --xenstore /tmp/xs1 --hypervisor /tmp/hyp --queues 4 --seconds 3
"""
