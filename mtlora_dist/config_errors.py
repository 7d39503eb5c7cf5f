"""Hydra/OmegaConf errors turned into one message that says what was expected and what is valid.

Hydra reports ``Error merging override max_steps=abc`` and keeps the useful part (the key and the
expected type) in the exception's cause; an unknown group option comes back as ``Could not find
'adapter/mtlora_r8'`` with no list of what exists. :func:`explain` walks the cause chain and answers
with the expected type, the valid keys at the level that went wrong, or the options of the group.

It sits below the schema it explains: ``config.py`` imports this module and hands it the schema class and
the group options; nothing here imports ``config.py``.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from dataclasses import fields, is_dataclass

from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from mtlora_dist.storage.fs import is_secret_key, redact_userinfo

__all__ = ["explain", "unknown_key_message"]

_EXPECTED = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def _chain(err: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while err is not None and id(err) not in seen:
        out.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return out


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _masked(overrides: list[str]) -> list[str]:
    out = []
    for override in overrides:
        key, sep, _ = override.partition("=")
        out.append(f"{key}=***" if sep and is_secret_key(key.rsplit(".", 1)[-1]) else redact_userinfo(override))
    return out


def _override_value(overrides: list[str], key: str) -> str | None:
    for override in overrides:
        name, sep, value = override.partition("=")
        if sep and name.lstrip("+~") == key:
            return value
    return None


def unknown_key_message(full_key: str, schema: type) -> str:
    """Walk ``full_key`` down the ``schema`` dataclass; name the first part that does not exist, the valid keys
    at that level and the closest ones."""
    node, path = schema, []
    for part in re.split(r"\.|\[\d+\]", full_key):
        if not part:
            continue
        if not is_dataclass(node):
            break  # inside an open mapping (deepspeed.extra, loss_weights, ...): any key is allowed
        by_name = {f.name: f for f in fields(node)}
        if part not in by_name:
            where = ".".join(path)
            valid = sorted(by_name)
            close = difflib.get_close_matches(part, valid, n=2)
            hint = f"; did you mean {' or '.join(repr('.'.join(path + [c])) for c in close)}?" if close else ";"
            return (
                f"unknown config key '{'.'.join(path + [part])}'{hint} valid keys "
                f"{'under ' + repr(where) if where else 'at the top level'}: {valid}"
            )
        default = by_name[part].default_factory() if callable(by_name[part].default_factory) else None
        node = type(default) if is_dataclass(default) else None
        path.append(part)
    return f"unknown config key '{full_key}'"


GroupOptions = Callable[[list[str]], dict[str, list[str]]]  # config.group_options: folders -> {group: options}


def _missing_option(message: str, search_dirs: list[str], group_options: GroupOptions) -> str | None:
    """``Could not find 'adapter/mtlora_r8'`` -> the adapter options that exist."""
    match = re.search(r"Could not find '([\w.-]+)/([\w.-]+)'", message)
    if not match:
        return None
    group, option = match.groups()
    options = group_options(search_dirs).get(group)
    if not options:
        return (
            f"the config's defaults list names '{group}/{option}', but there is no '{group}/' folder beside the "
            f"file or in the package's configs/ ({search_dirs[-1]}); keep the group folders (model/, adapter/, "
            "data/, ...) beside a copied recipe, or start from a recipe under configs/"
        )
    close = difflib.get_close_matches(option, options, n=2)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return (
        f"there is no {group} option '{option}'{hint}; available {group} options: {options} "
        f"(YAML files under {', '.join(os.path.join(d, group) for d in dict.fromkeys(search_dirs))})"
    )


def _bad_value(err: ValidationError, overrides: list[str]) -> str:
    key = err.full_key
    message = _first_line(err)
    converted = re.search(r"could not be converted to (\w+)", message)
    expected = _EXPECTED.get(converted.group(1)) if converted else None
    if "is not a valid bool" in message:
        expected = "true or false"
    value = _override_value(overrides, key.split("[")[0])
    got = f", got {value!r}" if value is not None and not is_secret_key(key.rsplit(".", 1)[-1]) else ""
    if expected:
        return f"config key '{key}' expects {expected}{got}"
    return f"config key '{key}': {message}"


def explain(
    err: BaseException, overrides: list[str], search_dirs: list[str], *, schema: type, group_options: GroupOptions
) -> str:
    """One message for a failed composition: what was wrong, what is valid (keys of ``schema``, options from
    ``group_options``), and the overrides given."""
    chain = _chain(err)
    top = _first_line(err)
    message = None
    if "Ambiguous value for argument" in top:
        message = (
            f"{top}: a comma in a value asks Hydra for a sweep, which these entry points do not run; "
            "quote a list as key=[a,b], or sweep the values with launch/sweep.py (here or on SLURM, "
            "docs/study.md)"
        )
    elif "Error parsing override" in top:
        message = f"{top}: overrides are key=value (e.g. max_steps=100, data.batch_size=16, adapter=mtlora_r16)"
    if message is None:
        message = _missing_option(top, search_dirs, group_options)
    if message is None:
        for cause in chain:
            if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
                message = unknown_key_message(cause.full_key, schema)
                break
            if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
                message = _bad_value(cause, overrides)
                break
    if message is None:
        message = top
    given = f" (overrides: {' '.join(_masked(overrides))})" if overrides else ""
    return f"invalid configuration: {message}{given}"
