"""Test guests started by libvirt, the way users run VMs: a private ``libvirtd``
and a :class:`Guest` whose QEMU libvirt launches from domain XML.

:class:`Libvirtd` runs its own ``libvirtd`` (root, system driver) in a private
mount namespace: its ``qemu.conf`` is bind-mounted over ``/etc/libvirt/qemu.conf``
and its state directories (``/run/libvirt``, ``/var/lib/libvirt``,
``/var/log/libvirt``, ``/var/cache/libvirt``) are fresh tmpfs mounts, so nothing
of the host's libvirt (if any) is read or changed, and everything goes when it
exits.  Its socket lives in its own temporary directory; :attr:`Libvirtd.uri`
names it.  QEMU runs as root without cgroups, namespaces or a security driver:
this is a test bed, not a deployment recipe.

:class:`LibvirtGuest` is the same busybox guest and agent as :class:`Guest`,
but ``virsh create`` starts it from a transient domain whose devices are the
console and agent serial ports plus ``devices_xml`` (e.g. a ``vhostuser``
interface), with ``memory_backing_xml`` for the shared guest memory a
vhost-user backend maps.  With ``migrate_from`` it arrives instead by
``virsh migrate --live`` from another daemon: each :class:`Libvirtd` has its own
host UUID, so two of them are two hosts to libvirt.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from xml.sax.saxutils import escape, quoteattr

from virtnet.testing.guest import Guest, GuestError, find_kernel, qemu_binary, wait_for
from virtnet.testing.netns import die_with_parent
from virtnet.testing.procs import stop_process

#: ``qemu.conf`` of the private daemon (see the module docstring).
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""


def qemu_conf(user: str | None = None) -> str:
    """:data:`QEMU_CONF`, or with QEMU run as ``user`` (and a group of that
    name) and libvirt giving it the files it needs (``dynamic_ownership``)."""
    if user is None:
        return QEMU_CONF
    return (
        QEMU_CONF.replace('user = "root"', f"user = {json.dumps(user)}")
        .replace('group = "root"', f"group = {json.dumps(user)}")
        .replace("dynamic_ownership = 0", "dynamic_ownership = 1")
    )


#: State directories libvirtd (and the QEMU it starts) write; tmpfs in its namespace.
STATE_DIRS = ("/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt")

#: How long libvirtd may take to put up its socket.
START_TIMEOUT = 30.0

#: libvirt's default memory backing for a vhost-user guest, as the README gives it.
SHARED_MEMORY_XML = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"


class LibvirtError(Exception):
    """libvirtd did not start, or a ``virsh`` call failed."""


def skip_reason() -> str | None:
    """Why libvirt guests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (a private libvirtd with the system driver)"
    for tool in ("libvirtd", "virsh", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (libvirt-daemon-driver-qemu, libvirt-clients)"
    if not Path("/etc/libvirt/qemu.conf").exists():
        return "/etc/libvirt/qemu.conf missing (libvirt-daemon-driver-qemu not installed)"
    return None


def _start_script(conf: Path, daemon_conf: Path, pid_file: Path) -> str:
    mounts = "\n".join(f"mkdir -p {d} && mount -t tmpfs tmpfs {d}" for d in STATE_DIRS)
    return (
        "set -e\n"
        f"mount --bind {conf} /etc/libvirt/qemu.conf\n"
        f"{mounts}\n"
        f"exec libvirtd --config {daemon_conf} --pid-file {pid_file}\n"
    )


class Libvirtd:
    """A private libvirtd for the lifetime of the context (see the module docstring)."""

    def __init__(self, *, qemu_user: str | None = None) -> None:
        """``qemu_user``: run QEMU as this user and its group, with libvirt's
        dynamic ownership, as a distribution's libvirt does (Debian:
        ``libvirt-qemu``); default root (see the module docstring)."""
        self.qemu_user = qemu_user
        self.workdir = Path(tempfile.mkdtemp(prefix="vnlibvirt-"))
        self.sock_dir = self.workdir / "sock"
        self.log = self.workdir / "libvirtd.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """Connection URI of this daemon."""
        return f"qemu:///system?socket={self.sock_dir / 'libvirt-sock'}"

    def __enter__(self) -> Libvirtd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the daemon; wait until ``virsh`` reaches it."""
        self.sock_dir.mkdir()
        conf = self.workdir / "qemu.conf"
        conf.write_text(qemu_conf(self.qemu_user))
        daemon_conf = self.workdir / "libvirtd.conf"
        daemon_conf.write_text(
            f'unix_sock_dir = "{self.sock_dir}"\n'
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            # Its own host identity: two test daemons are two hosts to each
            # other, so libvirt migrates between them.
            f'host_uuid = "{uuid.uuid4()}"\n'
            f'log_outputs = "3:file:{self.log}"\n'
        )
        script = _start_script(conf, daemon_conf, self.workdir / "libvirtd.pid")
        with open(self.workdir / "stdout.log", "wb") as out:
            self._proc = subprocess.Popen(
                die_with_parent(
                    ["unshare", "--mount", "--propagation=private", "sh", "-c", script]
                ),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self._proc
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise LibvirtError(f"libvirtd exited ({proc.returncode}):\n{self.output()}")
            if (self.sock_dir / "libvirt-sock").exists():
                try:
                    self.virsh("version")
                    return
                except LibvirtError:
                    pass
            if time.monotonic() > deadline:
                self.close()
                why = f"libvirtd did not answer in {START_TIMEOUT:.0f} s"
                raise LibvirtError(f"{why}:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        """The tail of the daemon's output and log."""
        text = ""
        for f in (self.workdir / "stdout.log", self.log):
            with contextlib.suppress(OSError):
                text += f.read_text(errors="replace")[-3000:]
        return text

    def virsh(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``virsh -c URI ARGS``; its stdout, or :class:`LibvirtError`."""
        r = subprocess.run(
            ["virsh", "-c", self.uri, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if r.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def state_path(self, path: str) -> Path:
        """``path`` as the daemon sees it (its private tmpfs mounts)."""
        if self._proc is None:
            raise LibvirtError("libvirtd not running")
        return Path(f"/proc/{self._proc.pid}/root") / path.lstrip("/")

    def close(self) -> None:
        """Destroy every running domain, stop the daemon, remove its files."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    for name in self.virsh("list", "--name").split():
                        self.virsh("destroy", name)
                except (LibvirtError, subprocess.TimeoutExpired):
                    pass
            stop_process(proc, timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class LibvirtGuest(Guest):
    """A :class:`Guest` that ``libvirtd`` starts from a transient domain.

    ``devices_xml`` is put into the domain's ``<devices>`` as given;
    ``memory_backing_xml`` (default: shared memfd, as vhost-user needs) goes
    at the top of the domain.  ``netdev_args``, ``extra_args``, ``env`` and
    ``cpu`` of :class:`Guest` do not apply; :meth:`qmp` goes through libvirt
    (``virsh qemu-monitor-command``), which owns QEMU's monitor.
    """

    libvirtd: Libvirtd | None = None
    devices_xml: str = ""
    memory_backing_xml: str = SHARED_MEMORY_XML
    name: str = field(default_factory=lambda: f"virtnet-{os.getpid()}-{time.monotonic_ns()}")
    #: Arrive by ``virsh migrate --live`` of this running guest (from its
    #: daemon to ours) instead of booting; also set ``incoming`` (any text) so
    #: that :meth:`start` does not wait for a boot.  The destination's XML is
    #: the source's ``virsh dumpxml --migratable`` (same UUID, MAC, devices)
    #: with this guest's console and agent paths and ``migrate_replace``
    #: applied, as a user edits it for ``virsh migrate --xml``.
    #: :meth:`migration_result` waits for virsh.
    migrate_from: LibvirtGuest | None = None
    migrate_replace: Mapping[str, str] = field(default_factory=dict)
    _domain_up: bool = field(default=False, init=False, repr=False)
    _migration: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def _daemon(self) -> Libvirtd:
        if self.libvirtd is None:
            raise GuestError("LibvirtGuest needs a running Libvirtd")
        return self.libvirtd

    def domain_xml(self) -> str:
        """The transient domain: TCG, direct kernel boot, console and agent
        serials; ACPI on, as virt-install sets it (PCI hotplug needs it)."""
        kernel = self.kernel if self.kernel is not None else find_kernel()[0]
        assert self.initramfs is not None
        return f"""<domain type='qemu'>
  <name>{escape(self.name)}</name>
  <memory unit='MiB'>{self.memory_mb}</memory>
  <vcpu>{self.smp}</vcpu>
  {self.memory_backing_xml}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(self.initramfs))}</initrd>
    <cmdline>{escape(self.kernel_cmdline())}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(qemu_binary())}</emulator>
    <serial type='file'><source path={quoteattr(str(self.console_log))}/><target port='0'/></serial>
    <serial type='unix'>
      <source mode='connect' path={quoteattr(str(self.agent_socket))}/><target port='1'/>
    </serial>
    {self.devices_xml}
    <memballoon model='none'/>
  </devices>
</domain>
"""

    def _share_files(self) -> None:
        """QEMU not running as root must reach its console and agent socket
        (libvirt gives it the files, not the way to them) and read the
        initramfs, which may sit in root's home: open the work directory and
        put a copy of the initramfs there."""
        os.chmod(self.workdir, 0o755)
        assert self.initramfs is not None
        copy = self.workdir / self.initramfs.name
        if self.initramfs != copy:
            shutil.copyfile(self.initramfs, copy)
            self.initramfs = copy

    def _launch(self) -> None:
        xml = self.workdir / "domain.xml"
        src = self.migrate_from
        if src is None:
            if self._daemon().qemu_user is not None:
                self._share_files()
            xml.write_text(self.domain_xml())
            self._daemon().virsh("create", str(xml))
            self._domain_up = True
            return
        # The domain moves under its name; its XML gets this guest's console
        # and agent socket (and the caller's replacements) on the destination.
        self.name = src.name
        text = src._daemon().virsh("dumpxml", "--migratable", src.name)
        swaps = {
            str(src.console_log): str(self.console_log),
            str(src.agent_socket): str(self.agent_socket),
            **self.migrate_replace,
        }
        for old, new in swaps.items():
            if old not in text:
                raise GuestError(f"the source's domain XML has no {old!r} to replace")
            text = text.replace(old, new)
        xml.write_text(text)
        argv = ["virsh", "-c", src._daemon().uri, "migrate", "--live", self.name,
                self._daemon().uri.replace("qemu://", "qemu+unix://"),
                "--migrateuri", "tcp://127.0.0.1", "--xml", str(xml)]  # fmt: skip
        with open(self.workdir / "migrate.log", "wb") as out:
            self._migration = subprocess.Popen(
                die_with_parent(argv), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self._domain_up = True

    def migration_result(self, timeout: float = 120.0) -> None:
        """Wait for ``virsh migrate``; raises :class:`LibvirtError` if it failed."""
        proc = self._migration
        if proc is None:
            raise GuestError("this guest did not arrive by migration")
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = -1
        if rc != 0:
            out = (self.workdir / "migrate.log").read_text(errors="replace")
            raise LibvirtError(f"virsh migrate failed ({rc}):\n{out}")

    def _launched(self) -> bool:
        return self._domain_up

    def _stop(self) -> None:
        if not self._domain_up:
            return
        self._domain_up = False
        daemon = self._daemon()
        try:
            daemon.virsh("destroy", self.name)
        except LibvirtError:
            if self._domain_state() not in ("", "shut off"):
                raise
        wait_for(lambda: self._domain_state() in ("", "shut off"), timeout=10)

    def _domain_state(self) -> str:
        try:
            return self._daemon().virsh("domstate", self.name).strip()
        except LibvirtError:
            return ""

    def _exit_status(self) -> str:
        return f"domain {self._domain_state() or 'gone'}"

    @property
    def running(self) -> bool:
        if not self._domain_up:
            return False
        if self._migration is not None and self._migration.poll() is None:
            return True  # still arriving (paused on this side until it ends)
        return self._domain_state() == "running"

    @property
    def qemu_pid(self) -> int | None:
        if not self.running:
            return None
        pid_file = self._daemon().state_path(f"/run/libvirt/qemu/{self.name}.pid")
        try:
            return int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _qemu_output(self) -> str:
        if self.libvirtd is None:
            return ""
        log = self.libvirtd.state_path(f"/var/log/libvirt/qemu/{self.name}.log")
        try:
            return log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def qmp(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float = 10.0
    ) -> object:
        msg: dict[str, object] = {"execute": command}
        if arguments:
            msg["arguments"] = dict(arguments)
        try:
            out = self._daemon().virsh(
                "qemu-monitor-command", self.name, json.dumps(msg), timeout=timeout
            )
        except LibvirtError as exc:
            raise GuestError(f"QMP {command}: {exc}") from exc
        reply = json.loads(out)
        if not isinstance(reply, dict) or "error" in reply:
            raise GuestError(f"QMP {command}: {reply}")
        return reply.get("return")
