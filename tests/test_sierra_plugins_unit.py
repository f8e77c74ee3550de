"""Unit tests of the ``prefectdeploy.*`` SIERRA plugins: option parsing and the
translation of SIERRA's cmdopts/exec_opts into one ``sierra-prefect run`` command.

No SIERRA process, no Prefect: the plugin modules are imported directly (and
once through SIERRA's own plugin manager), cmdopts come from the plugins' real
argument parsers, and exec_opts are built exactly as SIERRA's stage 2 runner
builds them.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

from tests import sierra_support as ss

if str(ss.PREFECT_PLUGIN_PATH) not in sys.path:
    sys.path.insert(0, str(ss.PREFECT_PLUGIN_PATH))

from prefectdeploy import common
from prefectdeploy.dockerremote import cmdline as docker_cmdline
from prefectdeploy.dockerremote import plugin as docker_plugin
from prefectdeploy.local import cmdline as local_cmdline
from prefectdeploy.local import plugin as local_plugin

ALL_STAGES = [-1, 1, 2, 3, 4, 5]
KINDS = {
    "local": (local_cmdline, local_plugin),
    "dockerremote": (docker_cmdline, docker_plugin),
}
FORBIDDEN = ("sleep", "killall", "pkill", "prefect server", "prefect worker",
             "prefect deploy", "prefect deployment", "prefect config", "prefect gcl")


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch, tmp_path):
    """A known shim path and working directory for every test."""
    monkeypatch.setenv(common.SHIM_ENV, "/opt/shim/sierra-prefect")
    monkeypatch.chdir(tmp_path)


def make_cmdopts(kind: str, *argv: str, sierra_root: str = "/srv/sierra root") -> dict:
    """cmdopts as SIERRA builds them: the plugin's parser, then its to_cmdopts()."""
    mod = KINDS[kind][0]
    args = mod.build([], ALL_STAGES).parser.parse_args(list(argv))
    opts = mod.to_cmdopts(args)
    opts.update(execenv=f"prefectdeploy.{kind}", sierra_root=Path(sierra_root))
    return opts


def batch_exec_opts(cmdopts: dict, root: str = "/srv/sierra root/proj/c/s/batch") -> dict:
    """What sierra.core.pipeline.stage2.runner.ParallelRunner passes."""
    root_p = Path(root)
    return {
        "batch_root": str(root_p),
        "work_dir": str(root_p),
        "batch_scratch_root": str(root_p / "scratch"),
        "cmdfile_stem_path": str(root_p / "commands"),
        "cmdfile_ext": ".txt",
        "exec_resume": cmdopts["exec_resume"],
        "n_jobs": cmdopts["exec_jobs_per_node"],
        "nodefile": None,
    }


def exp_exec_opts(cmdopts: dict, batch: str = "/srv/sierra root/proj/c/s/batch",
                  exp: str = "c1-exp1") -> dict:
    """What sierra.core.pipeline.stage2.runner.SequentialRunner passes."""
    inp = Path(batch) / "exp-inputs" / exp
    return {
        "exp_input_root": str(inp),
        "work_dir": inp,
        "exp_scratch_root": str(Path(batch) / "scratch" / exp),
        "cmdfile_stem_path": str(inp / "commands"),
        "cmdfile_ext": ".txt",
        "exec_resume": cmdopts["exec_resume"],
        "n_jobs": cmdopts["exec_jobs_per_node"],
        "nodefile": None,
    }


def batch_argv(kind: str, *argv: str, **exec_kw) -> list[str]:
    cmdopts = make_cmdopts(kind, *argv)
    specs = KINDS[kind][1].BatchShellCmdsGenerator(cmdopts).exec_batch_cmds(
        batch_exec_opts(cmdopts, **exec_kw)
    )
    assert len(specs) == 1
    return shlex.split(specs[0].cmd)


def exp_argv(kind: str, *argv: str, **exec_kw) -> list[str]:
    cmdopts = make_cmdopts(kind, *argv)
    specs = KINDS[kind][1].ExpShellCmdsGenerator(cmdopts, 1).exec_exp_cmds(
        exp_exec_opts(cmdopts, **exec_kw)
    )
    assert len(specs) == 1
    return shlex.split(specs[0].cmd)


def option_values(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


# --- discovery and options ---------------------------------------------------------


def test_sierra_finds_both_plugins_next_to_its_own():
    import sierra
    from sierra.core.plugin import DirectoryPluginManager

    builtin = Path(sierra.__file__).parent / "plugins"
    manager = DirectoryPluginManager()
    manager.initialize(None, [builtin, ss.PREFECT_PLUGIN_PATH])
    found = set(manager.available_plugins())
    ours = {n for n in found if n.startswith("prefectdeploy")}
    assert ours == {"prefectdeploy.local", "prefectdeploy.dockerremote"}
    assert {"prefectserver.local", "hpc.local"} <= found  # no name clash with SIERRA's

    for name in sorted(ours):
        manager.load_plugin(name)
        module = manager.get_plugin_module(name)
        for attr in ("BatchShellCmdsGenerator", "ExpShellCmdsGenerator", "execenv_check"):
            assert hasattr(module, attr), f"{name} lacks {attr}"


@pytest.mark.parametrize("kind", KINDS)
def test_options_compose_with_sierra_core_cmdline(kind):
    """SIERRA chains plugin parsers with argparse parents: no option may clash."""
    from sierra.core.cmdline import CoreCmdline

    core = CoreCmdline([], ALL_STAGES).parser
    parser = KINDS[kind][0].build([core], ALL_STAGES).parser
    args = parser.parse_args(["--exec-jobs-per-node", "4", "--deployment", "a/b"])
    assert args.exec_jobs_per_node == 4 and args.deployment == "a/b"


@pytest.mark.parametrize("kind", KINDS)
def test_defaults(kind):
    opts = make_cmdopts(kind)
    assert opts["deployment"] == f"sierra/{kind}"
    assert opts["work_pool"] is None and opts["work_queue"] is None
    assert opts["run_timeout"] is None
    assert opts["exec_jobs_per_node"] is None
    assert opts["exec_resume"] is False
    if kind == "dockerremote":
        assert opts["docker_image"] is None
        assert opts["docker_extra_mounts"] == []
        assert opts["docker_is_host_user"] is False


# --- the command ----------------------------------------------------------------


def test_local_batch_command(tmp_path):
    assert batch_argv("local") == [
        "/opt/shim/sierra-prefect", "run", "sierra/local",
        "--input-root", "/srv/sierra root/proj/c/s/batch",
        "--scratch-root", "/srv/sierra root/proj/c/s/batch/scratch",
        "--no-resume",
        "--workdir", str(tmp_path),
    ]  # fmt: skip


def test_local_exp_command(tmp_path):
    assert exp_argv("local", "--exec-jobs-per-node", "2") == [
        "/opt/shim/sierra-prefect", "run", "sierra/local",
        "--input-root", "/srv/sierra root/proj/c/s/batch/exp-inputs/c1-exp1",
        "--scratch-root", "/srv/sierra root/proj/c/s/batch/scratch/c1-exp1",
        "--max-parallel", "2",
        "--no-resume",
        "--workdir", str(tmp_path),
    ]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("build", [batch_argv, exp_argv])
def test_max_parallel_from_exec_jobs_per_node(kind, build):
    assert option_values(build(kind, "--exec-jobs-per-node", "7"), "--max-parallel") == ["7"]
    assert "--max-parallel" not in build(kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("build", [batch_argv, exp_argv])
def test_exec_resume_keeps_the_shims_resume(kind, build):
    assert "--no-resume" in build(kind)
    assert "--no-resume" not in build(kind, "--exec-resume")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("build", [batch_argv, exp_argv])
def test_deployment_pool_queue_timeout_pass_through(kind, build):
    argv = build(kind, "--deployment", "myflow/mine", "--work-pool", "pool A",
                 "--work-queue", "q1", "--run-timeout", "90")
    assert argv[1:3] == ["run", "myflow/mine"]
    assert option_values(argv, "--work-pool") == ["pool A"]
    assert option_values(argv, "--work-queue") == ["q1"]
    assert option_values(argv, "--run-timeout") == ["90"]
    plain = build(kind)
    for opt in ("--work-pool", "--work-queue", "--run-timeout"):
        assert opt not in plain


def test_run_timeout_must_be_positive():
    with pytest.raises(SystemExit):
        make_cmdopts("local", "--run-timeout", "0")


def test_paths_are_quoted_for_the_shell(tmp_path):
    """A POSIX shell splits the produced command back into the exact paths."""
    batch = tmp_path / "odd dir" / "it's $HOME; `x` & *"
    batch.mkdir(parents=True)
    (batch / "commands.txt").write_text("")

    cmdopts = make_cmdopts("dockerremote", "--docker-extra-mounts", "/data dir:/data:ro",
                           sierra_root=str(tmp_path / "odd dir"))
    spec = docker_plugin.BatchShellCmdsGenerator(cmdopts).exec_batch_cmds(
        batch_exec_opts(cmdopts, root=str(batch))
    )[0]
    call = shlex.split(spec.cmd)
    assert call[1:3] == ["run", "sierra/dockerremote"]
    assert option_values(call, "--input-root") == [str(batch)]
    assert option_values(call, "--scratch-root") == [str(batch / "scratch")]
    root = str((tmp_path / "odd dir").resolve())
    assert option_values(call, "--mount") == [f"{root}:{root}:rw", "/data dir:/data:ro"]


# --- docker specifics --------------------------------------------------------------


def test_docker_options(tmp_path):
    root = tmp_path / "root"
    cmdopts = make_cmdopts(
        "dockerremote",
        "--docker-image", "registry.local/sim:1.2",
        "--docker-extra-mounts", "/opt/data:/data:ro", "/scratch:/scratch",
        "--docker-is-host-user",
        sierra_root=str(root),
    )
    for gen in (docker_plugin.BatchShellCmdsGenerator(cmdopts),):
        argv = shlex.split(gen.exec_batch_cmds(batch_exec_opts(cmdopts))[0].cmd)
        assert option_values(argv, "--image") == ["registry.local/sim:1.2"]
        assert "--host-user" in argv
        resolved = str(root.resolve())
        assert option_values(argv, "--mount") == [
            f"{resolved}:{resolved}:rw", "/opt/data:/data:ro", "/scratch:/scratch"
        ]
        assert "--workdir" not in argv  # SIERRA's cwd does not exist in the container


def test_docker_defaults_only_mount_sierra_root():
    argv = batch_argv("dockerremote")
    assert option_values(argv, "--mount") == ["/srv/sierra root:/srv/sierra root:rw"]
    assert "--image" not in argv and "--host-user" not in argv


def test_docker_relative_sierra_root_is_mounted_absolute(tmp_path):
    cmdopts = make_cmdopts("dockerremote", sierra_root="rel/root")
    argv = shlex.split(
        docker_plugin.BatchShellCmdsGenerator(cmdopts).exec_batch_cmds(batch_exec_opts(cmdopts))[0].cmd
    )
    root = str((tmp_path / "rel" / "root").resolve())
    assert option_values(argv, "--mount") == [f"{root}:{root}:rw"]


def test_docker_extra_mount_on_sierra_root_replaces_default():
    argv = batch_argv("dockerremote", "--docker-extra-mounts", "/elsewhere:/srv/sierra root:ro")
    assert option_values(argv, "--mount") == ["/elsewhere:/srv/sierra root:ro"]


def test_docker_mounts_pass_verbatim_to_the_shim():
    """The plugin does not judge mounts (the shim does, in execenv_check and run)."""
    argv = batch_argv("dockerremote", "--docker-extra-mounts", "/a:/b:rx", "rel:/c")
    assert option_values(argv, "--mount")[-2:] == ["/a:/b:rx", "rel:/c"]


# --- thinness ----------------------------------------------------------------------


def _all_specs(kind: str, argv: tuple[str, ...]):
    cmdopts = make_cmdopts(kind, *argv)
    plugin = KINDS[kind][1]
    batch = plugin.BatchShellCmdsGenerator(cmdopts)
    exp = plugin.ExpShellCmdsGenerator(cmdopts, 0)
    return {
        "pre_batch": batch.pre_batch_cmds(),
        "exec_batch": batch.exec_batch_cmds(batch_exec_opts(cmdopts)),
        "post_batch": batch.post_batch_cmds(),
        "pre_exp": exp.pre_exp_cmds(),
        "exec_exp": exp.exec_exp_cmds(exp_exec_opts(cmdopts, exp="c1-exp0")),
        "post_exp": exp.post_exp_cmds(),
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("argv", [(), ("--exec-jobs-per-node", "3", "--exec-resume", "--work-pool", "p")])
def test_one_shim_command_and_nothing_else(kind, argv):
    specs = _all_specs(kind, argv)
    for phase in ("pre_batch", "post_batch", "pre_exp", "post_exp"):
        assert specs[phase] == [], phase
    for phase in ("exec_batch", "exec_exp"):
        (spec,) = specs[phase]
        assert spec.shell is True and spec.wait is True and not spec.env
        words = shlex.split(spec.cmd)
        assert os.path.basename(words[0]) == "sierra-prefect" and words[1] == "run"
        for bad in FORBIDDEN:
            assert bad not in spec.cmd, (phase, bad, spec.cmd)


def test_commands_file_elsewhere_is_an_error():
    cmdopts = make_cmdopts("local")
    opts = batch_exec_opts(cmdopts)
    opts["cmdfile_stem_path"] = "/somewhere/else/commands"
    with pytest.raises(RuntimeError, match="commands file"):
        local_plugin.BatchShellCmdsGenerator(cmdopts).exec_batch_cmds(opts)


def test_max_parallel_below_one_is_an_error():
    with pytest.raises(ValueError):
        common.build_run_argv("sierra/local", "/in", "/scratch", max_parallel=0)


# --- stage 2 pre-flight check ---------------------------------------------------------


@pytest.fixture
def stack_env(stack, monkeypatch):
    """SIERRA's process pointed at the session's real stack (as `sierra-prefect up` leaves it)."""
    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv(common.SHIM_ENV, raising=False)


@pytest.mark.parametrize("kind", KINDS)
def test_execenv_check_passes_on_a_real_stack(kind, stack_env):
    KINDS[kind][1].execenv_check(make_cmdopts(kind))


def test_execenv_check_rejects_the_wrong_pool(stack_env):
    with pytest.raises(RuntimeError, match="runs on pool 'sierra-pool', not 'pool-a'"):
        local_plugin.execenv_check(make_cmdopts("local", "--work-pool", "pool-a"))


@pytest.mark.parametrize("bad, expected", [
    ("/data", "--mount '/data' is not SRC:DST[:ro|rw]"),
    ("/a:/b:rx", "--mount '/a:/b:rx' is not SRC:DST[:ro|rw]"),
    ("/a:/b:ro:z", "is not SRC:DST[:ro|rw]"),
    (":/b", "is not SRC:DST[:ro|rw]"),
    ("/no/such/dir:/data", "--mount source '/no/such/dir' does not exist"),
])
def test_execenv_check_rejects_a_bad_mount_in_one_line(stack_env, bad, expected):
    """The shim judges the mount before stage 2 runs anything: SIERRA shows its one line."""
    cmdopts = make_cmdopts("dockerremote", "--docker-extra-mounts", bad)
    with pytest.raises(RuntimeError) as info:
        docker_plugin.execenv_check(cmdopts)
    message = str(info.value)
    assert message.startswith("--execenv=prefectdeploy.dockerremote: Prefect deployment "
                              "'sierra/dockerremote' cannot run stage 2: sierra-prefect: error: ")
    assert expected in message and "\n" not in message
    assert "sierra-prefect up" not in message  # the mount's fix, not a misleading one


def test_execenv_check_accepts_a_good_mount(stack_env, tmp_path):
    docker_plugin.execenv_check(make_cmdopts("dockerremote", "--docker-extra-mounts", f"{tmp_path}:/data:ro"))


def test_execenv_check_unknown_deployment_says_run_up(stack_env):
    with pytest.raises(RuntimeError) as info:
        local_plugin.execenv_check(make_cmdopts("local", "--deployment", "sierra/nope"))
    message = str(info.value)
    assert "deployment 'sierra/nope' does not exist" in message
    assert "sierra-prefect up" in message


@pytest.mark.parametrize("kind", KINDS)
def test_execenv_check_without_a_stack_says_run_up(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("SIERRA_PREFECT_HOME", str(tmp_path / "empty-home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv(common.SHIM_ENV, raising=False)
    with pytest.raises(RuntimeError) as info:
        KINDS[kind][1].execenv_check(make_cmdopts(kind))
    message = str(info.value)
    assert "sierra-prefect up" in message and f"sierra/{kind}" in message


def test_execenv_check_without_shim(monkeypatch, tmp_path):
    monkeypatch.setenv(common.SHIM_ENV, str(tmp_path / "no-such-sierra-prefect"))
    with pytest.raises(RuntimeError, match="sierra-prefect up"):
        local_plugin.execenv_check(make_cmdopts("local"))


def test_shim_found_next_to_python_when_not_on_path(monkeypatch, tmp_path):
    monkeypatch.delenv(common.SHIM_ENV)
    monkeypatch.setenv("PATH", "/nonexistent")
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    assert common.shim_executable() == "sierra-prefect"  # nothing there yet: the bare name
    shim = venv_bin / "sierra-prefect"
    shim.write_text("#!/bin/sh\n")
    assert common.shim_executable() == "sierra-prefect"  # there, but not executable
    shim.chmod(0o755)
    assert common.shim_executable() == f"{tmp_path}/venv/bin/sierra-prefect"
