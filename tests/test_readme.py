"""README tells the truth: CI runs exactly its setup and test commands, in the promised order."""

import re

from usfmae_lib import parameters

README = (parameters.REPO_ROOT / "README.md").read_text()
CI = (parameters.REPO_ROOT / ".ci" / "run").read_text()
MAKEFILE = (parameters.REPO_ROOT / "Makefile").read_text()


def first_command(section: str) -> str:
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.+?)\n```", body, flags=re.S).group(1).strip()


def make_rule(target: str) -> tuple[list[str], list[str]]:
    """The Makefile's prerequisites and recipe lines of `target`, its variables expanded."""
    variables = dict(re.findall(r"^(\w+)\s*[:?]?=\s*(.*?)\s*$", MAKEFILE, flags=re.M))
    text = re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], MAKEFILE)
    rule = re.search(rf"^{re.escape(target)}:(.*)\n((?:\t.*\n?)*)", text, flags=re.M)
    assert rule, f"Makefile has no rule for {target}"
    return rule.group(1).split(), [line[1:] for line in rule.group(2).splitlines()]


def test_ci_runs_the_readme_setup_and_test_commands():
    # .ci/run: make setup, then make test; the Makefile runs exactly README's two commands
    lines = CI.splitlines()
    assert "make setup" in lines and "make test" in lines
    assert lines.index("make setup") < lines.index("make test")
    (marker,), setup_recipe = make_rule("setup")
    assert setup_recipe == []  # a name for the file target below
    assert make_rule(marker) == (["requirements.lock", "setup.sh"], [first_command("Setup")])
    assert make_rule("test") == ([marker], [first_command("Tests")])


def test_the_two_commands_open_the_readme():
    top = README.split("\n## ", 1)[0]
    commands = re.search(r"```bash\n(.+?)\n```", top, flags=re.S).group(1).splitlines()
    assert [c.split("#")[0].strip() for c in commands] == ["make reproduce", "make test"]
    prerequisites, recipe = make_rule("reproduce")
    assert recipe == [".venv/bin/usfmae reproduce --profile smoke"]  # PROFILE's default
    assert f"`{recipe[0]}`" in top and f"`{first_command('Tests')}`" in top
    assert prerequisites == make_rule("test")[0]  # both set up .venv first


def test_main_command_is_reproduce_with_a_cpu_default_profile():
    assert first_command("The main command").endswith("usfmae reproduce")
    assert parameters.DEFAULT_PROFILE in ("smoke", "quick")  # must run on a laptop CPU


def test_sections_in_the_promised_order():
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    promised = ["Setup", "The main command", "What it produces, and where", "Profiles",
                "Notebooks in JupyterLab", "Tests"]
    positions = [headings.index(h) for h in promised]
    assert positions == sorted(positions)
    assert README.index("USF-MAE") < README.index("## Setup")  # what the study is, first


def _section(heading: str) -> str:
    return README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_learning_path_comes_first_and_its_commands_are_the_real_ones():
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    assert headings[0] == "Learning path"  # before Setup: where a newcomer starts
    path = _section("Learning path")
    assert f"`{first_command('Setup')}`" in path
    assert "`.venv/bin/usfmae reproduce --profile smoke`" in path and "smoke" in parameters.PROFILES
    assert f"`{first_command('Notebooks in JupyterLab')}`" in path
    for name in ("03_mae_pretraining", "04_reconstruction"):
        assert f"`{name}`" in path and (parameters.NOTEBOOKS_DIR / f"{name}.py").is_file()


def test_the_table2_box_is_short_and_matches_the_folds_of_the_code():
    from usfmae_lib.datasets import official_folds

    quote = re.search(r"^> \*\*What a Table 2 cell means\.\*\*.+?(?=\n\n)", README, flags=re.M | re.S).group(0)
    box = " ".join(quote.replace(">", " ").split())  # one line, without the quote marks
    assert len(box.split()) < 120
    n = {d: len(official_folds(d)) for d in ("bus-bra", "gist514", "mmotu-2d")}
    assert f"BUS-BRA's {n['bus-bra']} folds" in box and f"GIST514-DB's {n['gist514']} splits" in box
    assert n["mmotu-2d"] == 1 and "MMOTU-2D has one split" in box
    # the two numbers of a cell, each named for what it is: the spread of runs, the interval of the mean
    assert "± is the sd of the single runs" in box and "95% interval of the mean itself" in box
    for source in ("pretraining runs", "splits", "seeds", "test images"):
        assert source in box
