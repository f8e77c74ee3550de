"""A stack over several hosts, as a lab would run it: network namespaces for hosts.

``HostsLab.start(tmp, workers=["a", "b"])`` builds (tests/netns_support.py) a server host
and one host per worker on a private network that exists only inside the namespaces, then:

- on the server host: PostgreSQL (on its own loopback) and ``sierra-prefect up --host
  <its address> --no-worker``, the server exposed with the stack's own credential;
- the credential copied the way the README tells a user, into a file only its owner can
  read (``sierra-prefect auth-string`` > file, mode 0600);
- on each worker host, one of the README's two ways: ``prefect worker start --pool
  sierra-pool --name worker-<host>`` in a shell that reads the credential from that file
  (``PREFECT_API_AUTH_STRING="$(cat FILE)"``: it is never on a command line) with
  ``PREFECT_API_URL`` and the venv on PATH (``via="prefect"``), or ``sierra-prefect worker
  --api-url URL --auth-string-file FILE`` (``via="sierra-prefect"``); optionally confined
  to CPUs (``taskset``).

Triggers run on the server host (``lab.cli(...)``, the stack's own home). Everything
shares this machine's file system, so batches are at the same paths on every host.
``close()`` stops the workers, brings the stack down, stops PostgreSQL and deletes the
namespaces (which ends anything left in them, by pid).

Used by tests/test_hosts.py and benchmarks/hosts.py.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import CLI, base_env, wait_until
from tests.netns_support import Lab
from tests.postgres_support import PostgresServer, start_postgres

VENV_BIN = Path(sys.executable).parent


@dataclass
class WorkerHost:
    host: str
    name: str
    proc: subprocess.Popen
    log: Path


@dataclass
class HostsLab:
    lab: Lab
    home: Path
    env: dict[str, str]
    api_url: str
    auth_file: Path
    postgres: PostgresServer
    workers: dict[str, WorkerHost] = field(default_factory=dict)
    _started_with: dict[str, tuple] = field(default_factory=dict)  # host -> start_worker args
    _cleanup: ExitStack = field(default_factory=ExitStack)

    @classmethod
    def start(cls, tmp: Path, hosts: list[str]) -> HostsLab:
        cleanup = ExitStack()
        try:
            lab = cleanup.enter_context(Lab.create(["server", *hosts]))
            postgres_gen = start_postgres(netns=lab.hosts["server"])
            postgres = next(postgres_gen)
            cleanup.callback(lambda: next(postgres_gen, None))
            home = tmp / "server-home"
            env = {**base_env(home), "SIERRA_PREFECT_DATABASE_URL": postgres.url}
            cleanup.callback(lambda: lab.run("server", [CLI, "down"], env=env, timeout=120))
            up = lab.run("server", [CLI, "up", "--host", lab.addresses["server"], "--no-worker"],
                         env=env, timeout=400)
            if up.returncode != 0:
                raise RuntimeError(f"up on the server host failed:\n{up.stdout}\n{up.stderr}")
            status = json.loads(lab.run("server", [CLI, "status", "--json"], env=env,
                                        timeout=120).stdout)
            # The user's copy of the credential for the worker hosts: only they can read it.
            auth_file = tmp / "lab-prefect-auth"
            fd = os.open(auth_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                printed = lab.run("server", [CLI, "auth-string"], env=env, timeout=60)
                handle.write(printed.stdout.strip() + "\n")
            hosts_lab = cls(lab, home, env, status["api_url"], auth_file, postgres,
                            _cleanup=cleanup)
        except BaseException:
            cleanup.close()
            raise
        return hosts_lab

    def cli(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        """``sierra-prefect ARGS`` on the server host, as the stack's owner."""
        return self.lab.run("server", [CLI, *args], env=self.env, timeout=timeout)

    def cli_popen(self, *args: str, **kw) -> subprocess.Popen:
        return self.lab.popen("server", [CLI, *args], env=self.env, text=True, **kw)

    def start_worker(self, host: str, cpus: str | None = None, via: str = "prefect",
                     **env: str) -> WorkerHost:
        """A worker on ``host``, started one of the README's ways (see the module's doc)."""
        self._started_with[host] = (cpus, via, env)
        home = self.home.parent / f"host-{host}"
        home.mkdir(exist_ok=True)
        name = f"worker-{host}"
        worker_env = {
            "PATH": f"{VENV_BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_API_URL": self.api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            **env,
        }
        auth = shlex.quote(str(self.auth_file))
        taskset = f"taskset -c {shlex.quote(cpus)} " if cpus is not None else ""
        if via == "prefect":
            start = f"prefect worker start --pool sierra-pool --name {shlex.quote(name)}"
            script = f'PREFECT_API_AUTH_STRING="$(cat {auth})" exec {taskset}{start}'
        else:
            query = worker_env.pop("PREFECT_WORKER_QUERY_SECONDS", "2")
            script = (f"exec {taskset}sierra-prefect worker --api-url {shlex.quote(self.api_url)} "
                      f"--auth-string-file {auth} --name {shlex.quote(name)} "
                      f"--query-seconds {shlex.quote(query)}")
            worker_env.pop("PREFECT_API_URL")
        log = home / "worker.log"
        with open(log, "ab") as out:
            proc = self.lab.popen(host, ["bash", "-c", script], cwd=home, env=worker_env,
                                  stdout=out, stderr=subprocess.STDOUT)
        worker = WorkerHost(host, name, proc, log)
        self.workers[host] = worker
        wait_until(lambda: self.online(name) or proc.poll() is not None, 240, f"{name} online",
                   interval=0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        return worker

    def online(self, name: str) -> bool:
        result = self.cli("status", "--json", timeout=120)
        try:
            pools = json.loads(result.stdout)["pools"]
        except (ValueError, KeyError):
            return False
        return name in pools.get("sierra-pool", {}).get("workers_online", [])

    def lose(self, host: str) -> list[int]:
        """``host`` disappears: its link goes down and every process on it is killed."""
        self.lab.link_down(host)
        killed = self.lab.kill_all(host)
        worker = self.workers.pop(host, None)
        if worker is not None:
            worker.proc.wait(timeout=30)
        return killed

    def revive(self, host: str) -> WorkerHost:
        """A lost ``host`` back on the network, with a worker started as before."""
        self.lab.link_up(host)
        cpus, via, env = self._started_with[host]
        return self.start_worker(host, cpus=cpus, via=via, **env)

    def stop_worker(self, host: str) -> None:
        """Stop the worker on ``host`` and everything it started (the host's processes)."""
        worker = self.workers.pop(host, None)
        if worker is not None:
            self.lab.kill_all(host)
            worker.proc.wait(timeout=30)

    def close(self) -> None:
        for host in list(self.workers):
            self.stop_worker(host)
        self._cleanup.close()
