"""`usfmae reproduce`: runs every step in order, writes index.md, skips what did not change."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import statuses
from usfmae_lib import UsfmaeError, runner

STEP_NOTEBOOK = '''# %% tags=["parameters"]
profile = "smoke"
out_dir = "outputs/smoke"
value = 1
fail = False

# %%
from pathlib import Path
step_dir = Path(out_dir) / "{step}"
step_dir.mkdir(parents=True, exist_ok=True)
(step_dir / "plot.png").write_bytes(b"png")
(step_dir / "numbers.csv").write_text(f"value\\n{{value}}\\n")
(step_dir / "data").mkdir(exist_ok=True)
(step_dir / "data" / "image_0001.png").write_bytes(b"data, not a figure")
assert not fail, "asked to fail"
'''
STEPS = ("a_first", "b_second")


@pytest.fixture
def study(tmp_path, monkeypatch):
    # Pin the library-code fingerprint so that edits elsewhere in the package cannot make these
    # tests rerun steps; test_code_change_redoes_every_step changes it on purpose.
    monkeypatch.setattr(runner, "_code_fingerprint", lambda: "code-v1")
    notebooks, params = tmp_path / "notebooks", tmp_path / "params" / "smoke"
    notebooks.mkdir()
    params.mkdir(parents=True)
    for step in STEPS:
        (notebooks / f"{step}.py").write_text(STEP_NOTEBOOK.format(step=step))
        (params / f"{step}.yaml").write_text("profile: smoke\nvalue: 1\n")
    return tmp_path


def _reproduce(study, **kwargs):
    return runner.reproduce(
        "smoke", study / "out", steps=STEPS, notebooks_dir=study / "notebooks",
        params_dir=study / "params", progress=False, **kwargs,
    )


def test_index_lists_figures_tables_and_times(study):
    index = _reproduce(study)
    assert statuses(index) == {"a_first": "ran", "b_second": "ran"}
    text = index.read_text()
    for step in STEPS:
        assert f"figure: [{step}/plot.png]" in text
        assert f"table: [{step}/numbers.csv]" in text
    assert "image_0001.png" not in text  # data in subfolders is not a figure of the study
    assert re.search(r"\| ran \| \d+\.\d \|", text)  # time in seconds


def test_unchanged_steps_are_skipped_and_changes_propagate_downstream(study):
    _reproduce(study)
    assert statuses(_reproduce(study)) == {"a_first": "skipped (unchanged)", "b_second": "skipped (unchanged)"}
    (study / "params" / "smoke" / "b_second.yaml").write_text("profile: smoke\nvalue: 2\n")
    assert statuses(_reproduce(study)) == {"a_first": "skipped (unchanged)", "b_second": "ran"}
    (study / "params" / "smoke" / "a_first.yaml").write_text("profile: smoke\nvalue: 3\n")
    assert statuses(_reproduce(study)) == {"a_first": "ran", "b_second": "ran"}  # b consumes a
    nb = study / "notebooks" / "b_second.py"
    nb.write_text(nb.read_text() + "\n# %%\nprint('a new cell')\n")
    assert statuses(_reproduce(study)) == {"a_first": "skipped (unchanged)", "b_second": "ran"}
    assert statuses(_reproduce(study, force=True)) == {"a_first": "ran", "b_second": "ran"}
    assert statuses(_reproduce(study, overrides=["value=7"])) == {"a_first": "ran", "b_second": "ran"}


def test_code_change_redoes_every_step(study, monkeypatch):
    _reproduce(study)
    monkeypatch.setattr(runner, "_code_fingerprint", lambda: "code-v2")
    assert statuses(_reproduce(study)) == {"a_first": "ran", "b_second": "ran"}


def test_a_failed_step_stops_the_chain_and_runs_again_next_time(study):
    _reproduce(study)
    (study / "params" / "smoke" / "a_first.yaml").write_text("profile: smoke\nfail: true\n")
    with pytest.raises(UsfmaeError, match="asked to fail"):
        _reproduce(study)
    assert statuses(study / "out" / "index.md")["a_first"].startswith("FAILED")
    assert "b_second" not in statuses(study / "out" / "index.md")
    (study / "params" / "smoke" / "a_first.yaml").write_text("profile: smoke\nvalue: 1\n")
    assert statuses(_reproduce(study)) == {"a_first": "ran", "b_second": "skipped (unchanged)"}


def test_override_no_step_knows_is_refused(study):
    with pytest.raises(UsfmaeError, match="valid: fail, out_dir, profile, value"):
        _reproduce(study, overrides=["valeu=3"])


def test_missing_parameter_file_is_named(study):
    (study / "params" / "smoke" / "b_second.yaml").unlink()
    with pytest.raises(UsfmaeError, match="b_second.yaml"):
        _reproduce(study)


def test_smoke_profile_end_to_end_then_everything_skipped(tmp_path):
    """Acceptance 3 of the foundation issue: the real notebooks, through the real command."""
    out = tmp_path / "smoke"
    command = [sys.executable, "-m", "usfmae_lib.cli", "reproduce", "--profile", "smoke", "--out", str(out)]
    first = subprocess.run(command, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert statuses(out / "index.md") == {step: "ran" for step in runner.STEPS}
    for step in runner.STEPS:
        assert (out / step / f"{step}.ipynb").exists()
    # issue 16: on the smoke profile every printed verdict says it cannot judge, none claims a difference
    recon = [s for s in _printed(out / "04_reconstruction" / "04_reconstruction.ipynb").splitlines()
             if " vs flat fill: " in s or s.startswith(("25% vs 75%", "25% vs 90%"))]
    assert len(recon) == 5 and all("too small to judge (smoke profile" in s for s in recon), recon
    assert not any("beats the flat fill" in s or "lower than" in s for s in recon), recon
    discussion = (out / "06_results" / "discussion.md").read_text()
    assert "from scratch on F1: too small to judge (smoke profile" in discussion, discussion
    assert " beats " not in discussion and "**" not in (out / "06_results" / "table2.md").read_text()
    ablation = [s for s in _printed(out / "07_ablations" / "07_ablations.ipynb").splitlines() if " vs " in s
                and ": " in s and ("mask" in s or "step " in s or "random init" in s)]
    assert len(ablation) >= 6 and all("too small to judge" in s for s in ablation), ablation
    assert not any(s.split(";")[0].endswith(("above random init", "below random init")) for s in ablation), ablation
    for figure in ("labels_pretrained_vs_random", "mask_ratio_transfer", "pretraining_length"):
        assert (out / "07_ablations" / f"{figure}.png").exists() and (out / "07_ablations" / f"{figure}.csv").exists()
    second = subprocess.run(command, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert statuses(out / "index.md") == {step: "skipped (unchanged)" for step in runner.STEPS}
    assert second.stdout.count("unchanged, skipped") == len(runner.STEPS)
    # issue 18: the step through its command, with the notebook's names: notebook 05 again on BUS-BRA only,
    # every run reused from the study's own (same parameters, same checkpoint)
    one = subprocess.run([sys.executable, "-m", "usfmae_lib.cli", "finetune", "--profile", "smoke", "-p",
                          "datasets=[bus-bra]", "--out", str(out)], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    results = (out / "05_finetuning" / "results.csv").read_text().splitlines()
    assert len(results) > 1 and all(",bus-bra," in f",{row}," for row in results[1:]), results
    assert "already finished, reused" in _printed(out / "05_finetuning" / "05_finetuning.ipynb")


def _printed(executed) -> str:
    """Everything an executed notebook printed (stream outputs of its code cells)."""
    nb = json.loads(Path(executed).read_text())
    return "\n".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                     for o in c.get("outputs", []) if o.get("output_type") == "stream")
