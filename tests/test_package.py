"""The installable package: pyproject.toml lists every package, and ``pip install .`` gives the
console scripts, which find the shipped configs as package data."""
import os
import re
import shutil
import subprocess
import sys
import tomllib

from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_pyproject_lists_every_package():
    """setuptools installs only the packages listed: a new folder with __init__.py must be named."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "samcl").rglob("__init__.py")}
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to [tool.setuptools] packages in pyproject.toml"
    mapped = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert all((REPO / folder).is_dir() for folder in mapped.values())
    assert listed - on_disk == set(mapped), "every listed package is a folder of samcl/ or mapped by package-dir"


def test_the_version_is_written_once_in_the_package():
    """pyproject.toml takes the version from samcl.__version__ instead of a second copy."""
    import samcl

    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "samcl.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", samcl.__version__), samcl.__version__


def test_pip_install_gives_console_scripts_that_find_the_shipped_configs(tmp_path):
    src, site = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):  # a copy: the build writes build/ and *.egg-info beside them
        shutil.copy(REPO / name, src / name)
    for name in ("samcl", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    import samcl

    assert [p.name for p in site.glob("samcl-*.dist-info")] == [f"samcl-{samcl.__version__}.dist-info"]
    scripts = sorted(PYPROJECT["project"]["scripts"])
    assert scripts == ["samcl-app", "samcl-demo", "samcl-points", "samcl-predict", "samcl-test", "samcl-train"]
    assert all((site / "bin" / s).is_file() for s in scripts)

    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, not the checkout (cwd is elsewhere)
    for s in scripts:
        r = subprocess.run([str(site / "bin" / s), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: {s} "), r.stderr
    # the default config resolves to the package data: its settings are read (the flag is then refused)
    r = subprocess.run([str(site / "bin" / "samcl-train"), "--epoch", "0"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == "error: epoch must be >= 1, got 0 (flag --epoch)\n", r.stderr
    code = ("from samcl.config import CHOICES, CONFIG_DIR, default_config, load_config; "
            "cfg = load_config(default_config('sam', None)); "
            "print(CONFIG_DIR, cfg.order, cfg.lr, 'vit_tiny' in CHOICES['vit_name'], sep='|')")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.stdout.split("|") == [str(site / "samcl" / "configs"), "Kvasir_camo_ISTD_ISIC_cod_COCO", "0.005",
                                   "True\n"], r.stderr
