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


# ---------------------------------------------------------------- which layer set the offending value
def _config_error(tmp_path, yaml_text: str | None, overrides: list[str]) -> str:
    if yaml_text is not None:
        (tmp_path / "quick.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        build_config(Cfg, "quick" if yaml_text is not None else None, overrides, config_dir=tmp_path)
    return str(exc.value)


@pytest.mark.parametrize("overrides", [["train.steps=0"], ["train.steps=abc"], ["train.stepz=1"], ["seed=1.5"]])
def test_override_error_names_the_command_line_not_the_profile(tmp_path, overrides):
    msg = _config_error(tmp_path, "seed: 3\ntrain:\n  lr: 0.1\n", overrides)
    assert msg.startswith(f"command-line override '{overrides[0]}'"), msg
    assert "quick.yaml" not in msg


@pytest.mark.parametrize("yaml_text", ["train:\n  steps: 0\n", "train:\n  steps: abc\n", "train:\n  stepz: 1\n"])
def test_profile_error_names_the_yaml_even_with_overrides(tmp_path, yaml_text):
    msg = _config_error(tmp_path, yaml_text, ["seed=4", "train.lr=0.5"])
    assert msg.startswith(str(tmp_path / "quick.yaml") + ":"), msg
    assert "command-line" not in msg


def test_later_layer_owns_the_value(tmp_path):
    # the YAML's bad value is replaced on the command line: no error; the reverse names the override
    (tmp_path / "quick.yaml").write_text("train:\n  steps: 0\n")
    assert build_config(Cfg, "quick", ["train.steps=5"], config_dir=tmp_path).train.steps == 5
    msg = _config_error(tmp_path, "train:\n  steps: 5\n", ["train={steps: 0}"])
    assert msg.startswith("command-line override 'train={steps: 0}'"), msg


def test_error_naming_keys_of_two_layers_names_both(tmp_path):
    @dataclass
    class Pair:
        a: int = 1
        b: int = 1

        def validate(self) -> None:
            if self.a != self.b:
                raise ValueError("keys a and b must be equal")

    (tmp_path / "p.yaml").write_text("a: 2\n")
    with pytest.raises(ConfigError) as exc:
        build_config(Pair, tmp_path / "p.yaml", ["b=3"])
    assert str(exc.value) == (f"{tmp_path / 'p.yaml'} (a); command-line override 'b=3' (b): "
                              "keys a and b must be equal")


def test_omegaconf_detail_lines_are_dropped(tmp_path):
    for yaml_text, overrides in [(None, ["train.steps=abc"]), (None, ["train=5"]),
                                 ("train:\n  lr: fast\n", []), (None, ["train.nope=1"])]:
        msg = _config_error(tmp_path, yaml_text, overrides)
        assert "\n" not in msg and not any(w in msg for w in ("full_key", "reference_type", "object_type")), msg


def test_run_py_override_errors_name_their_source(tmp_path):
    """End to end through a real experiment's CLI: exit 2, one line, the right source."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "exp_tor/run.py", "--show-config", *args], cwd=REPO_ROOT,
                              env=subprocess_env(), capture_output=True, text=True, timeout=120)

    bad_cli = run("stage=bogus")
    assert bad_cli.returncode == 2 and bad_cli.stdout == ""
    assert bad_cli.stderr.strip() == ("config error: command-line override 'stage=bogus': key 'stage': "
                                      "Key 'stage' not in 'Config'. Did you mean: 'stages'?")
    profile = tmp_path / "mine.yaml"
    profile.write_text("sim:\n  n_cycles: 5\n")
    bad_yaml = run("--profile", str(profile), "seed=2")
    assert bad_yaml.returncode == 2
    assert bad_yaml.stderr.strip() == f"config error: {profile}: key 'sim.n_cycles' must be >= 100"
