"""Component settings: each encoder and click predictor declares the flags it owns beside its code.

A settings class is a small dataclass (as Hugging Face's `BertConfig` sits beside `BertModel`): one field per flag
with its default, help text, allowed values and check. `config.py` builds the command line from these classes,
the checkpoint stores the chosen components' values, and a component reads only its own fields plus the shared
dimensions (`SharedDims`): `view_for(component, values)` hands it exactly those and names the owner of anything
else it asks for.

    @dataclass
    class HDCSettings(Settings):
        title = "HDC (FIM's news encoder)"
        HDC_window_size: int = setting(3, "dilated convolution window (odd)", check=odd)

This module imports nothing of torch, so it can be read (and tested) without building any model.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterable, Mapping

Check = Callable[[Any], "str | None"]  # value -> what is wrong with it (None: fine)


def setting(default: Any, help: str, *, check: Check | None = None,
            choices: Iterable[Any] | Callable[[], Iterable[Any]] | None = None, architecture: bool = True,
            nargs: str | None = None, metavar: str | None = None, modes: Iterable[str] | None = None):
    """A settings field: `default`, `help` for --help, `check` (value -> error text or None), `choices` (or a
    function returning them when the parser is built, e.g. a registry's names, which grow as encoders register),
    `architecture`: whether the value shapes the weights (a checkpoint's value then wins over a typed one in
    dev/test mode, and a different typed value is an error) rather than only how they are trained, argparse's
    `nargs` / `metavar` where a flag takes several values, and `modes`: the main.py modes that read the flag, where
    they differ from its class's `modes` (a flag typed in another mode does nothing, and main says so)."""
    if choices is not None and not callable(choices):
        choices = tuple(choices)
    meta = {"help": help, "check": check, "choices": choices, "architecture": architecture, "nargs": nargs,
            "metavar": metavar, "modes": None if modes is None else tuple(modes)}
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return field(default=default, metadata=meta)


# Checks shared by many settings; each returns the text that follows "--flag " in the error.
def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low}"


def odd(v: int) -> str | None:
    return None if v >= 1 and v % 2 == 1 else "must be odd and >= 1 (a same-length convolution)"


def unit_interval(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def all_at_least_1(v: list[int]) -> str | None:
    return None if v and all(x >= 1 for x in v) else "must all be >= 1"


def int_list(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3] (argparse type; a list, as the JSON config round-trips it)."""
    if isinstance(text, list):
        return [int(v) for v in text]
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,3, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


# A field's annotation -> argparse's type (None: the typed string as it is). `X|None`: a default resolved later
# (documented in help) or "not given". bool fields are --flag / --no-flag switches.
_TYPES: dict[str, Callable[[str], Any] | None] = {
    "int": int, "int|None": int, "float": float, "str": None, "str|None": None, "list[int]": int_list,
    "list[int]|None": int_list, "list[str]|None": None}


@dataclass
class Settings:
    """Base of every settings dataclass. `title` heads the flag group in --help."""

    title: ClassVar[str] = ""
    description: ClassVar[str | None] = None  # shown under the title in --help
    # The main.py modes that read these flags from the command line. A model's settings are read where a model is
    # built from flags (training, pretraining); evaluating modes take them from the checkpoint.
    modes: ClassVar[tuple[str, ...]] = ("train", "pretrain")

    @classmethod
    def flag_modes(cls) -> dict[str, tuple[str, ...]]:
        """Each flag -> the modes that read it (its own `modes`, else the class's)."""
        return {f.name: f.metadata.get("modes") or cls.modes for f in fields(cls)}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def architecture_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata.get("architecture", True))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return cls().to_dict()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, owners: str = "") -> None:
        """One argparse group: this class's flags, their defaults, help and choices."""
        group = parser.add_argument_group(cls.title + (f" — read by {owners}" if owners else ""), cls.description)
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            kind = (f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))).replace(" ", "")
            kw: dict[str, Any] = {"default": default, "help": f.metadata.get("help", "")}
            if kind in ("bool", "bool|None"):
                kw["action"] = argparse.BooleanOptionalAction
            else:
                if _TYPES[kind] is not None:
                    kw["type"] = _TYPES[kind]
                choices = f.metadata.get("choices")
                if choices:
                    kw["choices"] = list(choices() if callable(choices) else choices)
                for key in ("nargs", "metavar"):
                    if f.metadata.get(key) is not None:
                        kw[key] = f.metadata[key]
            if kind == "list[int]":
                kw["default"] = ",".join(str(v) for v in default)  # shown as typed; argparse converts it
            group.add_argument(f"--{f.name}", **kw)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "Settings":
        """This class's fields taken from `values` (a flat flag -> value mapping); missing ones keep defaults."""
        return cls(**{name: values[name] for name in cls.names() if name in values})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def errors(self) -> list[str]:
        """Every failed check, as `--flag <what is wrong>, got <value>`."""
        out = []
        for f in fields(self):
            check = f.metadata.get("check")
            value = getattr(self, f.name)
            if _is_float_field(f) and isinstance(value, float) and not math.isfinite(value):
                # argparse's float() takes "inf" and "nan", and a `v >= 0` check passes inf: no float flag means
                # anything infinite (a learning rate of inf trains NaN weights)
                out.append(f"--{f.name} must be a finite number, got {value!r}")
                continue
            message = check(value) if check is not None else None
            if message:
                out.append(f"--{f.name} {message}, got {getattr(self, f.name)!r}")
        return out


def _is_float_field(f) -> bool:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return kind.replace(" ", "") in ("float", "float|None")


@dataclass
class SharedDims(Settings):
    """Dimensions every model component may read: the word, category and attention sizes and the dropout."""

    title: ClassVar[str] = "model: shared dimensions"
    word_embedding_dim: int = setting(300, "word embedding dim (GloVe 840B: 300; offline GloVe: 50)", check=at_least(1))
    category_embedding_dim: int = setting(50, "category embedding dim", check=at_least(1))
    subcategory_embedding_dim: int = setting(50, "subcategory embedding dim", check=at_least(1))
    attention_dim: int = setting(200, "additive attention hidden dim", check=at_least(1))
    dropout_rate: float = setting(0.2, "dropout everywhere in the model", check=unit_interval, architecture=False)


# Corpus shapes a component may read (HDC's positions, FIM's fixed history length): given with the shared dims.
CORPUS_DIMS = ("max_title_length", "max_abstract_length", "max_history_num")


def component_settings(component: type) -> tuple[type[Settings], ...]:
    """The settings classes a component class owns, its bases' included (a subclass of an encoder keeps its
    parent's flags), without repeats."""
    seen: dict[type[Settings], None] = {}
    for klass in reversed(component.__mro__):
        for s in klass.__dict__.get("settings", ()):
            seen[s] = None
    return tuple(seen)


class ComponentView:
    """What a component is built with: its own settings and the shared dimensions, nothing else.

    Reading another flag raises an AttributeError naming who owns it, so an encoder cannot come to depend on a
    run-level flag (batch size, cache switches) or on another encoder's settings unnoticed."""

    def __init__(self, component: type, values: Mapping[str, Any], owners: Mapping[str, list[str]] | None = None):
        allowed = set(SharedDims.names()) | set(CORPUS_DIMS)
        for s in component_settings(component):
            allowed |= set(s.names())
        object.__setattr__(self, "_values", {k: values[k] for k in allowed if k in values})
        object.__setattr__(self, "_component", getattr(component, "__name__", str(component)))
        object.__setattr__(self, "_owners", dict(owners or {}))

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__["_values"]
        if name in values:
            return values[name]
        owner = self.__dict__["_owners"].get(name)
        where = f"it belongs to {', '.join(owner)}" if owner else "it is a run-level flag"
        raise AttributeError(f"{self.__dict__['_component']} reads --{name}, which is not among its settings "
                             f"({where}); declare it in the component's settings class")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a component's settings are read-only")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__["_values"])
