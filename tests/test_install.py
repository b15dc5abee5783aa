"""The README's install for a machine without a GPU, and what git leaves to the user."""
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_cpu_only_torch_command_installs_the_pinned_pair_from_pytorchs_cpu_index():
    readme = (REPO / "README.md").read_text()
    install = readme[readme.index("## Install\n"):readme.index("## How it works")]
    blocks = re.findall(r"```bash\n(.*?)```", install, re.S)
    assert len(blocks) == 1
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$", (REPO / "requirements.txt").read_text(), re.M))
    assert blocks[0].strip() == (f"python3 -m venv .venv && .venv/bin/pip install -q torch=={pins['torch']} "
                                 f"torchvision=={pins['torchvision']} --index-url https://download.pytorch.org/whl/cpu")


def test_the_domain_maps_at_the_project_root_and_the_tryout_are_ignored_and_nothing_else():
    names = ["datasets_train.json", "datasets_test.json", "tryout/datasets_train.json",
             "configs/demo_sam.yaml", "sub/datasets_train.json", "docs/tryout/x.md"]
    r = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=REPO, capture_output=True, text=True)
    assert r.stdout.split() == names[:3]
