"""Every way of starting a task goes through the same checks.

Hydra reads its own flags (``--run``, ``--multirun``, ``--config-dir``, ``--config-name``,
``-cp``, ...) from the command line; rode reads them here with Hydra's own argument
parser, so that a flag changes what is validated exactly as it changes what Hydra
runs: the mode (a ``--run`` or ``hydra.mode=`` counts as Hydra counts it), the config
(``--config-dir``, ``--config-name``, ``--config-path``), and hence every job's
config and output dir. A flag Hydra adds later is parsed the same way, and only the
flags that print something without running a job (``--help``, ``--cfg``, ``--info``,
``--shell-completion``) skip the checks.

Torch-free.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .io import atomic_open, naming

# Flags after which Hydra prints something and runs no job.
_ONLY_PRINT = ("help", "hydra_help", "version", "cfg", "info", "shell_completion")


def _parser() -> argparse.ArgumentParser:
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message):   # argparse prints usage and exits; one line instead
        raise ConfigError(message)
    parser.error = error
    return parser


def split_argv(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """-> (task, Hydra's flags with their values, overrides). Which words are flags,
    and which take a value, is Hydra's parser's answer (``--config-dir=x`` too)."""
    actions = _parser()._option_string_actions
    task, flags, overrides = None, [], []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        name, eq, _ = word.partition("=")
        action = actions.get(name) if word.startswith("-") else None
        if action is not None:
            flags.append(word)
            if eq or action.nargs == 0:
                continue
            if action.nargs == "?":   # --info [what]
                if i < len(argv) and action.choices and argv[i] in action.choices:
                    flags.append(argv[i])
                    i += 1
                continue
            if i < len(argv):   # else the parser says the value is missing
                flags.append(argv[i])
                i += 1
        elif word.startswith("-") and not eq:
            flags.append(word)           # unknown: refused by the parser, in one line
        elif task is None and not eq:
            task = word
        else:
            overrides.append(word)
    return task, flags, overrides


@dataclass
class Route:
    """How the command line starts its task: Hydra's parsed flags and what follows."""

    task: str
    args: argparse.Namespace
    overrides: list[str] = field(default_factory=list)
    multirun: bool = False
    # hydra.output_subdir as the config sets it (read by the pre-flight): rode writes
    # it into each job's dir itself, once the dir has passed its check
    output_subdir: str | None = None

    @property
    def only_prints(self) -> bool:
        """--help, --cfg, --info ...: Hydra answers; no job runs, nothing is written."""
        return any(getattr(self.args, name, None) for name in _ONLY_PRINT)

    @property
    def config_name(self) -> str:
        return self.args.config_name or self.task


def read(task: str, flags: list[str], overrides: list[str]) -> Route:
    """Parse Hydra's flags as Hydra will; refuse those that run a job rode cannot check."""
    args = _parser().parse_args([*flags, *overrides])
    if args.experimental_rerun is not None:
        raise ConfigError("--experimental-rerun replays a pickled config that rode cannot "
                          "check; run the command again with the overrides in "
                          "<run dir>/.hydra/overrides.yaml")
    commands = [name for name, given in (("--run", args.run), ("--multirun", args.multirun),
                                         ("--cfg", args.cfg is not None),
                                         ("--info", args.info is not None),
                                         ("--shell-completion", args.shell_completion)) if given]
    if len(commands) > 1:
        raise ConfigError(f"{' and '.join(commands)} cannot be given together; choose one of "
                          f"--run, --multirun, --cfg, --info, --shell-completion")
    if args.resolve and args.cfg is None and not args.help:
        raise ConfigError("--resolve goes with --cfg (or --help)")
    route = Route(task, args, list(overrides), multirun=bool(args.multirun))
    if not route.only_prints and not route.multirun and _may_set_mode(route):
        route.multirun = _config_mode(route) == "MULTIRUN"
    return route


@contextlib.contextmanager
def initialize(route: Route | None):
    """Hydra set up as the command line sets it up: rode's configs, and the flags'
    --config-path / --config-dir (the compose API then reads the same configs)."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path, detect_task_name
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    args = route.args if route is not None else argparse.Namespace(config_path=None,
                                                                   config_dir=None)
    version.setbase("1.3")
    GlobalHydra.instance().clear()
    # as hydra.main in runner.cli sets them up: its search path and job name (so that the
    # app's loads reuse what the pre-flight composed; see composing.cached_loads)
    search_path = create_automatic_config_search_path(None, "runner.cli",
                                                      args.config_path or "conf")
    if args.config_dir is not None:
        where = os.path.abspath(args.config_dir)
        if not os.path.isdir(where):
            raise ConfigError(f"--config-dir={args.config_dir}: {where} is not a directory")
        search_path.prepend(provider="command-line", path=f"file://{where}",
                            anchor=SearchPathQuery(provider="schema"))
    try:
        Hydra.create_main_hydra2(task_name=detect_task_name(None, "runner.cli"),
                                 config_search_path=search_path)
        yield
    finally:
        GlobalHydra.instance().clear()


def _may_set_mode(route: Route) -> bool:
    """Whether hydra.mode can come from anything but rode's own task configs (which set
    none): a hydra.* override, a config group option, or a config from the flags.
    Reading the mode costs a full composition, so the plain case skips it."""
    args = route.args
    if args.config_dir or args.config_name or args.config_path:
        return True
    from .schema import TASK_SCHEMAS

    keys = TASK_SCHEMAS[route.task].fields
    for word in route.overrides:
        key = word.split("=", 1)[0].lstrip("+~").split(".")[0].split("/")[0]
        # a schema key (dataset=, model= included: their options are packaged under
        # their key) cannot set hydra.*; hydra.mode=, experiment=, hparams_search= can
        if key not in keys:
            return True
    return False


def _config_mode(route: Route) -> str | None:
    """hydra.mode as the config and overrides set it (``--run`` does not override it)."""
    from . import composing

    try:
        with initialize(route):   # as Hydra.get_mode composes, its defaults cached
            mode = composing.compose(route.config_name, list(route.overrides),
                                     return_hydra_config=True, multirun=True).hydra.mode
    except ConfigError:
        raise
    except Exception:   # a bad override: validation reports it, in one line
        return None
    return None if mode is None else mode.name


def check_out_dirs(task: str, jobs: list, writes_runs: bool) -> None:
    """``out_dir=<dir>`` on the command line is a run dir like Hydra's: writable, and
    holding no other run's (or another task's) results; one dir for every job of a
    sweep is refused (each would overwrite the last)."""
    from omegaconf import OmegaConf

    from . import config, rundir

    seen = {}
    for cfg in jobs:
        try:
            value = OmegaConf.select(cfg, "out_dir", default=None)
        except Exception:   # interpolates Hydra's dir: checked as hydra.*.dir
            continue
        if value is None or "${" in str(value):
            continue
        config.check_writable_dir(value, "out_dir")
        if writes_runs and not (cfg.get("resume") and cfg.get("resume") != "null"):
            rundir.check_fresh(value, "out_dir", sweep=False, task=task)
        seen.setdefault(str(Path(str(value)).expanduser().absolute()), []).append(cfg)
    if len(jobs) > 1 and any(len(v) > 1 for v in seen.values()):
        where = next(k for k, v in seen.items() if len(v) > 1)
        raise ConfigError(f"out_dir={where} is the same dir for {len(jobs)} jobs: each would "
                          f"overwrite the last; leave out_dir out (one dir per job)")


def check_resume_dir(overrides: list[str], task: str = "train") -> None:
    """``resume=<run> hydra.run.dir=<other dir>``: Hydra would write its .hydra/ and log
    there, so that dir must hold no finished run's results."""
    from . import rundir

    values = {o.split("=", 1)[0].lstrip("+"): o.split("=", 1)[1] for o in overrides if "=" in o}
    resume, run_dir = values.get("resume"), values.get("hydra.run.dir")
    if resume is None or run_dir is None or rundir.unquote(resume) in ("auto", "null", ""):
        return
    run_dir = Path(rundir.unquote(run_dir)).expanduser()
    try:
        own = rundir.locate(rundir.unquote(resume), "resume").parent
    except ConfigError:
        return   # reported by validation, in its own words
    if run_dir.absolute() != own.absolute():
        rundir.check_fresh(run_dir, "hydra.run.dir", sweep=False, task=task)


def check_job_dir(task: str, cfg, writes_runs: bool) -> None:
    """At the start of every job, inside the app (sweeper-sampled and remote jobs too):
    a job that does not resume must not start in a dir holding a run's results."""
    from . import rundir

    if not writes_runs or "out_dir" not in cfg:
        return
    if cfg.get("resume"):
        return   # resume= writes into the checkpoint's run; auto checks the config there
    try:
        out_dir = cfg.out_dir
    except Exception:
        return   # reported by validation
    found = rundir.results_in(Path(str(out_dir)))
    if found is not None:
        raise ConfigError(f"out_dir={out_dir} already holds results ({found.name}); "
                          + rundir.fresh_hint(task, "dir", out_dir))


# Added to the command line of a task that writes runs: Hydra writes no .hydra/ before
# the job starts; write_hydra_dir writes it once the job's dir has passed its check.
NO_HYDRA_DIR = "hydra.output_subdir=null"


def write_hydra_dir(cfg, subdir: str) -> None:
    """What Hydra writes into ``<job dir>/<subdir>`` (config.yaml, hydra.yaml,
    overrides.yaml), as Hydra writes it, but only now that the job's dir is known not to
    hold another run: Hydra writes it before any code of the job runs."""
    import copy

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict, read_write

    hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
    with read_write(hydra_cfg.hydra), open_dict(hydra_cfg.hydra):
        hydra_cfg.hydra.output_subdir = subdir   # as if NO_HYDRA_DIR had not been added
        words = list(hydra_cfg.hydra.overrides.hydra)
        if NO_HYDRA_DIR in words:
            del words[len(words) - 1 - words[::-1].index(NO_HYDRA_DIR)]
        hydra_cfg.hydra.overrides.hydra = words
    out = Path(hydra_cfg.hydra.runtime.output_dir) / subdir
    with naming(out):
        out.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg),
                       ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        with atomic_open(out / name, encoding="utf-8") as f:
            f.write(OmegaConf.to_yaml(node))


def sweep_job_dir(cfg, num: int) -> str | None:
    """A sweep job's dir as Hydra's launcher makes it: hydra.sweep.dir joined with
    hydra.sweep.subdir, evaluated with hydra.job.num (and .id) = the job's index
    (``${hydra.job.override_dirname}`` is the job's own); None without a sweep dir."""
    from omegaconf import OmegaConf, open_dict, read_write
    from omegaconf.errors import OmegaConfBaseException

    try:
        with read_write(cfg.hydra.job), open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
            cfg.hydra.job.id = num
        sweep_dir = OmegaConf.select(cfg, "hydra.sweep.dir", default=None)
        subdir = OmegaConf.select(cfg, "hydra.sweep.subdir", default=None)
    except OmegaConfBaseException as e:
        # with the job's number set, the launcher would fail the same way, after
        # writing the sweep dir's multirun.yaml
        raise ConfigError(omegaconf_message(e)) from None
    if sweep_dir is None:
        return None
    return os.path.join(str(sweep_dir), str(subdir)) if subdir is not None else str(sweep_dir)


def check_sweep_job_dirs(job_dirs: list, task: str | None = None) -> None:
    """Each sweep job's own dir (``hydra.sweep.subdir`` may point anywhere, even into
    a finished run) must hold no run's results: checked before Hydra writes anything."""
    from . import rundir

    for num, path in enumerate(job_dirs):
        if path is None:
            continue
        found = rundir.results_in(Path(path).expanduser())
        if found is not None:
            hint = rundir.fresh_hint(task, "hydra.sweep.dir or hydra.sweep.subdir", path)
            raise ConfigError(f"hydra.sweep.subdir: job {num}'s dir {path} already holds a run "
                              f"({found.name}); {hint}")


class AlreadyFinished(Exception):
    """resume=auto on a run that is over: nothing runs, nothing is rewritten (exit 0)."""


def check_not_finished(task: str, out_dir) -> None:
    """resume=auto into a finished run (every epoch, or an early stop): raise
    AlreadyFinished before Hydra rewrites the run's .hydra/ and log."""
    from . import rundir

    path = Path(str(out_dir)).expanduser()
    if (path / rundir.CHECKPOINT).is_file() and rundir.finished(path):
        raise AlreadyFinished(f"already finished -> {path} (nothing rewritten)")


def override_keys(overrides: list[str]) -> list[str]:
    """The dotted keys the command line sets (not Hydra's own)."""
    keys = []
    for word in overrides:
        key = word.split("=", 1)[0].lstrip("+~")
        if "=" in word and not key.startswith("hydra") and "/" not in key:
            keys.append(key)
    return keys


def check_task_overrides(task: str, overrides: list[str], jobs: list) -> None:
    """Checks that need to know what the command line set, not only the config:
    gradcheck with checkpoint= refuses architecture keys that contradict it."""
    if task == "gradcheck":
        from .tasks.gradcheck import contradictions

        for cfg in jobs:
            contradictions(cfg, override_keys(overrides))


@contextlib.contextmanager
def one_line_errors():
    """OmegaConf's errors met while composing and validating (an interpolation to a
    missing key or environment variable): one line naming the key."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except OmegaConfBaseException as e:
        raise ConfigError(omegaconf_message(e)) from None


def omegaconf_message(e) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    key = getattr(e, "full_key", None)
    text = text.replace("KeyError raised while resolving interpolation: ", "")
    if "interpolation" in type(e).__name__.lower() or "nterpolation" in text:
        text += " (fix the ${...} in the value, or set the variable)"
    return f"{key}: {text}" if key else text


def check_group_values(parsed, task: str) -> None:
    """``logger=null`` and other config groups given null or an unreadable option:
    refused with the group's options (Hydra raises a bare ValueError for null)."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    for o in parsed:
        key = o.get_key_element().lstrip("+~")
        if o.is_hydra_override() or o.is_sweep_override() or "." in key or o.value() is not None:
            continue
        options = loader.get_group_options(key)   # builds a config repository: only for null
        if options:
            raise ConfigError(f"{key}=null: {key} is a config group; choose from "
                              f"{', '.join(options)} (a list for several, [] for none)")


def unreadable_value(task: str, overrides: list[str]) -> str | None:
    """For an override Hydra's grammar cannot read (``method=éuler``): which one,
    and what the key accepts, or None."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .schema import TASK_SCHEMAS

    parser = OverridesParser.create()
    for word in overrides:
        try:
            parser.parse_overrides([word])
        except Exception:
            key = word.split("=", 1)[0].lstrip("+~")
            spec = TASK_SCHEMAS[task].fields.get(key)
            accepted = None
            if spec is not None and getattr(spec, "choices", None):
                accepted = ", ".join(map(str, spec.choices))
            elif GlobalHydra.instance().is_initialized():
                options = GlobalHydra.instance().config_loader().get_group_options(key)
                accepted = ", ".join(options) or None
            hint = (f"choose from {accepted}" if accepted
                    else "quote a value with characters other than letters, digits and "
                         "_-./: in '...'")
            return f"{word} cannot be read: {hint}"
    return None


def interrupted(cfg, writes_runs: bool):
    """A second Ctrl-C stops at once: an Interrupted error (exit 130) whose one line
    says what is kept, and a failed summary where the run writes one."""
    import signal

    from . import rundir
    from .errors import Interrupted

    message = ("stopped at once by a second Ctrl-C; results after the last checkpoint are "
               "lost (continue with resume=<run dir> where it holds checkpoint.pt)")
    if writes_runs:
        try:
            rundir.write_failed_summary(cfg.out_dir, message)
        except Exception:
            pass
    return Interrupted(message, signal.SIGINT)
