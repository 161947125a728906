"""virtnet: a multiqueue paravirtual network device (virtio-net MQ over vhost-user, Xen netif).

The package is layered; only the outer layers (``ports``, ``vhost_user`` servers
and workers, ``xen`` daemons, ``cli``) touch sockets, file descriptors,
processes or time.  Everything below is sans-I/O.
"""

__version__ = "0.1.0"
