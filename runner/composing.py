"""Hydra's compose, with the defaults-list part done once per group selection.

The pre-flight (``cli.validate_overrides``) composes the config of every job a command
line describes: every combination of a sweep, every point of a search space. Most of
a Hydra composition (reading the YAML files, building the defaults list, merging the
selected options) depends only on the config name, the search path and the config
*group* overrides (``dataset=mnist``, ``model=conv``); the value overrides
(``depth=8``, ``+x=1``, ``hydra.run.dir=...``) are applied on top by Hydra's own
``_apply_overrides_to_config``. So a sweep over ``depth=8,16,...,1024`` composes the
defaults once and applies each value to a copy.

``compose`` returns what ``hydra.compose`` returns (the same config, flags, hydra node
and errors): it replays the steps Hydra's ``ConfigLoaderImpl._load_configuration_impl``
runs after the defaults are composed. The multirun composition that reads ``hydra.mode``
reuses a run's of the same group choices (they differ only where a group default is
missing). ``cached_loads`` routes the Hydra app's own loads (its mode check, the run,
each job of a sweep) through the same cache, so the app does not compose from the YAML
files again what the pre-flight composed. Nothing is cached (Hydra's own compose runs)
when a ``hydra.searchpath`` override or a config source other than files and packages
is in play; a cached entry is dropped when any config file under the search path
changes (path, size or mtime) or when a structured config is registered.
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading

_CACHE: dict = {}
_REPOS: dict = {}
_MAX = 64   # group selections kept per process


def clear() -> None:
    _CACHE.clear()
    _REPOS.clear()


def _tree_stamp(root) -> tuple | None:
    """(relative path, size, mtime) of every file under a config dir, or None if unknown."""
    stamp = []
    try:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                st = os.stat(os.path.join(dirpath, name))
                stamp.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_size,
                              st.st_mtime_ns))
    except OSError:
        return None
    return tuple(stamp)


def _sources_stamp(loader) -> tuple | None:
    """What the composed configs depend on besides the overrides: every config source's
    files (and the structured configs registered in this process); None when a source
    cannot be stamped (then nothing is cached)."""
    import importlib.resources

    from hydra.core.config_store import ConfigStore

    stamp = []
    for element in loader.config_search_path.get_path():
        path = element.path or ""
        if path.startswith("pkg://"):
            package = path[len("pkg://"):].replace("/", ".").rstrip(".")
            try:
                where = importlib.resources.files(package)
            except (ModuleNotFoundError, TypeError, ValueError):
                stamp.append((element.provider, path, None))
                continue
            if not isinstance(where, os.PathLike) or not os.path.isdir(where):
                return None
            files = _tree_stamp(os.fspath(where))
        elif path.startswith("file://"):
            files = _tree_stamp(path[len("file://"):]) if os.path.isdir(path[7:]) else ()
        elif path.startswith("structured://"):
            files = ()
        else:
            return None
        if files is None:
            return None
        stamp.append((element.provider, path, files))

    def names(node, prefix=""):
        for key in sorted(node):
            value = node[key]
            if isinstance(value, dict):
                yield from names(value, f"{prefix}{key}/")
            else:
                yield f"{prefix}{key}", id(value)

    stamp.append(tuple(names(ConfigStore.instance().repo)))
    return tuple(stamp)


def compose(config_name: str, overrides: list[str], return_hydra_config: bool = False,
            multirun: bool = False):
    """``hydra.compose(config_name, overrides, return_hydra_config)``, under an
    initialized GlobalHydra, reusing the composed defaults of an earlier call with the
    same group overrides. ``multirun``: as Hydra composes to read ``hydra.mode``
    (``Hydra.get_mode``: sweeps allowed, a missing group default skipped)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    overrides = list(overrides)
    loader = GlobalHydra.instance().hydra.config_loader
    parsed = OverridesParser.create().parse_overrides(overrides)
    if not multirun:
        loader.validate_sweep_overrides_legal(overrides=parsed, run_mode=RunMode.RUN,
                                              from_shell=False)
    return _compose(loader, config_name, overrides, parsed, return_hydra_config, multirun)


def _compose(loader, config_name, overrides, parsed, return_hydra_config, multirun):
    from hydra.core.utils import JobRuntime
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import OmegaConfBaseException

    stamp = None
    if not any(o.get_key_element() == "hydra.searchpath" for o in parsed):
        stamp = _sources_stamp(loader)
    if stamp is None:
        return _hydra(config_name, overrides, return_hydra_config, multirun)
    # the job's name, where the config sets none, is the running Hydra's (rode, an app)
    runtime_name = JobRuntime.instance().conf.get("name")
    base = (config_name, str(loader.config_search_path), stamp, runtime_name)
    repo = _REPOS.get(base)
    if repo is None:
        # the primary config may extend the search path; a repo as Hydra's compose sees it
        _, repo = loader._parse_overrides_and_create_caching_repo(config_name, [])
        _REPOS.clear()
        _REPOS[base] = repo
    # Hydra's split (defaults_list.Overrides): an override of a config group that is not
    # a dict selects an option; every other one is applied to the composed config; a
    # sweep is neither (a multirun's jobs get its values).
    group, values = [], []
    for o in parsed:
        if o.is_sweep_override():
            continue
        if repo.group_exists(o.key_or_group) and not isinstance(o.value(), dict):
            group.append(o)
        else:
            values.append(o)
    lines = tuple(o.input_line for o in group)
    entry = _CACHE.get((base, multirun, lines))
    if entry is None and multirun:
        # hydra.mode's composition (multirun) differs from a run's only in skipping a
        # missing group default: a run's that succeeded serves it, and is tried first
        entry = _CACHE.get((base, False, lines))
        if entry is None:
            try:
                entry = _store((base, False, lines), _entry(config_name, group, False))
            except Exception:   # a missing default, or an error the multirun gives too
                pass
    if entry is None:
        entry = _store((base, multirun, lines), _entry(config_name, group, multirun))
    cached, after, job_name = entry
    cfg = copy_config(cached)
    try:
        return _finish(loader, config_name, parsed, values, cfg, after, job_name,
                       return_hydra_config)
    except OmegaConfBaseException as e:   # as Hydra's load_configuration wraps them
        raise ConfigCompositionException().with_traceback(e.__traceback__) from e


def _entry(config_name, group, multirun):
    """Hydra itself, with the group overrides only (its errors, its defaults): the
    config, what the job's own runtime record takes from it, and the job's name."""
    from omegaconf import OmegaConf, open_dict

    cfg = _hydra(config_name, [o.input_line for o in group], True, multirun)
    task_lines = sum(not o.is_hydra_override() for o in group)
    hydra_lines = len(group) - task_lines
    with open_dict(cfg.hydra):   # back to the state before Hydra appended them
        if task_lines:
            del cfg.hydra.overrides.task[-task_lines:]
        if hydra_lines:
            del cfg.hydra.overrides.hydra[-hydra_lines:]
    # the choices as a plain dict (each job's config builds its own nodes from it);
    # the sources typed (a list of ConfigSourceInfo), copied per job
    after = {k: copy.deepcopy(cfg.hydra.runtime[k]) for k in
             ("version", "version_base", "config_sources")}
    after["choices"] = OmegaConf.to_container(cfg.hydra.runtime.choices)
    return cfg, after, cfg.hydra.job.get("name")


def _store(key, entry):
    if len(_CACHE) >= _MAX:
        _CACHE.clear()
    _CACHE[key] = entry
    return entry


def copy_config(cfg):
    """A deep copy of a composed config (flags, parents and node types kept): a pickle
    round trip, two to three times faster than ``copy.deepcopy`` on rode's configs; a
    config holding something that does not pickle is deep-copied."""
    import pickle

    try:
        return pickle.loads(pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:   # an unpicklable value (a structured config's object): deepcopy
        return copy.deepcopy(cfg)


def _hydra(config_name, overrides, return_hydra_config, multirun):
    """Hydra's own composition: ``hydra.compose``, or ``Hydra.get_mode``'s."""
    from hydra import compose as hydra_compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import open_dict

    if not multirun:
        return hydra_compose(config_name=config_name, overrides=overrides,
                             return_hydra_config=return_hydra_config)
    cfg = GlobalHydra.instance().hydra.compose_config(
        config_name=config_name, overrides=overrides, run_mode=RunMode.MULTIRUN,
        with_log_configuration=False, validate_sweep_overrides=False)
    if not return_hydra_config:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def _finish(loader, config_name, parsed, values, cfg, after, job_name, return_hydra_config):
    """The rest of Hydra's ``_load_configuration_impl`` (hydra 1.3), on a copy of the
    config its defaults composed, then ``hydra.compose``'s removal of the hydra node."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
    from hydra.core.utils import JobRuntime
    from omegaconf import open_dict

    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    app_overrides = []
    for override in parsed:
        if override.is_hydra_override():
            cfg.hydra.overrides.hydra.append(override.input_line)
        else:
            cfg.hydra.overrides.task.append(override.input_line)
            app_overrides.append(override)
    with open_dict(cfg.hydra):
        cfg.hydra.runtime.choices.update(after["choices"])
        for key in cfg.hydra.job.env_copy:
            cfg.hydra.job.env_set[key] = os.environ[key]
    cfg.hydra.runtime.version = after["version"]
    cfg.hydra.runtime.version_base = after["version_base"]
    cfg.hydra.runtime.cwd = os.getcwd()
    cfg.hydra.runtime.config_sources = copy.deepcopy(after["config_sources"])
    if "name" not in cfg.hydra.job:
        cfg.hydra.job.name = job_name if job_name is not None else JobRuntime().get("name")
    cfg.hydra.job.override_dirname = get_overrides_dirname(
        overrides=app_overrides,
        kv_sep=cfg.hydra.job.config.override_dirname.kv_sep,
        item_sep=cfg.hydra.job.config.override_dirname.item_sep,
        exclude_keys=cfg.hydra.job.config.override_dirname.exclude_keys,
    )
    cfg.hydra.job.config_name = config_name
    if not return_hydra_config:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


_IN_LOAD = threading.local()


@contextlib.contextmanager
def cached_loads():
    """Within: Hydra's own config loads (``ConfigLoaderImpl.load_configuration``: the
    app's mode check and run, each job of a sweep) reuse the composed defaults of
    ``compose``, so a job whose config the pre-flight composed is not composed from the
    YAML files again. The sweep overrides are checked as Hydra checks them; a config name
    of None and a load that Hydra makes while composing go to Hydra itself."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    real = ConfigLoaderImpl.load_configuration

    def load(self, config_name, overrides, run_mode, from_shell=True,
             validate_sweep_overrides=True):
        if config_name is None or getattr(_IN_LOAD, "on", False):
            return real(self, config_name, overrides, run_mode, from_shell,
                        validate_sweep_overrides)
        _IN_LOAD.on = True
        try:
            overrides = list(overrides)
            parsed = OverridesParser.create().parse_overrides(overrides)
            if validate_sweep_overrides:
                self.validate_sweep_overrides_legal(overrides=parsed, run_mode=run_mode,
                                                    from_shell=from_shell)
            return _compose(self, config_name, overrides, parsed, True,
                            run_mode == RunMode.MULTIRUN)
        finally:
            _IN_LOAD.on = False

    ConfigLoaderImpl.load_configuration = load
    try:
        yield
    finally:
        ConfigLoaderImpl.load_configuration = real
