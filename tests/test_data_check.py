"""`usfmae data check` (issue 15): what the roots hold, from headers only, in agreement with curation."""
import shutil

import pandas as pd

from usfmae_lib import cli, curation, curation_check


def test_header_counts_match_what_curation_makes_on_real_files(real, tmp_path):
    roots = sorted(p for p in real("openus_sample").iterdir() if p.is_dir())
    found, evals = curation_check.check_roots(roots)
    c = curation.curate(roots, tmp_path / "cur", workers=1, progress=False)
    made = c.manifest.groupby("dataset").size() + c.rejects.groupby("dataset").size().reindex(
        c.manifest["dataset"].unique(), fill_value=0)  # the RF frame: counted from its header, then refused
    for r in found.itertuples():
        assert r.expected_frames == made[r.dataset], r.dataset
        assert r.unreadable_headers == 0
    pocus = found.set_index("dataset").loc["Pocus"]
    assert pocus["in_registry"] and pocus["table1"] == 2264 and "video .gif 1" in pocus["kinds"]
    assert evals.empty


def test_synthetic_tree_lists_its_eval_sets_with_every_fold(synth_eval, capsys):
    assert cli.main(["data", "check", str(synth_eval)]) == 0
    out = capsys.readouterr().out
    assert "3 of the 46 OpenUS-46 datasets found" in out
    for line in ("BUS-BRA     ", "MMOTU-2D    ", "GIST514-DB  "):
        assert any(l.startswith("  " + line) and ": ok: " in l for l in out.splitlines()), line
    assert "5 fold(s) [1, 2, 3, 4, 5]" in out and "5 fold(s) [0, 1, 2, 3, 4]" in out


def test_a_broken_eval_layout_exits_1_and_names_it(synth_eval, tmp_path, capsys):
    bb = tmp_path / "BUSBRA"
    shutil.copytree(synth_eval / "BUSBRA", bb)
    cv = pd.read_csv(bb / "5-fold-cv.csv")
    cv.iloc[:3].assign(kFold=9).pipe(lambda df: pd.concat([cv.iloc[3:], df])).to_csv(bb / "5-fold-cv.csv", index=False)
    assert cli.main(["data", "check", str(bb), "--csv", str(tmp_path / "found.csv")]) == 1
    out = capsys.readouterr().out
    assert "LAYOUT ERROR" in out and "5-fold-cv.csv" in out
    assert pd.read_csv(tmp_path / "found.csv")["dataset"].tolist() == ["BUS-BRA"]


def test_a_missing_root_is_a_message(tmp_path, capsys):
    assert cli.main(["data", "check", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_folders_are_listed_as_such(tmp_path, capsys):
    import cv2
    import numpy as np

    (tmp_path / "root" / "my_scans").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "root" / "my_scans" / "a.png"), np.zeros((64, 64), np.uint8))
    assert cli.main(["data", "check", str(tmp_path / "root")]) == 0
    out = capsys.readouterr().out
    assert "0 of the 46" in out and "folders that match no dataset" in out
    assert "my_scans        " in out and "1 frames expected; not in OpenUS-46" in out
