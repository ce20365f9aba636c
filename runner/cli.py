"""The `rode` command: a thin dispatcher from `rode <task> [overrides]` to Hydra.

Hydra has no sub-commands, so the task word is popped from the command line and
the task's own Hydra app (config ``conf/<task>.yaml``) is run with the rest.
Before anything runs, every job's config is composed and validated, so bad input
costs one line on stderr and exit code 2, and nothing already written is touched.
"""
from __future__ import annotations

import os
import signal
import sys

from . import _catch_early_interrupt, _interrupted_early

# `python -m runner` imports the package before sys.argv[0] names runner/__main__.py
_EARLY = _catch_early_interrupt()

import contextlib  # noqa: E402
import itertools  # noqa: E402

from . import config, once, routes, rundir, threads  # noqa: E402
from .errors import ConfigError, Interrupted, RodeError, RunFailed  # noqa: E402
from .schema import TASK_SCHEMAS, has_key  # noqa: E402
from .tasks import TASKS, environment_check, load_task  # noqa: E402

_MAX_COMBINATIONS = 256


def usage() -> str:
    width = max(map(len, TASKS))
    lines = ["usage: rode [-m] <task> [key=value ...] [--help]", "       rode --version",
             "", "tasks:"]
    lines += [f"  {name:<{width}}  {task.description}" for name, task in TASKS.items()]
    lines += ["", "examples:",
              "  rode train depth=1000 method=heun grad=adjoint",
              "  rode -m train depth=8,16,32 method=euler,heun",
              "  rode train --help        # the task's keys and the values each accepts",
              "  rode --version           # rode's, torch's and Hydra's versions"]
    return "\n".join(lines)


def split_argv(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """-> (task, hydra flags, overrides), the flags as Hydra's own parser reads them."""
    return routes.split_argv(argv)


def bind_positional(key: str | None, overrides: list[str]) -> list[str]:
    """``rode <task> <word>`` for a task with a positional key: the one bare word (or an
    existing path, which may hold '=' and ',' as Hydra's job dirs do) becomes
    ``<key>='<word>'``, quoted so that Hydra reads it as one string."""
    if not key:
        return overrides
    bare = [w for w in overrides if "=" not in w or os.path.exists(w)]
    if len(bare) > 1:
        raise ConfigError(f"expected one {key}, got {len(bare)}: {' '.join(bare)}")

    def quoted(word: str) -> str:
        return "'" + word.replace("'", "\\'") + "'"

    return [f"{key}={quoted(w)}" if w in bare else w for w in overrides]


# Old spellings that still work, with a note: old key -> new key (one list, in runner.config).
RENAMED = config.RENAMED
# Experiments are named after their task now (conf/experiment/<task>*.yaml): old -> new.
RENAMED_EXPERIMENTS = {"grad_error": "gradcheck", "grad_error_full": "gradcheck_full",
                       "test_error": "train", "test_error_full": "train_full", "deep": "bench_deep",
                       "finetune_pretrain": "train_pretrain",
                       "finetune_pretrain_full": "train_pretrain_full"}


def renamed_keys(task: str, overrides: list[str], notes: list[str] | None = None) -> list[str]:
    """``batch=64`` -> ``batch_size=64`` (and ``+batch``, ``~batch``) for tasks that renamed
    it; a note for each goes to ``notes`` (printed once the command line is valid)."""
    out = []
    for word in overrides:
        key, eq, value = word.partition("=")
        prefix = key[:len(key) - len(key.lstrip("+~"))]
        bare = key[len(prefix):]
        if bare == "experiment" and task in _EXPERIMENT_TASKS:
            word = _renamed_experiment(task, prefix, value, notes)
            out.append(word)
            continue
        new = RENAMED.get(bare)
        if new and has_key(task, new) and not has_key(task, bare):
            if notes is not None:
                notes.append(f"rode {task}: note: {bare}= is now {new}= (the old name works for now)")
            word = f"{prefix}{new}{eq}{value}"
        out.append(word)
    return out


_EXPERIMENT_TASKS = ("train", "gradcheck", "memory", "bench", "discretization", "linear", "finetune")


def _renamed_experiment(task: str, prefix: str, value: str, notes: list[str] | None) -> str:
    """``+experiment=grad_error`` -> ``experiment=gradcheck``: experiments are a config
    group of every task (no '+'), named after their task."""
    said = []
    if prefix == "+":
        prefix = ""
        said.append("+experiment= is now experiment=")
    if value in RENAMED_EXPERIMENTS:
        said.append(f"experiment={value} is now experiment={RENAMED_EXPERIMENTS[value]}")
        value = RENAMED_EXPERIMENTS[value]
    if said and notes is not None:
        notes.append(f"rode {task}: note: {'; '.join(said)} (the old form works for now)")
    return f"{prefix}experiment={value}"


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except KeyboardInterrupt:   # at any moment no handler below covers: one line, no traceback
        _die("interrupted (Ctrl-C) before the run started; nothing was run", 128 + signal.SIGINT)


def _main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    task, flags, overrides = split_argv(argv)
    if "--version" in flags:
        print(version_text())
        sys.exit(0)
    if task is None:
        if any(f in ("-h", "--help") for f in flags):
            print(usage())
            sys.exit(0)
        _die("no task given; choose from " + ", ".join(TASKS) + " (rode --help for more)")
    if task not in TASKS:
        _die(f"unknown task {task!r}; choose from {', '.join(TASKS)}")

    try:
        overrides = bind_positional(TASKS[task].positional, overrides)
        notes: list[str] = []
        overrides = renamed_keys(task, overrides, notes)
        route = routes.read(task, flags, overrides)
        if "resume" in TASK_SCHEMAS[task].fields:
            routes.check_resume_dir(overrides, task)
            overrides = rundir.prepare_resume(overrides, route.multirun)
        if route.args.help:   # the keys and the values each accepts, from the schema
            with routes.one_line_errors():
                print(task_help(task, route, overrides))
            return
        if route.multirun and not route.only_prints:   # the workers' imports start now
            threads.preload_workers(TASKS[task].module, overrides)
        if not route.only_prints:   # --cfg, --hydra-help ...: Hydra answers, no job runs
            with routes.one_line_errors():
                validate_overrides(task, overrides, route.multirun, route)
        for note in notes:
            print(note, file=sys.stderr)
        # Hydra writes .hydra/ into a job's dir before the job's own check of that dir
        # can run: a task that writes runs writes it itself, after the check.
        workers = _worker_overrides()
        later = (route.output_subdir if TASKS[task].writes_runs and not route.only_prints
                 and not workers else None)
        # Until here nothing was written: Ctrl-C ended the process with one line (an
        # interrupt inside Hydra's or OmegaConf's code could surface as another error).
        # From here on, the run's own handlers say what was kept.
        if _EARLY and signal.getsignal(signal.SIGINT) is _interrupted_early:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        _run_hydra_app(task, flags + overrides + workers
                       + ([routes.NO_HYDRA_DIR] if later is not None else []), later)
    except routes.AlreadyFinished as done:   # resume=auto on a finished run: nothing to do
        print(f"rode {task}: {done}", flush=True)
    except KeyboardInterrupt:   # Ctrl-C before the run started (or between jobs)
        _die("interrupted (Ctrl-C) before the run started; nothing was run", 130, task)
    except _StopRequested as stop:
        _die(str(stop.error), stop.error.exit_code, task)
    except RodeError as e:
        _die(str(e), e.exit_code, task)
    except OSError as e:   # outside a job: Hydra's sweep dir, multirun.yaml
        _die(rundir.os_error_message(e), 1, task)
    except Exception as e:  # Hydra's own composition / parse errors: still one line
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException
        if isinstance(e, HydraException):
            _die(_hydra_message(e, overrides, task), 2, task)
        if isinstance(e, OmegaConfBaseException):   # a ${...} only Hydra's launcher resolves
            _die(routes.omegaconf_message(e), 2, task)
        raise


def version_text() -> str:
    """``rode --version``: rode's version, and torch's and Hydra's (read from their
    installed metadata, so that this stays fast: torch is imported only without it)."""
    from importlib import metadata

    from . import __version__

    def installed(dist: str, module: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            try:
                return __import__(module).__version__
            except ImportError:
                return "not installed"

    return (f"rode {__version__}\ntorch {installed('torch', 'torch')}\n"
            f"hydra-core {installed('hydra-core', 'hydra')}")


def task_help(task: str, route: routes.Route, overrides: list[str]) -> str:
    """``rode <task> [overrides] --help``: the task's config groups, then each key with
    its value under these overrides and the values it accepts (from its schema)."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from . import keyhelp

    with routes.initialize(route):
        try:   # a sweep (depth=4,8) is shown at its first value
            parsed = OverridesParser.create().parse_overrides(list(overrides))
            words = [f"{o.get_key_element()}={_sweep_values(o)[0]}" if o.is_sweep_override()
                     else o.input_line for o in parsed]
            cfg = compose(config_name=route.config_name, overrides=words)
        except HydraException as e:
            raise ConfigError(_hydra_message(e, overrides, task)) from None
        hydra = GlobalHydra.instance().hydra
        loader = hydra.config_loader
        groups = {g: sorted(loader.get_group_options(g))
                  for g in sorted(hydra.list_all_config_groups()) if not g.startswith("hydra")}
    plain = OmegaConf.to_container(cfg, resolve=False)
    return keyhelp.render(task, plain, groups, TASKS[task].description)


class _StopRequested(BaseException):
    """Carries an Interrupted (or a single run's failure) past Hydra's per-job
    ``except Exception``, to be printed as one line by main()."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


def _die(message: str, code: int = 2, task: str | None = None) -> None:
    prefix = f"rode {task}" if task else "rode"
    print(f"{prefix}: error: {message}", file=sys.stderr)
    sys.exit(code)


def _worker_overrides() -> list[str]:
    """Under torchrun only rank 0 writes: the other processes leave no .hydra/ and no log."""
    if int(os.environ.get("RANK", 0) or 0) == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=disabled"]


def _run_hydra_app(task: str, argv: list[str], hydra_subdir: str | None = None) -> None:
    """Run the task's Hydra app; ``hydra_subdir``: Hydra's output_subdir (.hydra), which
    the app writes itself once each job's dir has passed its check."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    # Let exceptions reach us instead of Hydra printing a trimmed traceback.
    os.environ["HYDRA_FULL_ERROR"] = "1"

    @hydra.main(config_path="conf", config_name=task, version_base="1.3")
    def app(cfg):
        module = load_task(task)   # here: `rode <task> --help` need not import torch
        try:
            routes.check_job_dir(task, cfg, TASKS[task].writes_runs)
            if hydra_subdir is not None:
                routes.write_hydra_dir(cfg, hydra_subdir)
            # Only the stages the pre-flight did not already pass for this job's config
            # (a point a sweeper sampled, a job on another machine: every stage).
            config.validate(task, cfg, environment=environment_check(task),
                            skip=once.passed(once.job_key(task, cfg)))
            result = module.run(cfg)
            # A sweeper (hparams_search=optuna) optimises what the app returns.
            objective = TASKS[task].objective_function()
            return objective(cfg, result) if objective and isinstance(result, dict) else result
        except Interrupted as e:
            # Hydra records a job's Exception and goes on to the next job of a sweep;
            # a stop request (SIGTERM on a preempted node, Ctrl-C) must end the sweep.
            raise _StopRequested(e) from None
        except RodeError as e:
            # A single run ends with our one line only (Hydra would add its own
            # "Error executing job" line); in a sweep a failed job costs only itself.
            if HydraConfig.get().mode == RunMode.RUN:
                raise _StopRequested(e) from None
            raise
        except KeyboardInterrupt:
            # a second Ctrl-C (the first asks for a checkpoint; see checkpoint.StopSignals)
            raise _StopRequested(routes.interrupted(cfg, TASKS[task].writes_runs)) from None
        except OSError as e:
            # A full disk, a lost permission: one line naming the cause and the file.
            failed = RunFailed(rundir.os_error_message(e))
            if TASKS[task].writes_runs:
                rundir.write_failed_summary(cfg.out_dir, str(failed))
            if HydraConfig.get().mode == RunMode.RUN:
                raise _StopRequested(failed) from None
            raise failed from None

    from . import composing

    saved = sys.argv
    sys.argv = [f"rode {task}", *argv]
    try:
        with composing.cached_loads():   # the pre-flight composed each job's config
            app()
    finally:
        sys.argv = saved


# ---------------------------------------------------------------- validation
def validate_overrides(task: str, overrides: list[str], multirun: bool,
                       route: routes.Route | None = None) -> None:
    """Compose and validate the config of every job the command line describes: the
    schema and rules of every job first (no torch), then the task's own checks, then
    the output dir. Nothing is written before all of them pass."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from . import composing

    config_name = route.config_name if route is not None else task
    once.forget()   # a new command: what an earlier one in this process checked does not count
    with routes.initialize(route):
        try:
            parsed = OverridesParser.create().parse_overrides(overrides)
        except HydraException as e:
            raise ConfigError(routes.unreadable_value(task, overrides)
                              or _hydra_message(e, overrides, task)) from None
        routes.check_group_values(parsed, task)
        axes = []
        for o in parsed:
            if o.is_hydra_override():
                continue
            if o.is_sweep_override():
                if not multirun:
                    raise ConfigError(f"{o.input_line} is a sweep; add -m to run one job per value")
                axes.append([f"{o.get_key_element()}={v}" for v in _sweep_values(o)])
            else:
                axes.append([o.input_line])
        hydra_overrides = [o.input_line for o in parsed if o.is_hydra_override()
                           and not o.is_sweep_override()]
        # hydra.sweeper.params.<key>=interval(...) on the command line: a search space
        prefix = "hydra.sweeper.params."
        more_space = {o.key_or_group[len(prefix):]: _sweep_values(o) for o in parsed
                      if o.is_hydra_override() and o.is_sweep_override()
                      and o.key_or_group.startswith(prefix)}
        intervals = _float_intervals(parsed)   # for a hint when an integer key gets floats
        key, out_dir, jobs = ("hydra.sweep.dir" if multirun else "hydra.run.dir"), None, []
        keys: list[str] = []   # each job's runner.once key, taken before anything changes it
        job_dirs: list[str | None] = []   # a sweep's job dirs, as its launcher makes them
        dir_error = None
        for combo in _combinations(axes):
            try:
                cfg = composing.compose(config_name, [*combo, *hydra_overrides],
                                        return_hydra_config=True)
            except HydraException as e:
                raise ConfigError(_hydra_message(e, list(combo), task)) from None
            try:
                out_dir = out_dir or OmegaConf.select(cfg, key, default=None)
            except OmegaConfBaseException as e:
                dir_error = e   # the dir depends on a value validate() may report as missing
            if route is not None and not jobs:
                route.output_subdir = OmegaConf.select(cfg, "hydra.output_subdir", default=None)
            if multirun:
                job_dirs.append(routes.sweep_job_dir(cfg, len(jobs)))
            space = _parse_space(cfg)
            searched = _search_points({**_search_space(space), **more_space})
            with open_dict(cfg):
                del cfg["hydra"]
            with _float_interval_hint(intervals):
                stages = config.validate(task, cfg)
            keys.append(once.job_key(task, cfg))
            once.record(keys[-1], stages)
            jobs.append(cfg)
            for searched_point in (searched if len(jobs) == 1 else []):
                # a sweeper's search space (hparams_search=...): every value it can take
                try:
                    point = composing.compose(config_name,
                                              [*combo, *hydra_overrides, *searched_point])
                except HydraException as e:
                    raise ConfigError("hydra.sweeper.params: "
                                      + _hydra_message(e, searched_point, task)) from None
                with _search_space_origin(space, parsed, overrides), \
                        _float_interval_hint({**intervals, **_float_intervals(space)}):
                    config.validate(task, point)
        if out_dir is None and dir_error is not None:
            raise ConfigError(routes.omegaconf_message(dir_error))
        auto = bool(jobs and jobs[0].get("resume") == "auto")
        for job_key, cfg in zip(keys, jobs, strict=True):
            if auto and not multirun and out_dir is not None:
                cfg.out_dir = out_dir   # resume=auto checks the checkpoint there, if any
            once.record(job_key, config.validate(task, cfg, environment=environment_check(task),
                                                 skip=once.passed(job_key)))
        routes.check_task_overrides(task, overrides, jobs)
        routes.check_out_dirs(task, jobs, TASKS[task].writes_runs)
        if out_dir is not None:   # last: a bad value elsewhere creates nothing
            config.check_writable_dir(out_dir, key)
            for job_dir in dict.fromkeys(d for d in job_dirs if d is not None):
                config.check_writable_dir(job_dir, "hydra.sweep.subdir")
            resuming = bool(jobs and jobs[0].get("resume")) and not auto
            if TASKS[task].writes_runs and not resuming:
                rundir.check_fresh(out_dir, key, multirun, auto=auto, task=task)
                if not auto:
                    routes.check_sweep_job_dirs(job_dirs, task)
            if auto and not multirun:
                routes.check_not_finished(task, out_dir)


def _sweep_values(o) -> list[str]:
    """The values of one sweep override: each value of a list or range; for a search
    space a sweeper samples (interval(a,b), tag(log, interval(...)), choice(...)) each
    choice, or an interval's two ends, so that the key and its type are still checked."""
    from hydra.core.override_parser.types import IntervalSweep

    value = o.value()
    if isinstance(value, IntervalSweep):
        ends = [value.start, value.end]
        if all(float(v).is_integer() for v in ends) and "log" not in (value.tags or set()) \
                and not any(isinstance(v, float) for v in ends):
            ends = [int(v) for v in ends]
        return [str(v) for v in ends]
    try:
        return list(o.sweep_string_iterator())
    except Exception:
        return [str(value)]


@contextlib.contextmanager
def _float_interval_hint(intervals: dict[str, str]):
    """A key refused as not an integer because ``interval(a, b)`` (which samples
    floats) gave it its value: say so, and how to sample integers.
    ``intervals``: key -> its interval, as written."""
    try:
        yield
    except ConfigError as e:
        message = str(e)
        key = message.split("=", 1)[0]
        if "must be an integer" not in message or key not in intervals:
            raise
        raise ConfigError(f"{message}; interval() samples floats: for integers write "
                          f"'{key}=int({intervals[key]})'") from None


@contextlib.contextmanager
def _search_space_origin(space: list, parsed, overrides: list[str]):
    """A value of a sweeper's search space refused: say that it came from the search
    space, where that was written (the command line, or the hparams_search config),
    and the whole space of that key. ``space``: the config's search space, parsed."""
    try:
        yield
    except ConfigError as e:
        message = str(e)
        prefix = "hydra.sweeper.params."
        given = {o.key_or_group[len(prefix):]: o.input_line for o in parsed
                 if o.key_or_group.startswith(prefix)}
        configured = {o.get_key_element(): o.input_line.split("=", 1)[1] for o in space}
        key = next((k for k in sorted({*given, *configured}, key=len, reverse=True)
                    if message.startswith((f"{k}=", f"{k}:", f"{k} "))), None)
        if key is None:
            raise
        if key in given:
            where = f"{given[key]} on the command line"
        else:
            chosen = next((w.lstrip("+") for w in overrides
                           if w.lstrip("+").startswith("hparams_search=")), None)
            source = f"the {chosen} config" if chosen else "the config"
            where = f"{prefix}{key}: {configured[key]} in {source}"
        raise ConfigError(f"{message} (a value of the sweeper's search space, {where})") from None


def _float_intervals(overrides) -> dict[str, str]:
    """{key: 'interval(a, b)'} for the parsed overrides that sample floats from an
    interval (no ``int(...)`` around it); ``hydra.sweeper.params.`` keys unprefixed."""
    from hydra.core.override_parser.types import IntervalSweep

    out = {}
    for o in overrides:
        value = o.value() if o.is_sweep_override() else None
        if isinstance(value, IntervalSweep) and any(isinstance(v, float)
                                                    for v in (value.start, value.end)):
            key = o.get_key_element().removeprefix("hydra.sweeper.params.")
            out[key] = f"interval({value.start:g}, {value.end:g})"
    return out


def _parse_space(cfg) -> list:
    """hydra.sweeper.params (a sweeper plugin's search space), parsed as overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
    if not params:
        return []
    words = [f"{k}={v}" for k, v in params.items()]
    try:
        return OverridesParser.create().parse_overrides(words)
    except Exception as e:
        raise ConfigError(f"hydra.sweeper.params: {str(e).strip().splitlines()[0]}") from None


def _search_space(space: list) -> dict[str, list[str]]:
    """A search space (:func:`_parse_space`) as {key: every value a sweeper can give it}
    (each choice, an interval's two ends)."""
    return {o.get_key_element(): _sweep_values(o) if o.is_sweep_override()
            else [o.input_line.split("=", 1)[1]] for o in space}


def _search_points(space: dict[str, list[str]]) -> list[list[str]]:
    """Points of a search space (as overrides) that give every key each of its values
    once: each key at its first value, then one key at a time at each other value, so
    that ``choice(4, 0, -3)`` is refused before trial 1 however the sweeper samples."""
    if not space:
        return []
    base = {k: values[0] for k, values in space.items()}
    points = [base]
    for key, values in space.items():
        points += [{**base, key: v} for v in values[1:]]
    return [[f"{k}={v}" for k, v in point.items()] for point in points]


def _combinations(axes: list[list[str]]):
    """Every job of the sweep, or (when there are too many) each value once."""
    total = 1
    for values in axes:
        total *= len(values)
    if total <= _MAX_COMBINATIONS:
        yield from itertools.product(*axes)
        return
    base = [values[0] for values in axes]
    for k, values in enumerate(axes):
        for v in values:
            yield tuple(base[:k] + [v] + base[k + 1:])


def _hydra_message(e: Exception, overrides: list[str], task: str | None = None) -> str:
    """One line from Hydra's multi-line composition errors, naming the valid choices."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    text = str(e)
    if "Could not load 'hydra/launcher/" in text:
        option = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra/launcher=")), "")
        return (f"hydra/launcher={option} needs the launcher plugins: "
                f"pip install 'rode[cluster]'")
    found = next((w for w in ("Could not find '", "Could not load '") if w in text), None)
    if (isinstance(e, MissingConfigException) or found == "Could not load '") and found:
        missing = text.split(found, 1)[1].split("'", 1)[0]
        group, _, option = missing.rpartition("/")
        if group and GlobalHydra.instance().is_initialized():
            options = GlobalHydra.instance().config_loader().get_group_options(group)
            return f"{group}={option!r} is not a valid choice; choose from {', '.join(options)}"
        return f"{missing!r} not found"
    if "Could not override '" in text:
        key = text.split("Could not override '", 1)[1].split("'", 1)[0]
        from .keyhelp import unknown_key

        return unknown_key(task, key)
    if "Could not append to config. An item is already at '" in text:
        key = text.split("'")[1]
        return f"{key!r} already exists; set it without the '+'"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        first += ": " + str(cause).strip().splitlines()[0]
    return first


if __name__ == "__main__":
    main()
