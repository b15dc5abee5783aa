"""The README says what the code does: every default in its flag table is the effective one,
its quick start is what CI runs, and the files it names exist."""
import re
from typing import Any, Dict, List, Tuple

from samcl.cli import Parser, add_common_flags, add_train_flags
from samcl.config import CONFIG_DIR, DEFAULT_CONFIG, default_config, load_config, load_model_table
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
# defaults the README describes rather than states: the code leaves them None and decides at run time
DESCRIBED = {"derived", "GPU 0 if present, else CPU"}


def flag_table(readme: str) -> List[Tuple[List[str], str]]:
    """(flags, default cell) of each row of the README's `| flag | default | meaning |` table."""
    lines = readme.splitlines()
    start = lines.index("| flag | default | meaning |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        flag_cell, default_cell = [c.strip() for c in line.strip("|").split("|")][:2]
        rows.append((re.findall(r"`(--[\w-]+)`", flag_cell), default_cell))
    return rows


def stated_defaults(readme: str) -> Dict[str, str]:
    """Flag -> the default the README states for it (one per flag, or one for all of a row)."""
    out = {}
    for flags, cell in flag_table(readme):
        assert flags, f"a row of the flag table names no flag: {cell!r}"
        values = [cell] * len(flags) if cell in DESCRIBED else [v.strip() for v in cell.split(",")]
        if len(values) == 1:
            values *= len(flags)
        assert len(values) == len(flags), f"{flags}: {cell!r} does not give one default per flag"
        out.update({f: v.strip("`") for f, v in zip(flags, values)})
    return out


def effective_defaults() -> Dict[str, Any]:
    """Flag -> what train.py runs with when the flag is not given: the parser's default or, where
    that is None (the flag then leaves the setting to the config), the default config's value;
    None where the code decides at run time."""
    p = Parser()
    add_common_flags(p, "sam")
    add_train_flags(p, "sam")
    cfg = load_config(default_config("sam", None))
    arch = load_model_table("sam.yaml")[cfg.vit_name]
    at_run_time = {"img_size": arch["img_size"], "ckpt": f"checkpoint/{arch['checkpoint']}"}
    out: Dict[str, Any] = {}
    for a in p._actions:
        if not a.option_strings or a.dest == "help":
            continue
        if a.dest == "config":
            value: Any = DEFAULT_CONFIG["sam"].relative_to(CONFIG_DIR.parent)
        elif a.default is not None:
            value = a.default
        else:
            value = getattr(cfg, a.dest, None)
            value = at_run_time.get(a.dest) if value is None else value
        out[a.option_strings[0]] = value
    return out


def as_readme(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def wrong_defaults(readme: str) -> Dict[str, Tuple[str, Any]]:
    """Flag -> (stated, effective) where the README's flag table disagrees with the code."""
    stated, effective = stated_defaults(readme), effective_defaults()
    assert len(stated) >= 10
    unknown = sorted(set(stated) - set(effective))
    assert not unknown, f"the README's flag table names flags train.py lacks: {unknown}"
    wrong = {}
    for flag, text in stated.items():
        value = effective[flag]
        if not (value is None if text in DESCRIBED else text == as_readme(value)):
            wrong[flag] = (text, value)
    return wrong


def test_the_flag_table_states_the_effective_defaults():
    assert wrong_defaults(README) == {}


def test_the_default_check_catches_a_wrong_default():
    """The comparison is not vacuous: a changed default in the table is reported."""
    changed = README.replace("| `--epoch` | 20 |", "| `--epoch` | 25 |")
    assert changed != README and wrong_defaults(changed) == {"--epoch": ("25", 20)}


def quick_start_commands() -> List[str]:
    """The commands of the README's first two code blocks (install and demo; tests)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)[:2]
    return [c.strip() for b in blocks for c in b.strip().split(" && ")]


def test_ci_runs_the_quick_start_as_written():
    """.ci/run is the README's two commands, one step a line, in the same order; what follows its
    "CI only" line (the web app's browser test) runs after them."""
    text = (REPO / ".ci" / "run").read_text()
    readme_part, ci_only = text.split("# --- CI only", 1)
    ci = [line.strip() for line in readme_part.splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == quick_start_commands()
    assert "pytest -q tests/test_app.py" in ci_only


def test_the_documents_name_no_outside_document_and_no_missing_file():
    for path in [REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "bench" / "README.md",
                 REPO / "data" / "README.md", REPO / "checkpoint" / "README.md"]:
        text, doc = path.read_text(), path.relative_to(REPO)
        for pattern in (r"SPEC\b", r"seed README", r"[Ii]ssue \d+", r"[Ii]ssue #\d+"):
            assert not re.search(pattern, text), f"{doc} cites {pattern!r}, which the repository lacks"
        for name in re.findall(r"`((?:samcl|tests|bench|configs|docs)/[\w./-]+\.(?:py|yaml|md))`", text):
            assert (REPO / name).exists(), f"{doc} names {name}, which does not exist"
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (path.parent / target).exists(), f"{doc} links to {target}, which does not exist"


def test_the_readme_is_at_most_300_lines():
    """The README stays an overview; each subject has its page in docs/."""
    assert len(README.splitlines()) <= 300


def heading_anchors(text: str) -> set:
    """The anchors GitHub gives a Markdown file's headings (outside code blocks)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    out = set()
    for title in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower().replace("`", "")).replace(" ", "-")
        out.add(slug)
    return out


def test_every_link_to_a_heading_finds_it():
    for path in [REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "bench" / "README.md"]:
        text, doc = path.read_text(), path.relative_to(REPO)
        for target, anchor in re.findall(r"\]\(([^)#:]*)#([^)]+)\)", text):
            page = path.parent / target if target else path
            if not page.exists():
                continue  # the missing file is reported by the test above
            assert anchor in heading_anchors(page.read_text()), f"{doc} links to {target}#{anchor}, no such heading"
