"""Experiment configs: dataclasses + YAML profiles + dotted CLI overrides.

Each experiment declares its config as a (nested) dataclass. A *profile* is a YAML file
(``configs/quick.yaml``, ``configs/paper.yaml``) that overrides the dataclass defaults; dotted
``key=value`` arguments override the profile. Everything is validated against the dataclass
(omegaconf structured configs) *before* the experiment writes anything, and any error exits with
code 2 and a message naming the offending file and key.

    @dataclass
    class Config:
        seed: int = 0
        train: TrainConfig = field(default_factory=TrainConfig)

    cfg = parse_config(Config, config_dir=Path(__file__).parent / "configs")
    # python run.py --profile quick train.lr=3e-4 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common import paths

T = TypeVar("T")

EXIT_CONFIG_ERROR = 2


class ConfigError(ValueError):
    """A config file, key or value is invalid. The message names the file and/or key."""


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys, got {type(data).__name__}")
    return data


# OmegaConf appends "full_key: …", "reference_type=…", "object_type=…" lines to its messages: internal detail
_OMEGACONF_DETAIL = re.compile(r"^\s*(full_key:|reference_type=|object_type=)")


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    text = getattr(exc, "msg", None) or str(exc)
    msg = " ".join(line.strip() for line in text.splitlines() if line.strip() and not _OMEGACONF_DETAIL.match(line))
    return f"key '{key}': {msg}" if key else msg


def _shown(path: Path) -> str:
    """A YAML path as errors show it: repository-relative inside the repository, in full outside it."""
    p = Path(path).resolve()
    return str(p.relative_to(paths.REPO_ROOT)) if p.is_relative_to(paths.REPO_ROOT) else str(p)


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of the leaves of a nested mapping (a list is one leaf)."""
    if isinstance(node, dict) and node:
        return [k for key, value in node.items() for k in _leaf_keys(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if prefix else []


def _all_keys(node: Any, prefix: str = "") -> set[str]:
    """Every dotted key of a nested mapping, inner nodes included."""
    out: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            out |= {f"{prefix}{key}", *_all_keys(value, f"{prefix}{key}.")}
    return out


class _Origins:
    """Which layer set each config key: the dataclass defaults, a profile YAML or a command-line override.

    Errors found after merging (a wrong type, a failed ``validate()``) name the layer that set the offending
    key, so that ``seed=abc`` on the command line is never reported as coming from the profile YAML.
    """

    def __init__(self, cls: type) -> None:
        self.default = f"{cls.__name__} defaults"
        self.by_key: dict[str, str] = {}

    def set(self, tree: Any, source: str) -> None:
        for key in _leaf_keys(tree):
            # a key set again replaces everything an earlier layer set at or below it (lists are leaves)
            self.by_key = {k: v for k, v in self.by_key.items() if k != key and not k.startswith(key + ".")}
            self.by_key[key] = source

    def of(self, key: str) -> list[str]:
        """The layer(s) that set ``key`` (``a.b[0]`` -> the list ``a.b``; an inner node -> its leaves' layers)."""
        key = re.sub(r"\[[^\]]*\]", "", key)
        parts = key.split(".")
        for n in range(len(parts), 0, -1):  # the key itself or its nearest ancestor set as a whole
            found = self.by_key.get(".".join(parts[:n]))
            if found:
                return [found]
        below = list(dict.fromkeys(v for k, v in self.by_key.items() if k.startswith(key + ".")))
        return below or [self.default]

    def describe(self, keys: list[str]) -> str:
        """``source`` when every key comes from one layer, else ``source (key, …); source (key)``."""
        groups: dict[str, list[str]] = {}
        for key in keys:
            for src in self.of(key):
                groups.setdefault(src, []).append(key)
        if len(groups) == 1:
            return next(iter(groups))
        return "; ".join(f"{src} ({', '.join(ks)})" for src, ks in groups.items())

    def everything(self) -> str:
        """Every layer that set something, for an error that names no key."""
        return " + ".join(dict.fromkeys([self.default, *self.by_key.values()]))


def _keys_named(message: str, known: set[str]) -> list[str]:
    """Config keys a validate() message names: quoted ones first, else dotted words, else bare words."""
    quoted = [k for k in re.findall(r"'([^']+)'", message) if re.sub(r"\[[^\]]*\]", "", k) in known]
    if quoted:
        return list(dict.fromkeys(quoted))
    words = re.findall(r"[A-Za-z_]\w*(?:\.\w+)+|[A-Za-z_]\w*", message)
    dotted = [w for w in words if "." in w and w in known]
    return list(dict.fromkeys(dotted or [w for w in words if w in known]))


def build_config(
    cls: type[T], profile: str | Path | None = None, overrides: list[str] | None = None,
    config_dir: str | Path | None = None,
) -> T:
    """Resolve ``cls`` defaults <- profile YAML <- dotted overrides into a validated ``cls`` instance.

    ``profile`` is a profile name looked up as ``config_dir/<name>.yaml``, or a path to a YAML file.
    Raises ConfigError on unknown keys, wrong types or missing files; the message names the key and the
    layer that set it (the YAML file, or the command-line override ``key=value``).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    schema = OmegaConf.structured(cls)
    origins = _Origins(cls)
    merged = schema
    if profile is not None:
        path = Path(profile)
        if not path.suffix and config_dir is not None:
            path = Path(config_dir) / f"{profile}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in Path(config_dir).glob("*.yaml")) if config_dir else []
            raise ConfigError(f"profile '{profile}' not found: no file {path}"
                              + (f" (known profiles: {', '.join(known)})" if known else ""))
        data = _load_yaml(path)
        try:
            merged = OmegaConf.merge(schema, OmegaConf.create(data))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{_shown(path)}: {_omegaconf_message(exc)}") from None
        origins.set(data, _shown(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.lr=3e-4)")
        key = item.split("=", 1)[0]
        try:
            layer = OmegaConf.from_dotlist([item])
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"command-line override '{item}': {_omegaconf_message(exc)}") from None
        except Exception as exc:  # from_dotlist can raise plain errors on bad syntax
            raise ConfigError(f"command-line override '{key}': {exc}") from None
        origins.set(OmegaConf.to_container(layer), f"command-line override '{item}'")
    try:
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{origins.describe(missing)}: required keys have no value: {', '.join(missing)} "
                              "(set them in the profile YAML or as key=value)")
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        where = origins.describe([key]) if key else origins.everything()
        raise ConfigError(f"{where}: {_omegaconf_message(exc)}") from None
    post = getattr(obj, "validate", None)
    if callable(post):
        try:
            post()
        except (ValueError, TypeError) as exc:
            named = _keys_named(str(exc), _all_keys(OmegaConf.to_container(merged)))
            where = origins.describe(named) if named else origins.everything()
            raise ConfigError(f"{where}: {exc}") from None
    return obj  # type: ignore[return-value]


def redundant_profile_keys(cls: type, profile: str | Path) -> list[str]:
    """Dotted keys of a profile YAML whose value equals the dataclass default: a profile holds only the
    differences (one layer of defaults), so these should be deleted from it."""
    defaults = OmegaConf.to_container(OmegaConf.structured(cls), resolve=True)
    found: list[str] = []

    def walk(node: Any, default: Any, prefix: str) -> None:
        if isinstance(node, dict) and isinstance(default, dict):
            for k, v in node.items():
                walk(v, default.get(k, object()), f"{prefix}{k}.")
        elif node == default:
            found.append(prefix.rstrip("."))

    walk(_load_yaml(Path(profile)), defaults, "")
    return found


def to_dict(cfg: Any) -> dict:
    """A plain JSON-able dict of a config dataclass (for result records and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def default_data_dir() -> Path | None:
    """The offline data root (``common.paths.data_dir``; kept here for existing callers)."""
    return paths.data_dir()


def make_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The common CLI: ``--profile``, ``--data-dir``, ``--results-dir`` and dotted overrides."""
    # raw formatting keeps the usage examples of a run.py docstring on their own lines
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="quick", help="profile name in configs/ or a YAML path (default: quick)")
    p.add_argument("--data-dir", default=None, help="offline data root (default: $LLM4ALL_DATA or ../shared/data)")
    p.add_argument("--results-dir", default=None, help="results root (default: $LLM4ALL_RESULTS or ./results)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    return p


def parse_config(
    cls: type[T], config_dir: str | Path, argv: list[str] | None = None, description: str | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> tuple[T, argparse.Namespace]:
    """Parse the command line into a validated config; on any config error print it and exit 2.

    ``--data-dir``/``--results-dir`` are exported as ``LLM4ALL_DATA``/``LLM4ALL_RESULTS`` so that every
    module (and child process) resolves the same roots.
    """
    parser = parser or make_parser(description)
    args = parser.parse_intermixed_args(argv)  # overrides may stand before or after options
    try:
        if args.data_dir is not None:
            data_dir = Path(args.data_dir).expanduser()
            if not data_dir.is_dir():
                raise ConfigError(f"--data-dir {data_dir}: no such directory")
            os.environ["LLM4ALL_DATA"] = str(data_dir.resolve())
        if args.results_dir is not None:
            os.environ["LLM4ALL_RESULTS"] = str(Path(args.results_dir).expanduser().resolve())
        cfg = build_config(cls, args.profile, args.overrides, config_dir)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None
    args.profile_name = Path(str(args.profile)).stem
    return cfg, args


def parse_field_overrides(spec: str, cls: type, where: str) -> dict:
    """``"a=1,b=cosine"`` -> {"a": 1, "b": "cosine"} (values parsed as YAML), every key a field of the dataclass
    ``cls`` and the result valid (``cls(**out).validate()`` when it has one); ``where`` names the config key in
    errors. Used for ablations written as one string per variant."""
    known = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ValueError(f"{where}: '{spec}' must be key=value pairs of {cls.__name__} ({', '.join(known)})")
        out[key] = yaml.safe_load(value)
    obj = cls(**out)
    if hasattr(obj, "validate"):
        obj.validate()
    return out
