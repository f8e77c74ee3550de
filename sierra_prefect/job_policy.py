"""What a flow run may change about how our workers run it: an allow-list of job variables.

A pool's job variables (``workpools/*.yaml``, applied by ``sierra-prefect pools apply``) are
the trusted defaults. Whatever a deployment or a flow run sets on top of them is an
*override*, and only these overrides pass (anything else: the flow run is refused):

================  ===========================  ===============================================
pool type         job variable                 allowed when
================  ===========================  ===============================================
sierra-process    (none)                       the command, env and working directory are the
                                               pool's: a flow run cannot change what runs
sierra-docker     ``image``                    it is the pool's image or matches a pattern of
                                               ``SIERRA_PREFECT_ALLOWED_IMAGES`` (``fnmatch``,
                                               comma-separated), e.g. ``my-lab/*``
sierra-docker     ``volumes``                  each ``SRC:DST[:ro|rw]`` (absolute paths, no
                                               ``:`` in them) has an existing SRC that resolves
                                               (``..``, symlinks) inside the mount roots below
sierra-docker     ``container_create_kwargs``  it holds only ``user`` (what ``--host-user``
                                               sets), a numeric ``UID[:GID]``: the worker's own
                                               uid and one of its groups; any, if the worker
                                               runs as root (it could be anyone anyway)
================  ===========================  ===============================================

Mount roots: ``SIERRA_PREFECT_ALLOWED_ROOTS`` (``:``-separated) in the *worker's* environment
when set; then the flow run's ``input_root``, ``scratch_root`` and ``workdir`` must resolve
inside them too, on both pool types. When it is not set, a flow run may mount only its own
batch and the worker user's home directory: its input root if it holds ``commands.txt``, its
scratch root if it holds ``sierra-prefect/`` (``sierra-prefect run`` makes it before
triggering). The batch is what a Docker flow run needs; the home holds what the same
credential could reach through the process pool anyway (e.g. a SIERRA root); and a root
named by the flow run counts only when it looks like a batch, so ``--scratch-root /`` cannot
make ``/`` mountable. Mounting anything else (``/data``) needs ``SIERRA_PREFECT_ALLOWED_ROOTS``.

The pool's environment does not count: anyone who may change the pool could change its
command too; the worker's environment is the operator's.

Use (what ``sierra_prefect/worker_types.py`` does for every flow run, before starting it)::

    policy = JobPolicy.from_environment()
    overrides = job_overrides(deployment.job_variables, flow_run.job_variables)
    refusal = policy.check("docker", pool_defaults(pool.base_job_template), overrides,
                           flow_run.parameters)      # None, or one line: what and the fix

No Prefect import here: the rules are plain data and paths, tested without a server.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pwd
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from flows.plan import ALLOWED_ROOTS_ENV, COMMANDS_FILE, STATE_DIR, BatchInputError, check_allowed

ALLOWED_IMAGES_ENV = "SIERRA_PREFECT_ALLOWED_IMAGES"
# The flow's parameters that name host paths (flows/sierra_batch.py).
ROOT_PARAMETERS = ("input_root", "scratch_root", "workdir")
_USER = re.compile(r"^(\d+)(?::(\d+))?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Kind = Literal["process", "docker"]


class Refused(Exception):
    """A job variable the policy does not allow; the message is the one line users see."""


def one_line(text: str) -> str:
    """``text`` with control characters escaped: flow-run input may hold newlines."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _show(value: Any, limit: int = 240) -> str:
    """A value as one short line, quoted (flow-run input may be huge)."""
    text = one_line(value if isinstance(value, str) else json.dumps(value, default=str))
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _nested(key: str, value: Any) -> dict:
    """``{"env.FOO": 1}`` as Prefect's templating reads it: ``{"env": {"FOO": 1}}``."""
    head, _, rest = key.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(into.get(key), dict) and isinstance(value, dict):
            _merge(into[key], value)
        else:
            into[key] = value


def job_overrides(deployment_vars: dict | None, flow_run_vars: dict | None) -> dict[str, Any]:
    """The job variables a flow run runs with beyond its pool's, merged the way Prefect's
    workers merge them (``BaseJobConfiguration.resolve_for_flow_run``: the flow run's
    ``env`` key by key over the deployment's, everything else replaced; then
    ``from_template_and_values``: dotted keys such as ``env.FOO`` nested, plain keys last)."""
    merged = json.loads(json.dumps(deployment_vars or {}, default=str))
    run = json.loads(json.dumps(flow_run_vars or {}, default=str))
    if isinstance(merged.get("env"), dict) and isinstance(run.get("env"), dict):
        merged["env"].update(run.pop("env"))
    merged.update(run)
    result: dict[str, Any] = {}
    for key, value in merged.items():
        if "." in key:
            _merge(result, _nested(key, value))
    for key, value in merged.items():
        if "." not in key:
            if isinstance(result.get(key), dict) and isinstance(value, dict):
                _merge(result[key], value)  # as Prefect: the nested form wins
            else:
                result[key] = value
    return result


def pool_defaults(base_job_template: dict) -> dict[str, Any]:
    """The defaults of a pool's job variables (``variables.properties.*.default``)."""
    properties = (base_job_template or {}).get("variables", {}).get("properties", {})
    return {name: spec["default"] for name, spec in properties.items()
            if isinstance(spec, dict) and spec.get("default") is not None}


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == [] or value == ""


def _changed(key: str, value: Any, default: Any) -> bool:
    """Does ``value`` change what the pool's ``default`` gives? ``env`` is merged over the
    pool's (a key equal to the pool's changes nothing); every other variable replaces it."""
    if _empty(value) and _empty(default):
        return False
    if key == "env" and isinstance(value, dict) and isinstance(default, dict):
        return any(name not in default or default[name] != v for name, v in value.items())
    return value != default


class JobPolicy(BaseModel):
    """The allow-list in force on one worker (see the module docstring)."""

    allowed_roots: list[Path] | None = None
    allowed_images: list[str] = []
    uid: int
    gids: list[int]
    home: Path | None = None

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> JobPolicy:
        """The policy of the worker process reading it: its environment, uid and home."""
        environ = os.environ if environ is None else environ
        roots = [r for r in environ.get(ALLOWED_ROOTS_ENV, "").split(os.pathsep) if r]
        images = [p.strip() for p in environ.get(ALLOWED_IMAGES_ENV, "").split(",") if p.strip()]
        try:  # the account's home, not $HOME: what the worker's user owns
            home = Path(os.path.realpath(pwd.getpwuid(os.getuid()).pw_dir))
        except KeyError:
            home = None
        return cls(allowed_roots=[Path(os.path.realpath(r)) for r in roots] or None,
                   allowed_images=images, uid=os.getuid(),
                   gids=sorted({os.getgid(), *os.getgroups()}), home=home)

    # -- the check --------------------------------------------------------------------

    def check(self, kind: Kind, defaults: dict[str, Any], overrides: dict[str, Any],
              parameters: dict[str, Any] | None = None) -> str | None:
        """None if the flow run may run as asked, else one line: what is refused and the fix."""
        parameters = parameters or {}
        try:
            self._check_parameters(parameters)
            rules = self._rules(kind)
            for key, value in overrides.items():
                default = defaults.get(key)
                if not _changed(key, value, default):
                    continue
                rule = rules.get(key)
                if rule is None:
                    raise Refused(self._not_allowed(kind, key, value, default))
                rule(value, default, parameters)
        except Refused as exc:
            return one_line(str(exc))
        return None

    def _rules(self, kind: Kind) -> dict[str, Callable[[Any, Any, dict], None]]:
        if kind == "process":
            return {}
        return {"image": self._image, "volumes": self._volumes,
                "container_create_kwargs": self._create_kwargs}

    @staticmethod
    def _not_allowed(kind: Kind, key: str, value: Any, default: Any) -> str:
        if key == "env" and isinstance(value, dict):
            names = [n for n, v in value.items() if not isinstance(default, dict) or default.get(n) != v]
            key = f"env.{names[0]}" if names else key
        allowed = ("it allows none: what runs is the pool's" if kind == "process"
                   else "only image, volumes and container_create_kwargs.user")
        return (f"job variable {_show(key)} may not be set by a flow run or deployment on a "
                f"sierra-{kind} pool ({allowed}): drop it, or change the pool itself "
                "(workpools/, then `sierra-prefect pools apply`)")

    def _check_parameters(self, parameters: dict[str, Any]) -> None:
        """With allowed roots: the flow run's roots resolve inside them (the flow checks
        again; this refuses before anything starts, and before a container mounts them)."""
        if not self.allowed_roots:
            return
        named = {name: parameters[name] for name in ROOT_PARAMETERS if parameters.get(name) is not None}
        for name, value in named.items():
            if not isinstance(value, str):
                raise Refused(f"parameter {name} {_show(value)} is not a path: pass an absolute directory")
        try:
            check_allowed(named, os.pathsep.join(map(str, self.allowed_roots)))
        except BatchInputError as exc:
            raise Refused(str(exc)) from None

    # -- sierra-docker: image, volumes, user ---------------------------------------------

    def _image(self, value: Any, default: Any, parameters: dict) -> None:
        patterns = [p for p in (default, *self.allowed_images) if isinstance(p, str)]
        if isinstance(value, str) and any(fnmatch.fnmatchcase(_tagged(value), _tagged(p))
                                          for p in patterns):
            return
        raise Refused(
            f"image {_show(value)} is not allowed on this pool (allowed: "
            f"{', '.join(patterns) or 'none'}): add it to {ALLOWED_IMAGES_ENV} in the worker's "
            "environment (comma-separated patterns, e.g. my-lab/*)")

    def _volumes(self, value: Any, default: Any, parameters: dict) -> None:
        if not isinstance(value, list):
            raise Refused(f"volumes {_show(value)} is not a list of SRC:DST[:ro|rw]: fix the mounts")
        ours = default if isinstance(default, list) else []
        roots = self._mount_roots(parameters)
        for volume in value:
            if volume not in ours:
                self._volume(volume, roots)

    def _mount_roots(self, parameters: dict) -> list[Path]:
        if self.allowed_roots:
            return list(self.allowed_roots)
        roots = [self.home] if self.home else []
        for name, holds in (("input_root", COMMANDS_FILE), ("scratch_root", STATE_DIR)):
            value = parameters.get(name)
            if isinstance(value, str) and os.path.isabs(value) and os.path.exists(os.path.join(value, holds)):
                roots.append(Path(os.path.realpath(value)))
        # A root that resolves to / would allow everything: never by default.
        return [r for r in roots if r != Path("/")]

    def _volume(self, volume: Any, roots: list[Path]) -> None:
        parts = volume.split(":") if isinstance(volume, str) else []
        if (len(parts) not in (2, 3) or not all(os.path.isabs(p) for p in parts[:2])
                or (len(parts) == 3 and parts[2] not in ("ro", "rw"))):
            raise Refused(f"volume {_show(volume)} is not SRC:DST[:ro|rw] with absolute paths "
                          "(a path holding ':' cannot be mounted): fix or rename it")
        source = parts[0]
        if not os.path.exists(source):
            raise Refused(f"volume source {_show(source)} does not exist on the worker's host: "
                          "mount an existing directory (paths are the worker host's)")
        real = Path(os.path.realpath(source))
        if not any(real == root or real.is_relative_to(root) for root in roots):
            where = ", ".join(map(str, roots)) or "none"
            raise Refused(
                f"volume source {_show(source)} (resolved: {_show(str(real))}) is outside the "
                f"roots a flow run may mount ({where}): mount a directory under them, or add "
                f"its root to {ALLOWED_ROOTS_ENV} in the worker's environment")

    def _create_kwargs(self, value: Any, default: Any, parameters: dict) -> None:
        if not isinstance(value, dict):
            raise Refused(f"container_create_kwargs {_show(value)} is not a mapping: drop it")
        base = default if isinstance(default, dict) else {}
        extra = sorted(k for k in {*value, *base} - {"user"} if value.get(k) != base.get(k))
        if extra:
            raise Refused(f"container_create_kwargs may hold only 'user' (what --host-user "
                          f"sets), not {', '.join(map(repr, extra))}: drop it")
        if "user" in value and value["user"] != base.get("user"):
            self._user(value["user"])

    def _user(self, user: Any) -> None:
        match = _USER.match(user) if isinstance(user, str) else None
        if match is None:
            raise Refused(f"container user {_show(user)} is not a numeric UID[:GID]: use "
                          "--host-user (your uid:gid)")
        if self.uid == 0:
            return
        uid, gid = int(match.group(1)), match.group(2)
        if uid != self.uid or (gid is not None and int(gid) not in self.gids):
            raise Refused(
                f"container user {_show(user)} is not this worker's own uid {self.uid} (and one "
                f"of its groups {','.join(map(str, self.gids))}): a worker not running as root "
                "runs containers only as itself (--host-user, triggered by its owner) or as "
                "the image's user")


def _tagged(image: str) -> str:
    """``name`` means ``name:latest``, as Docker reads it (a digest or a tag stays)."""
    last = image.rsplit("/", 1)[-1]
    return image if (":" in last or "@" in image or "*" in last) else f"{image}:latest"
