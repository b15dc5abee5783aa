"""Settings are declared once: the plugins' declarations read without importing them equal the
imported classes, a new method with a setting is one file, flags are matched exactly, and recipes
compose from a base."""
import dataclasses
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from samcl.cli import CLIError, Parser, add_common_flags, add_train_flags
from samcl.config import CHOICES, CONFIG_DIR, RANGES, SETTINGS_META, Config, ConfigError, load_config, read_config_file
from samcl.settings import SettingsError, meta, plugin_files, read_settings
from tests.conftest import REPO
from tests.test_entry_points import WATCH


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


@pytest.mark.parametrize("path", [p for p, _d, _l in plugin_files()], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_plugin_file_read_without_import_declares_what_it_imports_as(path):
    read = {name: (hint, f) for name, hint, f in read_settings(path, "group")}
    module = importlib.import_module(_module_name(path))
    imported = {}
    for cls in vars(module).values():
        if isinstance(cls, type) and cls.__module__ == module.__name__ and dataclasses.is_dataclass(cls) \
                and any(b.__name__ == "Settings" for b in cls.__mro__[1:]):
            imported.update({f.name: f for f in dataclasses.fields(cls)})
    assert sorted(read) == sorted(imported)
    for name, f in imported.items():
        hint, g = read[name]
        assert hint == f.type, name
        assert (g.default, g.default_factory is dataclasses.MISSING) == (f.default, f.default_factory is
                                                                        dataclasses.MISSING), name
        assert meta(g)._replace(group="") == meta(f)._replace(group=""), name
        # and the Config carries it, with the plugin's name as its group
        assert SETTINGS_META[name] == meta(g)._replace(group=SETTINGS_META[name].group)
        assert SETTINGS_META[name].group == f"{'method' if path.parent.name == 'methods' else 'learning module'} " \
                                            f"{path.stem}"


def test_the_baselines_settings_live_in_their_files():
    assert {n for n, _h, _f in read_settings(REPO / "samcl" / "methods" / "ewc.py", "g")} == {"ewc_lambda", "ewc_gamma"}
    assert SETTINGS_META["ewc_lambda"].group == "method ewc"
    assert SETTINGS_META["l2p_top_k"].group == "learning module prompt_pool"
    assert RANGES["lwf_temperature"].open_low and RANGES["replay_size"].low == 1
    with pytest.raises(ConfigError, match=r"ewc_lambda must be >= 0, got -1.0 \(flag --ewc_lambda\)"):
        load_config(None, {"ewc_lambda": -1.0})
    with pytest.raises(ConfigError, match=r"replay_size must be >= 1, got 0"):
        load_config(None, {"replay_size": 0})


def test_choices_and_ranges_derive_from_the_declarations():
    assert CHOICES["scheduler"] == ("reference", "cosine") and CHOICES["feature_cache"] == ("auto", "off", "device",
                                                                                            "cpu")
    assert "vit_tiny" in CHOICES["vit_name"] and "hiera_toy" in CHOICES["hiera_name"]
    assert str(RANGES["mask_threshold"]) == "in 0..255" and str(RANGES["lr"]) == "> 0"
    assert str(RANGES["weight_decay"]) == ">= 0"  # a number without a declared range
    assert set(SETTINGS_META) == {f.name for f in dataclasses.fields(Config)}


def test_a_setting_that_is_not_literal_or_declared_twice_is_refused_naming_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nWEIGHT = 3.0\n\n\nclass BadSettings(Settings):\n"
                   "    bad_weight: float = setting(WEIGHT, 'w')\n")
    with pytest.raises(SettingsError, match=rf"{bad}:6 \(BadSettings\): 'WEIGHT' is not a literal"):
        read_settings(bad, "g")
    odd = tmp_path / "odd.py"
    odd.write_text("class OddSettings(Settings):\n    odd: torch.Tensor = setting(1, 'x')\n")
    with pytest.raises(SettingsError, match="annotation 'torch.Tensor' is not one a setting may have"):
        read_settings(odd, "g")
    one, two = tmp_path / "one.py", tmp_path / "two.py"
    for p in (one, two):
        p.write_text("class S(Settings):\n    same_name: int = setting(1, 'x')\n")
    import samcl.settings as settings

    monkeypatch.setattr(settings, "plugin_files", lambda: [(one, "register_method", "method"),
                                                            (two, "register_method", "method")])
    with pytest.raises(SettingsError, match=f"'same_name' is declared in {one} and in {two}"):
        settings.plugin_settings()


NEW_METHOD = '''"""A method added as one file: fine-tuning with its loss scaled."""
import torch

from ..registry import register_method
from ..settings import Settings, setting
from .finetune import FineTune


class ScaledSettings(Settings):
    """Scaled fine-tuning."""

    scaled_weight: float = setting(2.5, "scaled: factor of the loss", low=1)


@register_method("scaled")
class Scaled(FineTune):
    def observe(self, batch, prefix, forward) -> torch.Tensor:
        return self.cfg.scaled_weight * super().observe(batch, prefix, forward)
'''


def test_a_new_method_with_a_setting_is_one_file(tmp_path):
    """A copy of the package plus one file in samcl/methods/ and nothing else edited: its flag is in
    --help (still without torch), its setting is checked, and the method is registered."""
    shutil.copytree(REPO / "samcl", tmp_path / "samcl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    shutil.copy(REPO / "train.py", tmp_path / "train.py")
    (tmp_path / "samcl" / "methods" / "scaled.py").write_text(NEW_METHOD)
    code = WATCH + "sys.argv = ['train.py', '--help']\nrunpy.run_path('train.py', run_name='__main__')\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY IMPORT" not in r.stderr, r.stderr
    assert "method scaled:\n  --scaled_weight SCALED_WEIGHT\n" in r.stdout
    assert "scaled: factor of the loss (default: 2.5)" in " ".join(r.stdout.split())
    methods = "der, er, ewc, finetune, joint, l2p, lwf, merge, olora, samcl, scaled, zeroshot"
    assert methods in " ".join(r.stdout.split())
    r = subprocess.run([sys.executable, "train.py", "--scaled_weight", "0.5"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert (r.returncode, r.stderr) == (2, "error: scaled_weight must be >= 1, got 0.5 (flag --scaled_weight)\n")
    code = ("from samcl.config import load_config; from samcl.plugins import check_plugins; "
            "from samcl.registry import METHODS; "
            "cfg = check_plugins(load_config(None, {'method': 'scaled', 'learning_module': 'lora', "
            "'scaled_weight': 4.0})); print(METHODS.get(cfg.method).__name__, cfg.scaled_weight, "
            "METHODS.get(cfg.method).__module__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["Scaled", "4.0", "samcl.methods.scaled"], r.stderr


def _train_parser() -> Parser:
    p = Parser(prog="train.py")
    add_common_flags(p, "sam")
    add_train_flags(p, "sam")
    return p


def test_flags_are_matched_exactly_not_by_prefix():
    p = _train_parser()
    assert p.parse_args(["--selector_epochs", "3"]).selector_epochs == 3
    assert p.parse_args(["--selector", "oracle"]).selector == "oracle"
    with pytest.raises(CLIError, match=r"unrecognized arguments: --selector_ep 3"):
        p.parse_args(["--selector_ep", "3"])
    with pytest.raises(CLIError, match=r"unrecognized arguments: --epo 3"):
        p.parse_args(["--epo", "3"])


def test_every_setting_has_a_flag_and_the_test_scripts_take_the_common_ones():
    train_flags = {a.dest for a in _train_parser()._actions}
    assert set(SETTINGS_META) <= train_flags
    test = Parser(prog="test.py")
    add_common_flags(test, "sam")
    test_flags = {a.dest for a in test._actions}
    assert {n for n, m in SETTINGS_META.items() if m.scope == "common"} <= test_flags
    assert "lr" not in test_flags and "ewc_lambda" not in test_flags
    p = _train_parser()
    args = p.parse_args(["--unseen", "--aug_layers", "7", "8", "--no-deterministic", "--random_weights"])
    assert (args.unseen, args.aug_layers, args.deterministic, args.random_weights) == ([], [7, 8], False, True)


def test_help_states_the_family_default():
    def help_of(family: str, flag: str) -> str:
        p = Parser(prog="x")
        add_common_flags(p, family)
        add_train_flags(p, family)
        return next(a.help for a in p._actions if flag in a.option_strings)

    assert help_of("sam", "--batch_size").endswith("(default: 8)")
    assert help_of("sam2", "--batch_size").endswith("(default: 16)")
    assert help_of("sam2", "--output_dir").endswith("(default: log_sam2)")


def test_a_recipe_starts_from_its_base_and_holds_only_its_differences(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("epoch: 3\nlr: 0.1\nseed: 7\n")
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nlr: 0.2\n")
    (tmp_path / "c.yaml").write_text("base: sub/b.yaml\nseed: 9\n")
    assert read_config_file(str(tmp_path / "c.yaml")) == {"epoch": 3, "lr": 0.2, "seed": 9}
    cfg = load_config(str(tmp_path / "c.yaml"), {"seed": 11})
    assert (cfg.epoch, cfg.lr, cfg.seed) == (3, 0.2, 11)
    (tmp_path / "a.yaml").write_text("base: c.yaml\n")
    cycle = r"a.yaml: base c.yaml leads back to \S*c.yaml \(\S*c.yaml -> \S*b.yaml -> \S*a.yaml\)"
    with pytest.raises(ConfigError, match=cycle):
        read_config_file(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"d.yaml: base must name a recipe file, got \['a.yaml'\]"):
        read_config_file(str(tmp_path / "d.yaml"))
    (tmp_path / "e.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml not found"):
        read_config_file(str(tmp_path / "e.yaml"))


@pytest.mark.parametrize("method", ["der", "er", "ewc", "joint", "l2p", "lwf", "olora", "zeroshot"])
def test_a_baseline_recipe_differs_from_finetune_only_in_what_it_sets(method):
    """Each baseline recipe is `base: finetune.yaml` plus its own lines, and resolves to finetune's
    settings except those lines: only the method (and its own settings) differ."""
    path = CONFIG_DIR / "baselines" / f"{method}.yaml"
    own = read_config_file(str(path))
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "base: finetune.yaml" and len(lines) <= 9  # l2p: 4 pool settings, its gate, clipping
    finetune = load_config(str(CONFIG_DIR / "baselines" / "finetune.yaml")).to_dict()
    resolved = load_config(str(path)).to_dict()
    differ = {k for k in resolved if resolved[k] != finetune[k]}
    assert "method" in differ and differ <= {line.split(":", 1)[0] for line in lines} and own["method"] == method


def test_the_settings_page_is_generated_from_the_declarations():
    from samcl.cli import settings_reference

    page = (REPO / "docs" / "settings.md").read_text()
    regenerate = "python -c \"from samcl.cli import settings_reference; print(settings_reference(), end='')\""
    assert page == settings_reference(), f"docs/settings.md is stale; regenerate it: {regenerate} > docs/settings.md"
    for name in SETTINGS_META:
        assert page.count(f"| `--{name}` |") == 1, name
