"""Which processes get the one-certificate CA file (sierra_prefect/settings.py:venv_env):
those on this host of a plain-HTTP stack, in their Prefect home, unless the user set one."""

from __future__ import annotations

import ssl

import pytest

from sierra_prefect.settings import CA_FILE_ENV, Settings, plain_http_ca_file, venv_env


@pytest.fixture
def settings(tmp_path, monkeypatch):
    monkeypatch.delenv(CA_FILE_ENV, raising=False)
    return Settings(home=tmp_path / "home")


def test_a_plain_http_process_here_gets_one_certificate_in_its_prefect_home(settings, tmp_path):
    env = venv_env("http://127.0.0.1:4200/api", settings, on_this_host=True)
    path = env[CA_FILE_ENV]
    assert path == str(settings.prefect_home / "plain-http-ca.pem")
    text = open(path).read()
    assert text.count("BEGIN CERTIFICATE") == 1
    ssl.create_default_context(cafile=path)  # a CA file Prefect's client can load
    # Another Prefect home (a SLURM node's) gets its own.
    node = venv_env("http://10.0.0.1:4200/api", settings, on_this_host=True,
                    PREFECT_HOME=str(tmp_path / "node"))
    assert node[CA_FILE_ENV] == str(tmp_path / "node" / "plain-http-ca.pem")


@pytest.mark.parametrize("case", ["https", "elsewhere", "user's own"])
def test_others_keep_prefects_verification(settings, monkeypatch, case):
    url, here = "http://127.0.0.1:4200/api", True
    if case == "https":
        url = "https://prefect.example.org/api"
    elif case == "elsewhere":  # e.g. a Docker worker: the path would not exist in containers
        here = False
    else:
        monkeypatch.setenv(CA_FILE_ENV, "/etc/ssl/certs/ca-certificates.crt")
    env = venv_env(url, settings, on_this_host=here)
    if case == "user's own":
        assert env[CA_FILE_ENV] == "/etc/ssl/certs/ca-certificates.crt"
    else:
        assert CA_FILE_ENV not in env


def test_written_once_and_whole(tmp_path):
    first = plain_http_ca_file(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert plain_http_ca_file(tmp_path) == first
    assert first.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob("*.tmp"))
