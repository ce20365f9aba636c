"""What the console tells a newcomer about a task's keys, read from its schema.

``rode <task> --help`` lists every key with its value now and the values it accepts
(``runner.schema`` knows them: choices, ranges, null); an unknown key is answered
with the nearest valid one. Torch-free.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import replace

from .schema import TASK_SCHEMAS, Anything, Choice, Group, Hooks, Int, ListOf, Spec, Variants

_UNSET = object()
_CEILING = Int().high   # every count's default ceiling


def describe(spec: Spec) -> str:
    """The values ``spec`` accepts, in words (the same words its errors use)."""
    if isinstance(spec, Anything):
        return "set at run time (Hydra's output dir unless given)"
    if isinstance(spec, Variants):
        return "a config group: one of " + ", ".join(spec.options)
    if isinstance(spec, Group):
        text = "a group of keys: " + ", ".join(spec.fields)
    elif isinstance(spec, ListOf) and isinstance(spec.item, Choice):
        text = "a list of: " + ", ".join(map(str, spec.item.choices))
    elif isinstance(spec, ListOf):
        text = f"a list{f' of {spec.length}' if spec.length else ''}, each {describe(spec.item)}"
    elif isinstance(spec, Int) and spec.high == _CEILING:   # the typo guard, not a limit
        text = replace(spec, high=None).expected()
    else:
        text = spec.expected()
    if spec.null and not (isinstance(spec, Choice) and None in spec.choices):
        text += " or null"
    return text + spec.why


def walk(schema: Group, node=None, prefix: str = "") -> Iterator[tuple[str, Spec, object]]:
    """(dotted key, spec, value in ``node``) for every leaf key of ``schema``; a config
    group (``dataset``) first as itself, then the keys of the option ``node`` holds (of
    every option when ``node`` is None)."""
    for key, spec in schema.fields.items():
        name = f"{prefix}{key}"
        value = _get(node, key)
        if isinstance(spec, Variants):
            chosen = _get(value, "name")
            yield name, spec, chosen
            options = ([spec.options[chosen]] if chosen in spec.options
                       else [] if node is not None else list(spec.options.values()))
            seen = {f"{name}.name"}   # the group's option, shown as the group
            for option in options:
                for sub in walk(option, value if node is not None else None, name + "."):
                    if sub[0] not in seen:
                        seen.add(sub[0])
                        yield sub
        elif isinstance(spec, Hooks):
            yield from walk(Group(fields=spec.hooks), value if node is not None else None,
                            name + ".")
        elif isinstance(spec, Group) and (node is None or value is None or hasattr(value, "keys")):
            if node is not None and value is None:
                yield name, spec, None   # a group switched off (logger: null)
                continue
            yield from walk(spec, value, name + ".")
        else:
            yield name, spec, value


def _get(node, key: str):
    if node is None or not hasattr(node, "keys") or key not in node.keys():
        return _UNSET if node is not None else None
    return node[key]


def keys(task: str) -> list[str]:
    """Every dotted key of ``task`` (the keys of every option of its config groups)."""
    return [name for name, _, _ in walk(TASK_SCHEMAS[task])]


def _show(value) -> str:
    if value is _UNSET:
        return "(unset)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if hasattr(value, "keys"):
        return "{...}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def render(task: str, cfg, groups: dict[str, list[str]], description: str = "") -> str:
    """``rode <task> --help``: the config groups, then each key as ``key: value`` with
    the values it accepts (from the schema, not written by hand). ``cfg``: the composed
    config as a plain dict, interpolations unresolved."""
    lines = [f"rode {task}: {description}".rstrip(": "), "",
             f"usage: rode [-m] {task} [key=value ...] [--help] [--cfg job] [--hydra-help]", ""]
    if groups:
        lines += ["== Configuration groups ==",
                  "Compose your configuration from those groups (group=option)", ""]
        lines += [f"{g}: {', '.join(options)}" for g, options in groups.items()]
        lines.append("")
    rows = [(f"{name}: {_show(value)}", describe(spec))
            for name, spec, value in walk(TASK_SCHEMAS[task], cfg)]
    width = min(44, max(len(left) for left, _ in rows))
    lines += ["== Config ==",
              "Set a key with key=value (a sweep: -m and key=a,b); each key, its value now,",
              "and the values it accepts:", ""]
    for left, right in rows:
        pad = width + 2 - len(left)
        lines.append(f"{left}{' ' * pad}{right}" if pad >= 2 else f"{left}\n{' ' * (width + 2)}{right}")
    lines += ["", "Use --hydra-help for Hydra's own flags; --cfg job prints the composed config."]
    return "\n".join(lines)


def _group_at(task: str, parent: str) -> list[Spec]:
    """The schema nodes at dotted ``parent`` ('' for the top): a Group per option."""
    nodes: list[Spec] = [TASK_SCHEMAS[task]]
    for part in [p for p in parent.split(".") if p]:
        found = []
        for node in nodes:
            groups = (list(node.options.values()) if isinstance(node, Variants) else
                      [Group(fields=node.hooks)] if isinstance(node, Hooks) else [node])
            found += [g.fields[part] for g in groups if isinstance(g, Group) and part in g.fields]
        nodes = found
    out = []
    for node in nodes:
        out += (list(node.options.values()) if isinstance(node, Variants) else
                [Group(fields=node.hooks)] if isinstance(node, Hooks) else
                [node] if isinstance(node, Group) else [])
    return out


def accepts_new(task: str, dotted: str) -> bool:
    """Whether ``+dotted=...`` adds a key the task takes: its group is open."""
    parent = dotted.rpartition(".")[0]
    return any(g.open for g in _group_at(task, parent))


def nearest(task: str, dotted: str) -> str | None:
    """The valid key nearest to ``dotted`` (``dept`` -> ``depth``), or None."""
    every = keys(task)
    leaf = dotted.rpartition(".")[2]
    same_leaf = [k for k in every if k.rpartition(".")[2] == leaf and k != dotted]
    if same_leaf:   # val_fraction -> dataset.val_fraction
        return same_leaf[0]
    match = difflib.get_close_matches(dotted, every, n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_key(task: str | None, dotted: str) -> str:
    """The one line for a key the task does not have: the nearest valid key, and
    ``+key=`` only where the task takes new keys."""
    text = f"unknown key {dotted!r}"
    if task is None or task not in TASK_SCHEMAS:
        return f"{text} (see `rode <task> --help` for the valid keys)"
    if accepts_new(task, dotted):
        return f"{text}; use +{dotted}=... to add it (see `rode {task} --help`)"
    guess = nearest(task, dotted)
    if guess:
        return f"{text}; did you mean {guess}? (see `rode {task} --help` for the valid keys)"
    return f"{text} (see `rode {task} --help` for the valid keys)"
