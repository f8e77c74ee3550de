"""Secrets kept out of what others can see: masked in URLs, withheld from environments.

A stack has two secrets: its credential (Prefect's auth string) and, on PostgreSQL, its
database URL with a password. ``status`` and the state file show the URL masked; the
processes the stack starts, and the experimental runs of every flow run, get an
environment without them::

    mask_url("postgresql+asyncpg://prefect:pw@127.0.0.1/prefect")
    # 'postgresql+asyncpg://prefect:***@127.0.0.1/prefect'
    secrets = Secrets.of(credential, database_url)     # and the forms derived from them
    env, withheld = scrub_env(os.environ, secrets)       # names and values both

A variable is withheld when its name is one Prefect or the shim reads a secret from
(``SECRET_ENV``) or when its value holds a secret: e.g. ``DATABASE_URL`` copied into a
user's shell. Everything else is kept: simulators need ``LD_LIBRARY_PATH``,
``ARGOS_PLUGIN_PATH``, ``ROS_*``. Only the standard library is imported (flows use this).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

MASK = "***"

# Variables Prefect or the shim read a credential or a database URL from.
SECRET_ENV = frozenset({
    "PREFECT_API_AUTH_STRING", "PREFECT_API_KEY", "PREFECT_SERVER_API_AUTH_STRING",
    "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_PASSWORD",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_PASSWORD",
    "SIERRA_PREFECT_AUTH_STRING", "SIERRA_PREFECT_DATABASE_URL",
})

# A secret this long is withheld wherever it appears in a value; a shorter one only where
# it is the whole value (or a URL's password), so a password such as "pw" does not take
# PATH or PWD with it.
MIN_CONTAINED = 8


def _password_span(url: str) -> tuple[int, int] | None:
    """Where the password of ``url`` is (``user:PASSWORD@host``), or None if it has none.

    ``urlsplit`` finds the authority as the standard says (the userinfo ends at its last
    ``@``, so a password may hold ``@``; the user may be empty, as in ``//:pw@host``). A
    password with a raw ``/``, ``?`` or ``#`` (invalid, but typed) cuts the authority short
    there; then everything from the first ``:`` to the URL's last ``@`` is masked."""
    slashes = url.find("//")
    if slashes < 0:
        return None
    start = slashes + 2
    try:
        netloc = urlsplit(url).netloc
    except ValueError:  # e.g. an unbalanced "[" where an IPv6 host would be
        netloc = ""
    if "@" in netloc and url.startswith(netloc, start):
        userinfo = netloc.rpartition("@")[0]
    else:
        userinfo = url[start:].rpartition("@")[0]
    colon = userinfo.find(":")
    if colon < 0:
        return None
    return start + colon + 1, start + len(userinfo)


def mask_url(url: str) -> str:
    """``url`` with its password, if it has one, replaced by ``***`` (even an empty one:
    the mask does not tell its length)."""
    span = _password_span(url)
    return url if span is None else f"{url[:span[0]]}{MASK}{url[span[1]:]}"


def url_password(url: str) -> str | None:
    """The password of ``url`` as written (percent-encoded or not); None without one."""
    span = _password_span(url)
    return None if span is None else url[span[0]:span[1]]


@dataclass(frozen=True)
class Secrets:
    """Secret values, with the forms a variable could hold them in."""

    contained: frozenset[str] = field(default=frozenset(), repr=False)  # wherever they appear
    whole: frozenset[str] = field(default=frozenset(), repr=False)  # as the whole value
    url_passwords: frozenset[str] = field(default=frozenset(), repr=False)  # as ":PASSWORD@"

    @classmethod
    def of(cls, *values: str | None) -> Secrets:
        """The secrets ``values`` (a credential, a database URL, a password), and what
        derives from them: a URL's password (as written and decoded), an auth string's
        password and its HTTP Basic token."""
        forms: set[str] = set()
        passwords: set[str] = set()
        for value in filter(None, values):
            forms.add(value)
            if "://" in value or value.startswith("//"):  # a URL
                if (password := url_password(value)) is not None:
                    passwords |= {password, unquote(password)}
            elif ":" in value:  # an auth string, user:password
                forms.add(value.split(":", 1)[1])
                forms.add(base64.b64encode(value.encode()).decode())
        forms |= passwords
        forms = {f for f in forms if f.strip()}
        return cls(contained=frozenset(f for f in forms if len(f) >= MIN_CONTAINED),
                   whole=frozenset(forms),
                   url_passwords=frozenset(p for p in passwords if p))

    @classmethod
    def in_environment(cls, environ: Mapping[str, str], *extra: str | None) -> Secrets:
        """The secrets of ``environ`` (the values of ``SECRET_ENV``), and ``extra``."""
        return cls.of(*(environ.get(name) for name in sorted(SECRET_ENV)), *extra)

    def held_by(self, value: str) -> bool:
        return (value in self.whole
                or any(secret in value for secret in self.contained)
                or any(f":{password}@" in value for password in self.url_passwords))


def scrub_env(environ: Mapping[str, str], secrets: Secrets | None = None,
              names: Iterable[str] = SECRET_ENV) -> tuple[dict[str, str], list[str]]:
    """``environ`` without the variables ``names`` and without any variable whose value
    holds one of ``secrets`` (default: those of ``environ`` itself). Returns the new
    environment and the names withheld, sorted."""
    secrets = secrets if secrets is not None else Secrets.in_environment(environ)
    names = frozenset(names)
    env, withheld = {}, []
    for name, value in environ.items():
        if name in names or secrets.held_by(value):
            withheld.append(name)
        else:
            env[name] = value
    return env, sorted(withheld)
