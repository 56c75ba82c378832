"""Command-line overrides checked against the config tree before anything runs.

Why: Hydra refuses a misspelt key (``data.bach=4``) in a multi-line error with exit code 1 whose
hint, ``+data.bach=4``, then *adds* a key that nothing reads: the run trains to the end with the
setting silently ignored. Here a key that no config the command selects has, or a group option that
does not exist, is refused in one line naming the nearest valid one, with exit code 2 (a mistake the
user can fix, as every other in this project)::

    cbn_detect.train: data.bach: no such key; did you mean data.batch?
    cbn_detect.train: norm=bnn: no such option; did you mean norm=bn? (bn, brn, cbn, ...)
    cbn_detect.train: norm.window: no such key for norm=bn; norm=cbn and norm=cbn_naive have it

``+key=value`` / ``++key=value`` are refused as well, with one exception: a key directly under a
node with a ``_target_`` that its callable takes as a keyword (``+model.fg_iou_thresh=0.6``, a
``build_retinanet`` argument the model files leave at its default; ``+optim.optimizer.nesterov=true``
for ``torch.optim.SGD``), or any key there when the callable takes ``**kwargs``. No node of
``conf/`` is free-form otherwise: the norm's keys are checked against the layer's constructor
(``cbn_detect.norm.build_norm``), every other node is read key by key.

The configs checked against are composed by Hydra's Compose API from the same config tree, with the
group options the command names (each value of a swept group, and in a multirun the groups an
experiment's ``hydra.sweeper.params`` sweeps), so that keys an ``experiment=`` file adds anywhere
count as known. ``hydra.*`` overrides and anything Hydra parses differently (a syntax error, a
``pkg://`` config path) are left to Hydra, which reports them as before.

:func:`nearest_key`, :func:`no_such_option` and :func:`config_keys` build the one-line messages
from plain key sets and are meant for every entry point that takes overrides (``evaluate``).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import io
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override, ValueType
from hydra.errors import HydraException
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import cbn_detect

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(cbn_detect.__file__).resolve().parent
"""Where ``train.py`` lives: ``hydra.main``'s ``config_path`` (and ``--config-path``) is relative to it."""
CONFIG_DIR = PACKAGE_DIR.parent / "conf"
CONFIG_NAME = "config"

INSTANTIATE_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
"""Keys ``hydra.utils.instantiate`` itself reads: addable under any ``_target_`` node."""

CUTOFF = 0.6
"""``difflib``'s similarity below which no suggestion is made (its default: ``bach`` -> ``batch``
is 0.89, ``widow`` -> ``where`` 0.4)."""

MOVED = 0.8
"""How similar the last part of a key elsewhere must be for it to be suggested (``num_train`` is
``data.source.num_train``, but ``window`` is not ``train.loss_window``: 0.63)."""

_HYDRA_ERRORS = (HydraException, OmegaConfBaseException)


# --- one-line messages, from plain key sets ------------------------------------------------------


def closest(word: str, candidates: Iterable[str]) -> list[str]:
    """The candidates most similar to ``word`` (ties kept, in order), none under :data:`CUTOFF`."""
    pool = sorted(set(candidates))
    matches = difflib.get_close_matches(word, pool, n=len(pool) or 1, cutoff=CUTOFF)
    if not matches:
        return []
    best = difflib.SequenceMatcher(None, word, matches[0]).ratio()
    return sorted(m for m in matches if difflib.SequenceMatcher(None, word, m).ratio() == best)


def _children(prefix: str, known: set[str]) -> set[str]:
    depth = prefix.count(".") + 1 if prefix else 0
    return {k.split(".")[depth] for k in known if k.count(".") >= depth and (not prefix or k.startswith(prefix + "."))}


def suggest_key(key: str, known_keys: Iterable[str]) -> str | None:
    """The known key ``key`` was most likely meant to be, or None.

    Segment by segment first (``nrom.widnow`` -> ``norm.window``: each misspelt part among the
    names at its level, so a shared ``data.`` prefix does not make every ``data.*`` key look
    close), then a key at another place with a similar last part (``data.num_train`` ->
    ``data.source.num_train``), the most similar as a whole."""
    known = set(known_keys)
    prefix = ""
    for part in key.split("."):
        here = f"{prefix}.{part}" if prefix else part
        if here not in known:
            match = closest(part, _children(prefix, known))
            if not match:
                break
            here = f"{prefix}.{match[0]}" if prefix else match[0]
        prefix = here
    else:
        if prefix != key:
            return prefix
    leaf = key.rpartition(".")[2]
    moved = [
        k for k in known if k != key and difflib.SequenceMatcher(None, leaf, k.rpartition(".")[2]).ratio() >= MOVED
    ]
    whole = difflib.get_close_matches(key, sorted(moved), n=1, cutoff=0.0)
    return whole[0] if whole else None


def nearest_key(key: str, known_keys: Iterable[str], shown: str | None = None) -> str:
    """``data.bach: no such key; did you mean data.batch?``: the one line for a key that is not in
    ``known_keys`` (dotted paths of every node and leaf), without a program name. ``shown`` is the
    key as the user wrote it (``+data.bach``), ``key`` by default."""
    known = set(known_keys)
    suggestion = suggest_key(key, known)
    line = f"{shown or key}: no such key"
    if suggestion is not None:
        return f"{line}; did you mean {suggestion}?"
    parent = key.rpartition(".")[0]
    siblings = sorted(_children(parent, known)) if not parent or parent in known else []
    if siblings:
        return f"{line} ({parent or 'top level'}: {', '.join(siblings)})"
    return line


def no_such_option(group: str, option: str, options: Sequence[str]) -> str:
    """``norm=bnn: no such option; did you mean norm=bn? (bn, brn, ...)``, without a program name."""
    suggestions = " or ".join(f"{group}={o}" for o in closest(option, options))
    hint = f"; did you mean {suggestions}?" if suggestions else ""
    return f"{group}={option}: no such option{hint} ({', '.join(options)})"


def _walk(node: Any, prefix: str, lists: bool) -> Iterator[str]:
    if isinstance(node, Mapping):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            yield path
            yield from _walk(v, path, lists)
    elif lists and isinstance(node, list):
        for i, v in enumerate(node):
            path = f"{prefix}.{i}"
            yield path
            yield from _walk(v, path, lists)


def config_keys(cfg: DictConfig | Mapping[str, Any], lists: bool = False) -> set[str]:
    """Every node and leaf of ``cfg`` as a dotted path, ``hydra.*`` left out; list items
    (``eval.metrics.0``) too when ``lists``. Interpolations are not resolved: only the tree's shape
    matters here, and resolving could fail on an environment variable that is not set."""
    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    return {k for k in _walk(tree, "", lists) if k != "hydra" and not k.startswith("hydra.")}


# --- the command line ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """What of ``python -m <app> [flags] [overrides]`` decides which configs are composed."""

    overrides: tuple[str, ...]
    multirun: bool
    config_dir: Path
    config_name: str
    extra_dir: Path | None = None
    """``--config-dir``: searched after ``config_dir``, as Hydra does (before its schema source)."""


def parse_command(
    argv: Sequence[str], config_dir: Path = CONFIG_DIR, config_name: str = CONFIG_NAME, app_dir: Path = PACKAGE_DIR
) -> Command | None:
    """The command's overrides and config location, or None when it runs no job (``--help``,
    ``--hydra-help``, ``--info``, shell completion) or Hydra would refuse the flags anyway.

    ``hydra._internal.utils.get_args_parser`` is private, but it is the parser ``hydra.main`` itself
    uses (hydra-core is pinned to 1.3.x): the same flags, abbreviations and ``-m``/``-cd`` forms
    are split from the overrides exactly as Hydra will split them. Its ``--version`` (and a bad
    flag) would print and exit: silenced here, Hydra answers them itself right after."""
    from hydra._internal.utils import get_args_parser  # see the docstring

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(list(argv))
    except SystemExit:
        return None
    if args.help or args.hydra_help or args.shell_completion or args.info or args.experimental_rerun:
        return None
    primary = config_dir
    if args.config_path is not None:
        if args.config_path.startswith("pkg://"):
            return None
        primary = Path(args.config_path)
        primary = primary if primary.is_absolute() else app_dir / primary
    extra = Path(os.path.abspath(args.config_dir)) if args.config_dir is not None else None
    if not primary.is_dir() or (extra is not None and not extra.is_dir()):
        return None  # Hydra names the missing folder
    name = args.config_name or config_name
    return Command(tuple(args.overrides), bool(args.multirun), primary.resolve(), name, extra)


# --- compositions ------------------------------------------------------------------------------------


class _Tree:
    """The config tree as Hydra sees it for one command: its groups and their options, and
    compositions with given group choices (each composed once)."""

    def __init__(self, command: Command, searchpath: list[str]) -> None:
        self.command = command
        self.searchpath = searchpath
        loader = GlobalHydra.instance().config_loader()
        options: dict[str, set[str]] = {}
        pending = [g for g in loader.list_groups("") if g != "hydra"]
        while pending:
            group = pending.pop()
            options[group] = set(loader.get_group_options(group))
            pending += [f"{group}/{sub}" for sub in loader.list_groups(group)]
        # The loader knows the primary folder only; hydra.searchpath (and so --config-dir) joins
        # at composition. Their folders' groups are read as Hydra's file source reads them.
        for path in searchpath:
            folder = Path(path.removeprefix("file://"))
            if path.startswith("file://") and folder.is_dir():
                for file in folder.rglob("*.yaml"):
                    group = file.parent.relative_to(folder).as_posix()
                    if group != "." and group.split("/")[0] != "hydra":
                        options.setdefault(group, set()).add(file.stem)
        self.options = {group: sorted(names) for group, names in options.items()}
        self.composed: dict[tuple[str, ...], DictConfig | None] = {}
        self.seconds = 0.0

    def compose(self, choices: Sequence[str]) -> DictConfig | None:
        """The config (with its ``hydra`` node) for these group overrides; None if Hydra cannot
        compose it (Hydra then says why when it runs)."""
        key = tuple(choices)
        if key not in self.composed:
            start = time.perf_counter()
            path = [f"hydra.searchpath=[{','.join(_quoted(p) for p in self.searchpath)}]"] if self.searchpath else []
            try:
                self.composed[key] = compose(
                    self.command.config_name, overrides=[*path, *key], return_hydra_config=True
                )
            except Exception as err:  # noqa: BLE001 - whatever fails, Hydra meets it again and reports it
                log.debug("composing %s failed: %s", list(key), err)
                self.composed[key] = None
            self.seconds += time.perf_counter() - start
        return self.composed[key]


def _quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _choices(override: Override, options: Sequence[str]) -> list[str]:
    """The options a group override selects (each value of a sweep); none for ``~group``,
    ``group=null`` or a sweep only Hydra expands (a range or interval of options)."""
    if override.is_delete():
        return []
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        value = override.value()
        return value.filter(list(options)) if isinstance(value, Glob) else []
    if override.is_choice_sweep():
        return [v for v in override.sweep_string_iterator() if v != "null"]
    if override.is_sweep_override() or override.value() is None:
        return []
    return [override.get_value_element_as_str()]


def _with(choices: list[str], key: str, line: str) -> list[str]:
    """``choices`` with the override of group ``key`` replaced by ``line`` (or added)."""
    return [c for c in choices if _group_of(c) != key] + [line]


def _group_of(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def _variants(tree: _Tree, groups: list[tuple[Override, list[str]]], multirun: bool) -> list[list[str]]:
    """The group choices to compose, the first being the config the command starts from.

    A single run: the group options it names. A multirun: first what Hydra composes before it
    sweeps (the groups it does not sweep; the swept ones at their defaults: every ``key=value`` of
    the command line must apply to it, or Hydra stops), then each other value of a swept group in
    turn - not the cartesian product: a key belongs to one group's node, so one composition per
    option finds it - and each option an experiment's ``hydra.sweeper.params`` sweeps over a group
    that the command line leaves alone."""
    swept = [(o, values) for o, values in groups if o.is_sweep_override()]
    fixed = [o.input_line for o, _ in groups if not o.is_sweep_override() and o.input_line]

    def choose(variant: list[str], o: Override, value: str) -> list[str]:
        return _with(variant, o.key_or_group, f"{o.get_key_element()}={value}")

    if not multirun:  # Hydra refuses a sweep without -m; its first values stand in for it here
        base = fixed + [f"{o.get_key_element()}={values[0]}" for o, values in swept]
        return [base] + [choose(base, o, v) for o, values in swept for v in values[1:]]
    base = fixed
    variants = [base]
    first = tree.compose(base)
    defaults = first.hydra.runtime.choices if first is not None else {}
    for o, values in swept:
        variants += [choose(base, o, v) for v in values if v != defaults.get(o.key_or_group)]
    named = {o.key_or_group for o, _ in groups}
    for variant in list(variants):
        cfg = tree.compose(variant)
        params = OmegaConf.select(cfg, "hydra.sweeper.params") if cfg is not None else None
        for key, value in (params or {}).items():
            if key in tree.options and key not in named:
                try:
                    (parsed,) = OverridesParser.create().parse_overrides([f"{key}={value}"])
                except _HYDRA_ERRORS:
                    continue
                chosen = cfg.hydra.runtime.choices.get(key)
                options = [v for v in _choices(parsed, tree.options[key]) if v != chosen]
                variants += [_with(variant, key, f"{key}={v}") for v in options]
    return variants


# --- keys --------------------------------------------------------------------------------------------


def _takes(cfg: DictConfig, key: str, targets: Mapping[str, str]) -> bool:
    """Whether ``+key`` adds an argument of the callable a ``_target_`` node is instantiated with:
    ``key``'s parent has a ``_target_`` (or the command line sets one) whose signature names the
    key or takes ``**kwargs``."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None, throw_on_missing=False) if parent else cfg
    target = targets.get(parent) or (node.get("_target_") if isinstance(node, DictConfig) else None)
    if not isinstance(target, str):
        return False
    if leaf in INSTANTIATE_KEYS:
        return True
    return leaf in _parameters(target) or "**" in _parameters(target)


def _parameters(target: str) -> set[str]:
    """The keyword arguments ``target`` takes (``**`` when it takes any); empty if it cannot be
    imported (instantiating it would fail anyway, and say why)."""
    try:
        signature = inspect.signature(get_object(target))
    except (ImportError, ValueError, TypeError, AttributeError, HydraException) as err:
        log.debug("no signature for %s: %s", target, err)
        return set()
    names = set()
    for name, param in signature.parameters.items():
        if param.kind is param.VAR_KEYWORD:
            names.add("**")
        elif param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            names.add(name)
    return names


def _target_keys(cfg: DictConfig) -> set[str]:
    """``node.argument`` for each argument a ``_target_`` node's callable takes but the config
    leaves out: what ``+node.argument=...`` may add, for suggestions."""
    keys = set()
    for path in config_keys(cfg):
        if path.endswith("._target_") or path == "_target_":
            node = path.rpartition(".")[0]
            target = OmegaConf.select(cfg, path, default=None, throw_on_missing=False)
            if isinstance(target, str):
                keys |= {f"{node}.{p}" if node else p for p in _parameters(target) - {"**"}}
    return keys


def _unknown_key(tree: _Tree, override: Override, base: list[str], configs: list[DictConfig]) -> str:
    """The one line for a key none of ``configs`` has. In order: the options of its group that have
    it (``norm.window`` with ``norm=bn``), the nearest key of the configs (an argument a ``_target_``
    takes but the config leaves out counts, shown as ``+key``), the nearest key of another option
    of the group, what the ``_target_`` under which ``+key`` would go takes, the keys beside it."""
    key, shown = override.key_or_group, override.get_key_element()
    in_config = set().union(*(config_keys(c) for c in configs))
    addable = set().union(*(_target_keys(c) for c in configs)) - in_config
    known = in_config | addable

    def meant(suggestion: str) -> str:
        plus = "+" if suggestion in addable and not (override.is_add() or override.is_force_add()) else ""
        return f"{shown}: no such key; did you mean {plus}{suggestion}?"

    if key in addable and not override.is_delete():  # model.fg_iou_thresh=0.6: a _target_'s argument
        return f"{shown}: no such key in the config; +{key}={override.get_value_string()} adds it"
    groups = [g for g in tree.options if "/" not in g]
    head, dot, rest = key.partition(".")
    if head not in groups:
        group = closest(head, groups)
        if group and not dot and not override.is_delete():  # nrom=cbn
            value = override.get_value_string()
            return f"{shown}={value}: no such key or group; did you mean {group[0]}={value}?"
        head = group[0] if group and dot else ""
    in_group = f"{head}.{rest}" if head else ""
    current = sorted({str(c.hydra.runtime.choices.get(head)) for c in configs}) if head else []
    others = {o: tree.compose(_with(base, head, f"{head}={o}")) for o in tree.options.get(head, []) if o not in current}
    other_keys = {o: config_keys(c) for o, c in others.items() if c is not None}
    selected = " or ".join(f"{head}={c}" for c in current)
    having = [f"{head}={o}" for o, keys in other_keys.items() if in_group in keys]
    if having and in_group == key:
        return f"{shown}: no such key for {selected}; {_enumerate(having)} {'has' if len(having) == 1 else 'have'} it"
    suggestion = suggest_key(key, known)
    if suggestion is not None and (not head or suggestion.partition(".")[0] == head):
        return meant(suggestion)
    by_suggestion: dict[str, list[str]] = {}
    for option, keys in other_keys.items():
        elsewhere = in_group if in_group in keys else suggest_key(in_group, keys)
        if elsewhere is not None and elsewhere.partition(".")[0] == head:
            by_suggestion.setdefault(elsewhere, []).append(f"{head}={option}")
    if by_suggestion:
        elsewhere, options = next(iter(by_suggestion.items()))
        return f"{shown}: no such key for {selected}; did you mean {elsewhere} ({_enumerate(options)})?"
    if suggestion is not None:
        return meant(suggestion)
    parent, _, leaf = key.rpartition(".")
    targets = {OmegaConf.select(c, f"{parent}._target_", default=None) for c in configs} if parent else set()
    targets = {t for t in targets if isinstance(t, str)}
    if targets and (override.is_add() or override.is_force_add()):
        return f"{shown}: no such key, and {' or '.join(sorted(targets))} takes no argument {leaf}"
    return nearest_key(key, in_config, shown)


def _enumerate(items: Sequence[str]) -> str:
    return " and ".join(items) if len(items) < 3 else ", ".join(items[:-1]) + " and " + items[-1]


def find_problem(
    argv: Sequence[str], config_dir: Path = CONFIG_DIR, config_name: str = CONFIG_NAME, app_dir: Path = PACKAGE_DIR
) -> str | None:
    """The one-line message (without a program name) for the first misspelt group option or key
    of the command line ``argv`` (as ``sys.argv[1:]``), None when there is none or Hydra is to
    judge the command itself."""
    command = parse_command(argv, config_dir, config_name, app_dir)
    if command is None:
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(list(command.overrides))
    except _HYDRA_ERRORS:
        return None  # Hydra reports the syntax error
    given = [o.value() for o in parsed if o.get_key_element() == "hydra.searchpath"]
    searchpath = [str(p) for p in given[-1]] if given and isinstance(given[-1], list) else []
    if command.extra_dir is not None:
        searchpath = [*searchpath, f"file://{command.extra_dir}"]
    start = time.perf_counter()
    with initialize_config_dir(str(command.config_dir), version_base="1.3"):
        tree = _Tree(command, searchpath)
        try:
            problem, compositions = _check(tree, [o for o in parsed if not o.is_hydra_override()], command.multirun)
        except _HYDRA_ERRORS as err:  # a command this check does not foresee: Hydra judges it
            log.debug("overrides not checked: %s", err)
            return None
    log.debug(
        "overrides checked in %.3f s (%d compositions, %.3f s)", time.perf_counter() - start, compositions, tree.seconds
    )
    return problem


def _check(tree: _Tree, overrides: list[Override], multirun: bool) -> tuple[str | None, int]:
    """The first problem of ``overrides`` (``hydra.*`` left out) and the number of compositions."""
    groups: list[tuple[Override, list[str]]] = []
    keys: list[Override] = []
    for o in overrides:
        name = o.key_or_group
        if name not in tree.options:
            keys.append(o)
            continue
        values = _choices(o, tree.options[name])
        for value in values:
            if value not in tree.options[name]:
                return no_such_option(name, value, tree.options[name]), 0
        if values or not o.is_sweep_override():  # group=null and ~group are composed as they are
            groups.append((o, values))
    if not keys:
        return None, 0
    composed = [(v, tree.compose(v)) for v in _variants(tree, groups, multirun)]
    if composed[0][1] is None:
        return None, len(tree.composed)  # Hydra cannot compose the command either, and says why
    variants = [v for v, c in composed if c is not None]
    configs = [c for _, c in composed if c is not None]
    targets = {
        o.key_or_group.rpartition(".")[0]: str(o.value())
        for o in keys
        if o.key_or_group.endswith("._target_") and isinstance(o.value(), str)
    }
    known = [config_keys(c, lists=True) for c in configs]
    for o in keys:
        key = o.key_or_group
        has = [key in k for k in known]
        if o.is_add() or o.is_force_add():
            if any(has) or any(_takes(c, key, targets) for c in configs):
                continue  # an option that has it or a _target_ that takes it: Hydra or the callable judges the rest
            return _unknown_key(tree, o, variants[0], configs), len(tree.composed)
        if all(has):
            continue
        if multirun and not has[0] and any(has):
            having = [v for v, h in zip(variants, has) if h]
            return _swept_key(o, variants[0], having, configs[0]), len(tree.composed)
        lacking = [i for i, h in enumerate(has) if not h]
        return _unknown_key(tree, o, variants[lacking[0]], [configs[i] for i in lacking]), len(tree.composed)
    return None, len(tree.composed)


def _swept_key(override: Override, base: list[str], having: list[list[str]], first: DictConfig) -> str:
    """The line for ``key=value`` that only swept options have (``-m norm=bn,cbn norm.window=2``):
    Hydra applies it to the config it starts from, before the sweep, and stops there. ``having``:
    the group choices of the compositions that have the key."""
    options = list(dict.fromkeys(" ".join(c for c in variant if c not in base) for variant in having))
    groups = dict.fromkeys(_group_of(c) for variant in having for c in variant if c not in base)
    started = " ".join(f"{g}={_option(first.hydra.runtime.choices.get(g))}" for g in groups)
    return (
        f"{override.key_or_group}: a multirun sets key=value on the config it starts from"
        f"{f', {started},' if started else ''} which has no such key; "
        f"++{override.key_or_group}={override.get_value_string()} adds it to every job "
        f"({_enumerate(options)} {'has' if len(options) == 1 else 'have'} it)"
    )


def _option(choice: Any) -> str:
    return "null" if choice is None else str(choice)


def refuse_unknown_overrides(prog: str, argv: Sequence[str] | None = None) -> None:
    """Exit with code 2 and one line on stderr, ``<prog>: <problem>``, when the command line
    (``sys.argv[1:]`` by default) has a misspelt key or group option; return otherwise."""
    problem = find_problem(sys.argv[1:] if argv is None else argv)
    if problem is not None:
        _refuse(prog, problem)


def _refuse(prog: str, problem: str) -> NoReturn:
    print(f"{prog}: {problem}", file=sys.stderr)
    sys.exit(2)
