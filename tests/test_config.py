"""common.config: profiles, dotted overrides, and clear exit-2 errors before anything is written."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

import pytest

from common.config import ConfigError, build_config, redundant_profile_keys, to_dict
from common.paths import REPO_ROOT
from tests.conftest import PYTHON, subprocess_env


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    name: str = "adam"


@dataclass
class Cfg:
    seed: int = 0
    train: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.train.steps < 1:
            raise ValueError("train.steps must be >= 1")


def test_profile_and_overrides_layer_in_order(tmp_path):
    (tmp_path / "quick.yaml").write_text("seed: 3\ntrain:\n  lr: 0.1\n")
    cfg = build_config(Cfg, "quick", ["train.lr=3e-4", "tags=[a,b]"], config_dir=tmp_path)
    assert cfg.seed == 3 and cfg.train.lr == pytest.approx(3e-4) and cfg.train.steps == 10
    assert cfg.tags == ["a", "b"] and isinstance(cfg, Cfg)
    assert to_dict(cfg)["train"]["lr"] == pytest.approx(3e-4)


@pytest.mark.parametrize("yaml_text, needle", [
    ("train:\n  lrr: 0.1\n", "train.lrr"),          # unknown nested key
    ("seeds: 1\n", "seeds"),                          # unknown top-level key
    ("train:\n  steps: many\n", "train.steps"),       # wrong type
    ("seed: 1\ntrain: [1, 2\n", "bad.yaml:3: invalid YAML"),  # broken YAML: names file:line
    ("- 1\n- 2\n", "top level must be a mapping"),
    ("train:\n  steps: 0\n", "train.steps must be >= 1"),  # dataclass validate()
])
def test_bad_profile_names_file_and_key(tmp_path, yaml_text, needle):
    (tmp_path / "bad.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        build_config(Cfg, "bad", config_dir=tmp_path)
    assert needle in str(exc.value) and "bad.yaml" in str(exc.value)


def test_bad_override_and_missing_profile(tmp_path):
    with pytest.raises(ConfigError, match="train.nope"):
        build_config(Cfg, None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="train.steps"):
        build_config(Cfg, None, ["train.steps=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        build_config(Cfg, None, ["train.steps"])
    (tmp_path / "quick.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="known profiles: quick"):
        build_config(Cfg, "pape", config_dir=tmp_path)


def test_cli_exits_2_and_writes_nothing(tmp_path):
    script = tmp_path / "run.py"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quick.yaml").write_text("seed: 1\n")
    script.write_text(
        "from dataclasses import dataclass\nfrom pathlib import Path\nfrom common.config import parse_config\n"
        "@dataclass\nclass C:\n    seed: int = 0\n"
        "cfg, args = parse_config(C, Path(__file__).parent / 'configs')\n"
        "Path(__file__).with_name('written.txt').write_text(str(cfg.seed))\n")
    ok = subprocess.run([PYTHON, str(script), "seed=5"], env=subprocess_env(), capture_output=True, text=True)
    assert ok.returncode == 0 and (tmp_path / "written.txt").read_text() == "5"
    (tmp_path / "written.txt").unlink()
    for args, needle in [(["sed=5"], "sed"), (["--profile", "nope"], "nope"),
                         (["--data-dir", str(tmp_path / "missing")], "missing")]:
        bad = subprocess.run([PYTHON, str(script), *args], env=subprocess_env(), capture_output=True, text=True)
        assert bad.returncode == 2, bad.stderr
        assert needle in bad.stderr and "config error" in bad.stderr
        assert not (tmp_path / "written.txt").exists()


def _experiment_profiles():
    import importlib

    for cfg_dir in sorted(REPO_ROOT.glob("exp_*/configs")):
        module = importlib.import_module(f"{cfg_dir.parent.name}.config")
        for path in sorted(cfg_dir.glob("*.yaml")):
            yield pytest.param(module.Config, path, id=f"{cfg_dir.parent.name}/{path.name}")


@pytest.mark.parametrize("cls,path", list(_experiment_profiles()))
def test_profiles_hold_only_differences_from_the_defaults(cls, path):
    """One layer of defaults: the dataclass holds every default, a profile YAML only what it changes."""
    assert redundant_profile_keys(cls, path) == [], f"{path}: keys equal to the dataclass default"
    build_config(cls, path)  # and it still resolves


@dataclass
class _RepeatInner:
    a: int = 1
    b: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class _RepeatOuter:
    seed: int = 0
    inner: _RepeatInner = field(default_factory=_RepeatInner)


def test_redundant_profile_keys_finds_nested_repeats(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text("seed: 0\ninner:\n  a: 2\n  b: [1, 2]\n")
    assert redundant_profile_keys(_RepeatOuter, y) == ["seed", "inner.b"]
