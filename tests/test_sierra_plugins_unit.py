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


def test_sierra_finds_our_plugins_next_to_its_own():
    import sierra
    from sierra.core.plugin import DirectoryPluginManager

    builtin = Path(sierra.__file__).parent / "plugins"
    manager = DirectoryPluginManager()
    manager.initialize(None, [builtin, ss.PREFECT_PLUGIN_PATH])
    found = set(manager.available_plugins())
    ours = {n for n in found if n.startswith("prefectdeploy")}
    assert ours == {"prefectdeploy.local", "prefectdeploy.dockerremote", "prefectdeploy.slurm"}
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
    with pytest.raises(SystemExit, match="commands file"):
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
    with pytest.raises(SystemExit, match="runs on pool 'sierra-pool', not 'pool-a'"):
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
    with pytest.raises(SystemExit) as info:
        docker_plugin.execenv_check(cmdopts)
    message = str(info.value)
    assert message.startswith("--execenv=prefectdeploy.dockerremote: Prefect deployment "
                              "'sierra/dockerremote' cannot run stage 2: sierra-prefect: error: ")
    assert expected in message and "\n" not in message
    assert "sierra-prefect up" not in message  # the mount's fix, not a misleading one


def test_execenv_check_accepts_a_good_mount(stack_env, tmp_path):
    docker_plugin.execenv_check(make_cmdopts("dockerremote", "--docker-extra-mounts", f"{tmp_path}:/data:ro"))


def test_execenv_check_unknown_deployment_says_run_up(stack_env):
    with pytest.raises(SystemExit) as info:
        local_plugin.execenv_check(make_cmdopts("local", "--deployment", "sierra/nope"))
    message = str(info.value)
    assert "deployment 'sierra/nope' does not exist" in message
    assert "sierra-prefect up" in message


@pytest.mark.parametrize("kind", KINDS)
def test_execenv_check_without_a_stack_says_run_up(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("SIERRA_PREFECT_HOME", str(tmp_path / "empty-home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv(common.SHIM_ENV, raising=False)
    with pytest.raises(SystemExit) as info:
        KINDS[kind][1].execenv_check(make_cmdopts(kind))
    message = str(info.value)
    assert "sierra-prefect up" in message and f"sierra/{kind}" in message


def test_execenv_check_without_shim(monkeypatch, tmp_path):
    monkeypatch.setenv(common.SHIM_ENV, str(tmp_path / "no-such-sierra-prefect"))
    with pytest.raises(SystemExit, match="sierra-prefect up"):
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


# --- resources: cores per run, memory, retries (issue 10) -----------------------------


def engine_args(kind: str, engine: str, *argv: str):
    """Parsed args as SIERRA builds them: core options, a real engine's, the plugin's."""
    from sierra.core.cmdline import CoreCmdline
    from sierra.plugins.engine.argos import cmdline as argos_cmdline
    from sierra.plugins.engine.ros1gazebo import cmdline as gazebo_cmdline

    core = CoreCmdline([], ALL_STAGES).parser
    extra: list[str] = []
    if engine == "argos":
        parents = [argos_cmdline.build([core], ALL_STAGES).parser]
    elif engine == "ros1gazebo":
        parents = [gazebo_cmdline.build([core], ALL_STAGES).parser]
        extra = ["--robot", "turtlebot3"]
    else:
        parents = [core]
    return KINDS[kind][0].build(parents, ALL_STAGES).parser.parse_args([*extra, *argv])


def configured(kind: str, engine: str, *argv: str) -> tuple[object, dict]:
    """args after the plugin's cmdline_postparse_configure, and the cmdopts from them."""
    args = KINDS[kind][1].cmdline_postparse_configure(engine_args(kind, engine, *argv))
    opts = KINDS[kind][0].to_cmdopts(args)
    opts.update(execenv=f"prefectdeploy.{kind}", sierra_root=Path("/srv/sierra root"))
    return args, opts


def generated_argvs(kind: str, cmdopts: dict) -> list[list[str]]:
    """The command of both paradigms, with exec_opts exactly as SIERRA's runners build them."""
    plugin = KINDS[kind][1]
    batch = plugin.BatchShellCmdsGenerator(cmdopts).exec_batch_cmds(batch_exec_opts(cmdopts))
    exp = plugin.ExpShellCmdsGenerator(cmdopts, 1).exec_exp_cmds(exp_exec_opts(cmdopts))
    return [shlex.split(batch[0].cmd), shlex.split(exp[0].cmd)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("engine, engine_opt, declared", [
    ("argos", ("--physics-n-engines", "4"), 4),
    ("ros1gazebo", ("--physics-n-threads", "3"), 3),
])
def test_cores_per_run_from_the_engines_threads(kind, engine, engine_opt, declared):
    args, opts = configured(kind, engine, "--n-runs", "8", *engine_opt)
    assert args.exec_cores_per_run == declared and opts["exec_cores_per_run"] == declared
    for argv in generated_argvs(kind, opts):
        assert option_values(argv, "--cores-per-run") == [str(declared)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("engine, engine_opt", [
    ("argos", ("--physics-n-engines", "4")),
    ("ros1gazebo", ("--physics-n-threads", "3")),
    ("none", ()),
])
def test_explicit_cores_per_run_wins(kind, engine, engine_opt):
    args, opts = configured(kind, engine, "--n-runs", "8", *engine_opt, "--exec-cores-per-run", "2")
    assert args.exec_cores_per_run == 2
    for argv in generated_argvs(kind, opts):
        assert option_values(argv, "--cores-per-run") == ["2"]


@pytest.mark.parametrize("engine, argv", [
    ("ros1gazebo", ()),                              # Gazebo's default 0: no extra threads
    ("ros1gazebo", ("--physics-n-threads", "0")),
    ("argos", ()),                                   # ARGoS without --physics-n-engines
    ("none", ()),                                    # an engine that declares nothing
])
def test_no_declared_threads_leaves_the_flows_default(engine, argv):
    args, opts = configured("local", engine, "--n-runs", "4", *argv)
    assert args.exec_cores_per_run is None
    for call in generated_argvs("local", opts):
        assert "--cores-per-run" not in call


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_runs, cores", [("8", None), ("8", "2"), ("1", None), ("8", "999")])
def test_filled_jobs_per_node_is_for_sierra_only(kind, n_runs, cores):
    """Without --exec-jobs-per-node SIERRA gets a valid value, and the worker decides the cap."""
    argv = ["--n-runs", n_runs] + (["--exec-cores-per-run", cores] if cores else [])
    args, opts = configured(kind, "none", *argv)
    cpus = len(os.sched_getaffinity(0))
    expected = max(1, min(int(n_runs), cpus // int(cores or 1)))
    assert args.exec_jobs_per_node == expected == opts["exec_jobs_per_node"]
    assert opts["exec_max_parallel"] is None
    # Neither paradigm forwards it (SIERRA passes it again as exec_opts["n_jobs"]).
    for call in generated_argvs(kind, opts):
        assert "--max-parallel" not in call, call


@pytest.mark.parametrize("kind", KINDS)
def test_given_jobs_per_node_is_forwarded(kind):
    args, opts = configured(kind, "argos", "--n-runs", "8", "--physics-n-engines", "2",
                            "--exec-jobs-per-node", "3")
    assert args.exec_jobs_per_node == 3 and opts["exec_max_parallel"] == 3
    for call in generated_argvs(kind, opts):
        assert option_values(call, "--max-parallel") == ["3"]
        assert option_values(call, "--cores-per-run") == ["2"]


def test_postparse_leaves_sierra_alone_without_stage_2():
    args, opts = configured("local", "argos", "--n-runs", "8", "--physics-n-engines", "2",
                            "--pipeline", "3", "4")
    assert args.exec_jobs_per_node is None and args.exec_cores_per_run is None
    assert opts["exec_max_parallel"] is None


def test_postparse_says_what_it_decided(caplog):
    caplog.set_level("INFO", logger=common.__name__)
    configured("local", "ros1gazebo", "--n-runs", "4", "--physics-n-threads", "2")
    text = caplog.text
    assert "Cores per experimental run: 2 (the engine's --physics-n-threads)" in text
    assert "--exec-jobs-per-node not given: SIERRA gets" in text and "not forwarded" in text
    caplog.clear()
    configured("local", "argos", "--n-runs", "4", "--physics-n-engines", "4",
               "--exec-cores-per-run", "1", "--exec-jobs-per-node", "2")
    assert "Cores per experimental run: 1 (--exec-cores-per-run)" in caplog.text
    assert "--exec-jobs-per-node 2: forwarded as --max-parallel" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("build", [batch_argv, exp_argv])
def test_resource_options_pass_through(kind, build):
    argv = build(kind, "--exec-cores-per-run", "4", "--exec-memory-per-run", "512M",
                 "--exec-retries", "2", "--exec-retry-delay", "1.5")
    assert option_values(argv, "--cores-per-run") == ["4"]
    assert option_values(argv, "--memory-per-run") == ["512M"]
    assert option_values(argv, "--retries") == ["2"]
    assert option_values(argv, "--retry-delay") == ["1.5"]
    plain = build(kind)
    for opt in ("--cores-per-run", "--memory-per-run", "--retries", "--retry-delay"):
        assert opt not in plain
    # No retries is a value too: forwarded, not dropped.
    assert option_values(build(kind, "--exec-retries", "0"), "--retries") == ["0"]
    # --exec-spread N: the batch over N workers (hosts).
    assert option_values(build(kind, "--exec-spread", "2"), "--spread") == ["2"]
    assert "--spread" not in plain


@pytest.mark.parametrize("kind", KINDS)
def test_resource_defaults(kind):
    opts = make_cmdopts(kind)
    for key in ("exec_cores_per_run", "exec_memory_per_run", "exec_retries",
                "exec_retry_delay", "exec_max_parallel", "exec_spread"):
        assert opts[key] is None, key


def test_memory_size_goes_to_the_shim_verbatim():
    """The plugin does not judge sizes: the shim does (execenv_check asks it)."""
    assert option_values(batch_argv("local", "--exec-memory-per-run", "2Q"), "--memory-per-run") == ["2Q"]


@pytest.mark.parametrize("option, bad, what", [
    ("--exec-cores-per-run", "0", "must be an integer >= 1, got '0'"),
    ("--exec-cores-per-run", "-2", "must be an integer >= 1, got '-2'"),
    ("--exec-cores-per-run", "two", "must be an integer >= 1, got 'two'"),
    ("--exec-cores-per-run", "1.5", "must be an integer >= 1, got '1.5'"),
    ("--exec-retries", "-1", "must be an integer >= 0, got '-1'"),
    ("--exec-retries", "x", "must be an integer >= 0, got 'x'"),
    ("--exec-retry-delay", "-0.5", "must be a number >= 0, got '-0.5'"),
    ("--exec-retry-delay", "nan", "must be a number >= 0, got 'nan'"),
    ("--exec-retry-delay", "inf", "must be a number >= 0, got 'inf'"),
    ("--exec-spread", "0", "must be an integer >= 1, got '0'"),
    ("--run-timeout", "0", "must be an integer >= 1, got '0'"),
])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_resource_values_get_one_argparse_line(kind, option, bad, what, capsys):
    with pytest.raises(SystemExit) as info:
        make_cmdopts(kind, option, bad)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"error: argument {option}: {what}"), last


@pytest.mark.parametrize("kwargs", [
    {"cores_per_run": 0}, {"retries": -1}, {"retry_delay": -1.0}, {"max_parallel": 0},
    {"spread": 0},
])
def test_build_run_argv_rejects_out_of_range_values(kwargs):
    with pytest.raises(ValueError, match="must be >="):
        common.build_run_argv("sierra/local", "/in", "/scratch", **kwargs)


# The test engine sizes jobs per node like ARGoS: for hpc.* only.

def _toysim_plugin():
    if str(ss.ENGINE_PLUGIN_PATH) not in sys.path:
        sys.path.insert(0, str(ss.ENGINE_PLUGIN_PATH))
    from sptest.toysim import plugin

    return plugin


@pytest.mark.parametrize("threads, n_runs", [(None, 8), (2, 8), (999, 8), (1, 1)])
def test_toysim_fills_jobs_per_node_for_hpc_like_argos(threads, n_runs):
    import argparse

    args = argparse.Namespace(exec_jobs_per_node=None, physics_n_threads=threads, n_runs=n_runs)
    _toysim_plugin().cmdline_postparse_configure("hpc.local", args)
    cpus = len(os.sched_getaffinity(0))
    assert args.exec_jobs_per_node == max(1, min(n_runs, cpus // (threads or 1)))


@pytest.mark.parametrize("execenv", ["prefectdeploy.local", "prefectdeploy.dockerremote",
                                     "prefectserver.local"])
def test_toysim_sets_nothing_for_other_execenvs(execenv):
    import argparse

    args = argparse.Namespace(exec_jobs_per_node=None, physics_n_threads=2, n_runs=4,
                              toysim_paradigm="per-exp")
    _toysim_plugin().cmdline_postparse_configure(execenv, args)
    assert args.exec_jobs_per_node is None


# The shim validates sizes before stage 2 (needs the shim's `check --memory-per-run`).

@pytest.mark.parametrize("kind", KINDS)
def test_execenv_check_accepts_a_memory_size(kind, stack_env):
    KINDS[kind][1].execenv_check(make_cmdopts(kind, "--exec-memory-per-run", "512M"))


@pytest.mark.parametrize("bad", ["2Q", "lots", "0", "-1G"])
def test_execenv_check_rejects_a_bad_memory_size_in_one_line(bad, stack_env):
    with pytest.raises(SystemExit) as info:
        local_plugin.execenv_check(make_cmdopts("local", f"--exec-memory-per-run={bad}"))
    message = str(info.value)
    assert message.startswith("--execenv=prefectdeploy.local: Prefect deployment "
                              "'sierra/local' cannot run stage 2: sierra-prefect: error: ")
    assert bad in message and "\n" not in message
    assert "sierra-prefect up" not in message
