"""Test hosts on a network: Linux network namespaces joined by a bridge.

A ``Lab`` is a "switch" namespace holding a bridge, and one namespace per host, each
linked to the bridge by a veth pair whose host end is ``eth0`` with an address in a
private /24 that exists only inside these namespaces (nothing is routed to or from the
machine's own network; the root namespace gets no address). Processes run on a host
through ``ip netns exec``; they share the machine's file system (so a batch is at the
same paths everywhere, as on a cluster with a shared file system) but not its network:
each host has its own loopback.

Names carry a random id, so parallel test sessions and pytest workers never clash.
``Lab.close()`` kills what still runs in its namespaces (by pid: ``ip netns pids``; only
processes the tests started can be there) and deletes the namespaces, which removes the
veth pairs with them.

Use::

    with Lab.create(["server", "a", "b"]) as lab:
        lab.run("server", ["ip", "addr"])
        proc = lab.popen("a", ["prefect", "worker", "start", ...], env=...)
        lab.link_down("a")         # the host disappears from the network
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

import psutil


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None if they can)."""
    if shutil.which("ip") is None:
        return "the `ip` command is missing (apt-get install iproute2, or scripts/setup.sh --test)"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add): run the tests as root"
    probe = f"spprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


@dataclass
class Lab:
    tag: str  # the random id in every name
    subnet: str  # "10.X.Y"
    hosts: dict[str, str] = field(default_factory=dict)  # host -> namespace
    addresses: dict[str, str] = field(default_factory=dict)  # host -> its address

    @property
    def switch(self) -> str:
        return f"sp{self.tag}-sw"

    @classmethod
    def create(cls, names: list[str]) -> Lab:
        tag = secrets.token_hex(3)
        # 10.x.y.0/24 only inside these namespaces: two labs with the same subnet are two
        # separate switches, so a clash is harmless; random keeps logs readable anyway.
        lab = cls(tag, f"10.{secrets.randbelow(200) + 50}.{secrets.randbelow(250) + 1}")
        try:
            _ip("netns", "add", lab.switch)
            _ip("-n", lab.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", lab.switch, "link", "set", "br0", "up")
            for number, name in enumerate(names, start=1):
                lab._add_host(name, number)
        except BaseException:
            lab.close()
            raise
        return lab

    def _add_host(self, name: str, number: int) -> None:
        ns = f"sp{self.tag}-{name}"
        self.hosts[name] = ns
        _ip("netns", "add", ns)
        host_end, switch_end = f"sp{self.tag}h{number}", f"sp{self.tag}s{number}"  # <= 15 chars
        _ip("link", "add", host_end, "type", "veth", "peer", "name", switch_end)
        _ip("link", "set", host_end, "netns", ns)
        _ip("link", "set", switch_end, "netns", self.switch)
        _ip("-n", ns, "link", "set", host_end, "name", "eth0")
        address = f"{self.subnet}.{number}"
        self.addresses[name] = address
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", self.switch, "link", "set", switch_end, "master", "br0")
        _ip("-n", self.switch, "link", "set", switch_end, "up")

    def argv(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host], *argv]

    def run(self, host: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(host, argv), **kw)

    def popen(self, host: str, argv: list[str], **kw) -> subprocess.Popen:
        """A process on ``host`` (``ip netns exec`` execs it: the pid is the program's)."""
        return subprocess.Popen(self.argv(host, argv), **kw)

    def link_down(self, host: str) -> None:
        """The host drops off the network: its link goes down on the switch's side too."""
        _ip("-n", self.hosts[host], "link", "set", "eth0", "down")

    def link_up(self, host: str) -> None:
        _ip("-n", self.hosts[host], "link", "set", "eth0", "up")

    def pids(self, host: str) -> list[int]:
        result = subprocess.run(["ip", "netns", "pids", self.hosts[host]], capture_output=True,
                                text=True)
        return [int(p) for p in result.stdout.split()]

    def kill_all(self, host: str) -> list[int]:
        """SIGKILL every process on ``host`` (all started by the tests in this namespace),
        by pid; wait until they are gone."""
        procs = []
        for pid in self.pids(host):
            try:
                proc = psutil.Process(pid)
                proc.send_signal(signal.SIGKILL)
                procs.append(proc)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        return [p.pid for p in procs]

    def close(self) -> None:
        for host in list(self.hosts):
            self.kill_all(host)
            subprocess.run(["ip", "netns", "del", self.hosts[host]], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)
        self.hosts.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
