"""Every `rode ...` command in the README and docs/*.md composes and validates (no run).

The commands are those of code blocks (fenced or indented), one per line (a trailing
backslash continues it; a `# comment` ends it). Each goes through what `rode` does before
a run: the task word, positional words, renamed keys, and `validate_overrides` (every job
of a sweep composed and checked, the task's own checks, the output dir). Placeholders
like `<dir>` stand for an existing directory. An HTML comment before a code block says
how to take its commands:

    <!-- docs-check: refused -->   each command must be refused (exit 2, one line)
    <!-- docs-check: skip -->      not checked (needs a file or a machine we do not have)
"""
import contextlib
import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*docs-check:\s*(refused|skip)\s*-->")
FENCE = re.compile(r"^\s*(```|~~~)")


def code_blocks(text: str):
    """(first line number, lines, marker) for each fenced or indented code block."""
    lines = text.splitlines()
    k, marker = 0, None
    while k < len(lines):
        line = lines[k]
        found = MARKER.search(line)
        if found:
            marker = found.group(1)
        if FENCE.match(line):
            end = next((j for j in range(k + 1, len(lines)) if FENCE.match(lines[j])), len(lines))
            yield k + 2, lines[k + 1:end], marker
            marker, k = None, end + 1
            continue
        if line.startswith("    ") and line.strip() and (k == 0 or not lines[k - 1].strip()):
            end = k
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            yield k + 1, [x[4:] for x in lines[k:end]], marker
            marker, k = None, end
            continue
        if line.strip() and not found:
            marker = None if not line.lstrip().startswith("<!--") else marker
        k += 1


def rode_commands(text: str):
    """(line number, command words after `rode`, marker) for each rode command of the text."""
    for first, block, marker in code_blocks(text):
        joined, start = "", None
        for offset, line in enumerate(block):
            start = first + offset if not joined else start
            code = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
            if code.endswith("\\"):
                joined += code[:-1] + " "
                continue
            joined += code
            for part in re.split(r"\s*(?:;|&&|\|\|)\s*", joined):
                words = part.strip().lstrip("$ ").split()
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                    words = words[1:]   # VAR=value rode ...
                if words and words[0] == "rode" and not (len(words) > 1
                                                         and words[1].endswith(":")):
                    yield start, " ".join(words[1:]), marker
            joined = ""


def collect():
    """Every command of the README and docs/, sweeps included (each value composed once)."""
    found, seen = [], set()
    for path in DOCS:
        for line, command, marker in rode_commands(path.read_text()):
            if (command, marker) in seen:   # the same command in another place: checked once
                continue
            seen.add((command, marker))
            found.append(pytest.param(command, marker,
                                      id=f"{path.relative_to(ROOT)}:{line}: rode {command}"[:150]))
    return found


COMMANDS = collect()


def check(command: str, tmp_path: Path, elsewhere_ok: bool = True) -> str | None:
    """None when `rode <command>` composes and validates; else the one-line error it gives.
    elsewhere_ok: a command refused only for what this machine lacks passes when its keys
    and values pass the schema and rules."""
    from runner import routes, rundir
    from runner.cli import bind_positional, renamed_keys, split_argv, validate_overrides
    from runner.errors import ConfigError
    from runner.schema import TASK_SCHEMAS
    from runner.tasks import TASKS

    command = re.sub(r"[^\s=]*<[^<>\s]+>[^\s]*", str(tmp_path), command)   # <dir>, <run>
    command = re.sub(r"\$\{?\w+\}?", "0", command)            # $s in a shell loop
    command = " ".join(w for w in command.split(" ") if w != "...")   # "and so on"
    try:
        argv = shlex.split(command)
    except ValueError as e:
        return f"not a shell command line: {e}"
    task, flags, overrides = split_argv(argv)
    if task is None:
        return None if flags else "no task"   # rode --help, rode --version
    if task not in TASKS:
        return f"unknown task {task!r}"
    try:
        overrides = bind_positional(TASKS[task].positional, overrides)
        overrides = renamed_keys(task, overrides)
        route = routes.read(task, flags, overrides)   # Hydra's flags, read as `rode` reads them
        if route.only_prints:
            return None   # --help, --cfg job: nothing runs, nothing to validate
        multirun = route.multirun
        if "resume" in TASK_SCHEMAS[task].fields:
            overrides = rundir.prepare_resume(overrides, multirun)
        validate_overrides(task, overrides, multirun, route)
    except ConfigError as e:
        if not (elsewhere_ok and ELSEWHERE.search(str(e))):
            return str(e)
        # Right here, but it needs what this machine lacks (data, a checkpoint, a GPU): the
        # keys and values must still pass the schema and rules (the task's own checks off).
        with _without_task_checks(task):
            try:
                validate_overrides(task, overrides, multirun, route)
            except ConfigError as again:
                # a path checked before the task's own checks (a checkpoint, a run dir)
                return None if ELSEWHERE.search(str(again)) else str(again)
    return None


# What a command needs from the machine it runs on, not from its command line.
ELSEWHERE = re.compile(r"not found \(missing|does not exist \(give a run dir|"
                       r"no CUDA device is available|needs its package|holds no job directories")


@contextlib.contextmanager
def _without_task_checks(task: str):
    import types

    from runner import tasks

    real = tasks.load_task   # the environment stage (runner.tasks.environment_check) loads it here
    tasks.load_task = lambda name: types.SimpleNamespace() if name == task else real(name)
    try:
        yield
    finally:
        tasks.load_task = real


class SharedCompose:
    """Hydra's config loading, done once per (config, search path, config-group choices and
    ``hydra.*`` overrides): the commands of the docs share a few such bases, and composing
    one costs about a second on a loaded machine. Each command's other overrides
    (``depth=8``, ``model.arch=resnet50``, ``+key=v``, ``~key``) are applied to a copy of
    its base as Hydra's ``_load_configuration_impl`` applies them after composing
    (``_apply_overrides_to_config`` on the root in struct mode), and the hydra node's record
    of the overrides (overrides.task and .hydra, job.override_dirname, runtime.cwd) is
    written as it writes it. A command line holding a sweep (Hydra's mode check composes
    those) is cached whole. An override the copy refuses is composed again for real, so a
    refusal is Hydra's own; ``test_shared_compose_is_hydras`` checks that an accepted copy
    equals what Hydra composes. The group listings that `rode` reads to check a group's
    value are cached too (the configs do not change during the tests)."""

    def __init__(self):
        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        self.real_load = ConfigLoaderImpl.load_configuration
        self.real_options = ConfigLoaderImpl.get_group_options
        self.bases: dict = {}
        self.options: dict = {}

    @staticmethod
    def _where(loader) -> tuple:
        return tuple((e.provider, e.path) for e in loader.get_search_path().get_path())

    def group_options(self, loader, *args, **kwargs):
        key = (self._where(loader), args, tuple(sorted(kwargs.items())))
        if key not in self.options:
            self.options[key] = self.real_options(loader, *args, **kwargs)
        return list(self.options[key])

    def load(self, loader, config_name, overrides, run_mode, from_shell=True,
             validate_sweep_overrides=True):
        from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException
        from omegaconf import open_dict
        from omegaconf.errors import OmegaConfBaseException

        from runner import composing

        def real(lines):
            return self.real_load(loader, config_name, list(lines), run_mode, from_shell,
                                  validate_sweep_overrides)

        overrides = list(overrides)
        try:
            parsed = OverridesParser.create().parse_overrides(overrides)
        except HydraException:
            return real(overrides)
        sweep = any(o.is_sweep_override() for o in parsed)
        # as Hydra's defaults list splits them: a group's choice shapes the base; the rest
        # are config overrides, applied after composing
        chooses = [sweep or o.is_hydra_override()
                   or (loader.repository.group_exists(o.key_or_group)
                       and not isinstance(o.value(), dict)) for o in parsed]
        base_lines = tuple(o.input_line for c, o in zip(chooses, parsed, strict=True) if c)
        key = (config_name, base_lines, run_mode, from_shell, validate_sweep_overrides,
               self._where(loader))
        if key not in self.bases:
            self.bases[key] = real(base_lines)
        cfg = composing.copy_config(self.bases[key])
        try:
            ConfigLoaderImpl._apply_overrides_to_config(
                [o for c, o in zip(chooses, parsed, strict=True) if not c], cfg)
        except (HydraException, OmegaConfBaseException):
            return real(overrides)
        app = [o for o in parsed if not o.is_hydra_override()]
        cfg.hydra.overrides.task = [o.input_line for o in app]
        named = cfg.hydra.job.config.override_dirname
        with open_dict(cfg.hydra):
            cfg.hydra.job.override_dirname = get_overrides_dirname(
                overrides=app, kv_sep=named.kv_sep, item_sep=named.item_sep,
                exclude_keys=named.exclude_keys)
            cfg.hydra.runtime.cwd = os.getcwd()
        return cfg


_SHARED: list = []   # one SharedCompose for the session: its bases outlive a test


@pytest.fixture
def shared_compose(monkeypatch):
    """Hydra's config loader made a SharedCompose for the test."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    if not _SHARED:
        _SHARED.append(SharedCompose())
    shared = _SHARED[0]
    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration",
                        lambda self, *a, **k: shared.load(self, *a, **k))
    monkeypatch.setattr(ConfigLoaderImpl, "get_group_options",
                        lambda self, *a, **k: shared.group_options(self, *a, **k))
    return shared


@pytest.mark.parametrize(("command", "marker"), COMMANDS)
def test_docs_command_validates(command, marker, tmp_path, monkeypatch, shared_compose):
    from runner import cli

    if marker == "skip":
        pytest.skip("docs-check: skip")
    monkeypatch.setattr(cli, "_MAX_COMBINATIONS", 1)   # a sweep: each value once, not all jobs
    monkeypatch.chdir(tmp_path)   # default output dirs land here, and nothing is written
    error = check(command, tmp_path, elsewhere_ok=marker != "refused")
    if marker == "refused":
        assert error, f"rode {command} should be refused"
    else:
        assert error is None, f"rode {command}: {error}"
    assert not (tmp_path / "outputs").exists()


def test_the_docs_hold_commands():
    assert len(COMMANDS) > 50


def test_a_key_that_does_not_exist_fails(tmp_path, monkeypatch, shared_compose):
    monkeypatch.chdir(tmp_path)
    doc = "Run it:\n\n```bash\nrode train dept=3 \\\n    method=heun   # deep\n```\n"
    (command,) = [c for _, c, _ in rode_commands(doc)]
    assert command == "train dept=3 method=heun"
    error = check(command, tmp_path)
    assert error and "dept" in error
    assert check("train depth=3 method=heun", tmp_path) is None
    # on the shared base of a group choice, in a nested key, in a group, in a sweep
    assert "arhc" in (check("train model=resnet model.arhc=resnet50", tmp_path) or "")
    assert "resnt" in (check("train model=resnt", tmp_path) or "")
    assert "dept" in (check("-m train experiment=train dept=4,8", tmp_path) or "")
    assert check("train model=resnet model.arch=resnet50", tmp_path) is None
    marked = "<!-- docs-check: refused -->\n\n    rode train depth=0\n"
    assert [m for _, _, m in rode_commands(marked)] == ["refused"]


def _compare_with_hydra(monkeypatch, shared):
    """Every config load: the shared copy and Hydra's own must give the same config."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from omegaconf import OmegaConf

    def both(self, config_name, overrides, *args, **kwargs):
        ours = shared.load(self, config_name, overrides, *args, **kwargs)
        theirs = shared.real_load(self, config_name, overrides, *args, **kwargs)
        assert OmegaConf.to_container(ours) == OmegaConf.to_container(theirs), overrides
        return theirs

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", both)


@pytest.mark.parametrize("command", [
    "train model=resnet model.arch=resnet50 seed=3 +note=x hydra.run.dir=<dir>/run",
])
def test_shared_compose_is_hydras(command, tmp_path, monkeypatch, shared_compose):
    from runner import cli

    monkeypatch.setattr(cli, "_MAX_COMBINATIONS", 1)
    monkeypatch.chdir(tmp_path)
    _compare_with_hydra(monkeypatch, shared_compose)
    check(command, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("command", "marker"), COMMANDS)
def test_shared_compose_is_hydras_for_every_docs_command(command, marker, tmp_path, monkeypatch,
                                                         shared_compose):
    from runner import cli

    monkeypatch.setattr(cli, "_MAX_COMBINATIONS", 1)
    monkeypatch.chdir(tmp_path)
    _compare_with_hydra(monkeypatch, shared_compose)
    check(command, tmp_path, elsewhere_ok=marker != "refused")
