"""README tells the truth: CI runs exactly its setup and test commands, in the promised order."""

import re

from usfmae_lib import runner

README = (runner.REPO_ROOT / "README.md").read_text()
CI = (runner.REPO_ROOT / ".ci" / "run").read_text()


def first_command(section: str) -> str:
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.+?)\n```", body, flags=re.S).group(1).strip()


def test_ci_runs_the_readme_setup_and_test_commands():
    assert first_command("Setup") in CI.splitlines()
    assert first_command("Tests") in CI.splitlines()
    assert CI.index(first_command("Setup")) < CI.index(first_command("Tests"))


def test_main_command_is_reproduce_with_a_cpu_default_profile():
    assert first_command("The main command").endswith("usfmae reproduce")
    assert runner.DEFAULT_PROFILE in ("smoke", "quick")  # must run on a laptop CPU


def test_sections_in_the_promised_order():
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    promised = ["Setup", "The main command", "What it produces, and where", "Profiles",
                "Notebooks in JupyterLab", "Tests"]
    positions = [headings.index(h) for h in promised]
    assert positions == sorted(positions)
    assert README.index("USF-MAE") < README.index("## Setup")  # what the study is, first
