"""Curation's two switches (issue 27): `deduplicate` and `remove_leakage` (this study's additions, the
paper describes neither) can be turned off, and the paper's US-43d marker in Table 1. No real data:
a tree of 16 small files made here (one evaluation set, two pretraining folders, a planted exact
duplicate, a near duplicate and a near copy of an evaluation image)."""
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from usfmae_lib import UsfmaeError, cli, curation, parameters
from usfmae_lib.curation_readers import read_file
from test_curation import noise_frames, write_video  # the same planted frames and clip as test_curation

PAPER = Path(__file__).resolve().parents[1].parent / "shared" / "docs" / "seeds" / "usf-mae-paper.md"
NOT_BOLD = {"Cactus Dataset", "CAMUS_public", "Ultrasound Fetus Dataset"}  # Table 1's only rows not in bold
SWITCHES = {"deduplicate": "duplicates", "remove_leakage": "leakage"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """(root, planted): MMOTU-2D's layout with 4 images, set_a and set_b with 8 distinct images, a
    4 s video (12 frames at 3 fps), an exact copy, a resized JPEG copy and a resized JPEG copy of
    evaluation image 2. planted: {what: frame_id}."""
    root = tmp_path_factory.mktemp("switches") / "data"
    ev, a, b = root / "OTU_2d" / "images", root / "set_a", root / "set_b"
    for d in (ev, a, b):
        d.mkdir(parents=True)
    frames = noise_frames(12, 160, 192, seed=7)
    for i in range(4):
        cv2.imwrite(str(ev / f"{i}.png"), frames[i])
    for i in range(4, 12):
        cv2.imwrite(str((a if i % 2 else b) / f"img_{i:02d}.png"), frames[i])
    shutil.copy(a / "img_05.png", b / "exact_05.png")
    small = cv2.resize(frames[7], None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(b / "near_07.jpg"), small, [cv2.IMWRITE_JPEG_QUALITY, 85])
    leak = cv2.resize(frames[2], None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(a / "leak_2.jpg"), leak, [cv2.IMWRITE_JPEG_QUALITY, 85])
    write_video(a / "clip.avi", 40, 10.0, seed=9)
    return root, {"exact": "set_b/exact_05.png", "near": "set_b/near_07.jpg", "leakage": "set_a/leak_2.jpg"}


@pytest.fixture(scope="module")
def both_on(tree, tmp_path_factory):
    """The default run (both switches on) and its output folder."""
    out = tmp_path_factory.mktemp("on") / "cur"
    return curation.curate([tree[0]], out, workers=1, progress=False), out


def readable_pretraining_frames(root: Path) -> int:
    """Frames the readers produce for the pretraining datasets, counted without curate."""
    n = 0
    for ds in curation.discover_datasets([root]):
        if ds.is_eval:
            continue
        for f in curation.list_dataset_files(ds)[0]:
            _, res = read_file((str(f), 3.0, 0, 1))
            n += len(res["frames"]) if res["status"] == "ok" else 0
    return n


def test_the_default_run_drops_every_planted_copy(tree, both_on):
    root, planted = tree
    on, _ = both_on
    assert set(on.duplicates["frame_id"]) == {planted["exact"], planted["near"]}
    assert on.duplicates.set_index("frame_id")["duplicate"].to_dict() == {planted["exact"]: "exact",
                                                                         planted["near"]: "near"}
    assert on.leakage["frame_id"].tolist() == [planted["leakage"]] and on.leakage["dropped"].all()
    assert on.duplicates["dropped"].all() and not set(planted.values()) & set(on.manifest["frame_id"])
    assert on.summary["settings"]["deduplicate"] is True and on.summary["settings"]["remove_leakage"] is True
    assert not [w for w in on.summary["warnings"] if " is off: " in w]


def test_both_off_keeps_every_readable_frame_and_warns(tree, both_on, tmp_path, capsys):
    root, planted = tree
    on, on_dir = both_on
    readable = readable_pretraining_frames(root)
    assert readable == 8 + 12 + 3  # stills, the video's 4 s at 3 fps, the three planted copies
    out = tmp_path / "cur"
    shutil.copytree(on_dir, out)  # the same output folder: a switch re-reads no file
    capsys.readouterr()
    off = curation.curate([root], out, workers=1, progress=False, deduplicate=False, remove_leakage=False)
    printed = capsys.readouterr().out
    assert off.summary["files_read"] == 0 and off.summary["files_from_cache"] == off.summary["files"]

    assert len(off.manifest) == readable == len(on.manifest) + len(on.duplicates) + len(on.leakage)
    assert set(off.manifest["frame_id"]) == set(on.frames.loc[~on.frames["is_eval"], "frame_id"])
    assert set(planted.values()) <= set(off.manifest["frame_id"])
    assert "MMOTU-2D" not in set(off.manifest["dataset"])  # the evaluation set itself stays out, always
    assert (off.frames.loc[off.frames["is_eval"], "status"] == "evaluation").all()
    assert set(off.frames.loc[~off.frames["is_eval"], "status"]) == {"kept"}
    assert off.frames.set_index("frame_id").loc[list(planted.values()), "audit"].tolist() == \
        ["exact duplicate", "near duplicate", "leakage"]

    for switch, found in SWITCHES.items():  # warned: printed, in summary.json, in describe()
        assert f"WARNING: {switch} is off: " in printed
        assert any(w.startswith(f"{switch} is off: ") for w in off.summary["warnings"])
    text = " ".join(off.summary["warnings"])
    assert "weight the corpus" in text and "evaluation images may then enter pretraining" in text
    assert "notebooks 05-07 would no longer be a fair test" in text
    assert "KEPT (remove_leakage off)" in curation.describe(off) and "KEPT (deduplicate off)" in curation.describe(off)

    for name, n in (("duplicates", 2), ("leakage", 1)):  # the outputs are still written, marked not dropped
        listed = pd.read_csv(out / f"{name}.csv")
        assert len(listed) == n and not listed["dropped"].any(), name
    assert len(pd.read_parquet(out / "manifest.parquet")) == readable
    assert "with nothing dropped" in (out / "table1.md").read_text()


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_each_switch_alone_keeps_only_what_it_would_drop(switch, tree, both_on, tmp_path, capsys):
    root, planted = tree
    on, _ = both_on
    capsys.readouterr()
    c = curation.curate([root], tmp_path / "cur", workers=1, progress=False, **{switch: False})
    printed = capsys.readouterr().out
    kept_now = {"deduplicate": {planted["exact"], planted["near"]}, "remove_leakage": {planted["leakage"]}}[switch]
    assert set(c.manifest["frame_id"]) == set(on.manifest["frame_id"]) | kept_now
    assert not (set(planted.values()) - kept_now) & set(c.manifest["frame_id"])
    other = next(s for s in SWITCHES if s != switch)
    assert f"WARNING: {switch} is off: " in printed and f"WARNING: {other} is off" not in printed
    assert [w.split(":")[0] for w in c.summary["warnings"]] == [f"{switch} is off"]
    assert not getattr(c, SWITCHES[switch])["dropped"].any() and getattr(c, SWITCHES[other])["dropped"].all()
    per = c.datasets.set_index("dataset")
    assert per[["exact_duplicates", "near_duplicates", "leakage"]].sum().tolist() == [1, 1, 1]  # found, either way


def test_the_command_and_the_notebook_share_the_switch_names(tree, tmp_path, capsys):
    root, _ = tree
    out = tmp_path / "cur"
    assert cli.main(["curate", str(root), "--out", str(out), "--no-deduplicate", "--no-remove-leakage",
                     "--workers", "1", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "WARNING: deduplicate is off" in said and "warning: remove_leakage is off" in said
    assert len(pd.read_csv(out / "manifest.csv")) == readable_pretraining_frames(root)
    text = (parameters.NOTEBOOKS_DIR / "01_curation.py").read_text()
    cell = parameters.cell_parameters(parameters.parameters_source(text, ".py"))
    assert cell["deduplicate"] is True and cell["remove_leakage"] is True  # quick and smoke: today's behaviour
    with pytest.raises(SystemExit):
        cli.main(["curate", "--help"])
    helped = " ".join(capsys.readouterr().out.split())
    assert "--deduplicate, --no-deduplicate" in helped and "--remove-leakage, --no-remove-leakage" in helped
    with pytest.raises(UsfmaeError, match="deduplicate must be true or false"):
        curation.curate([root], tmp_path / "x", deduplicate="no", progress=False)


def test_profiles_set_the_switches_with_their_sources():
    for profile in ("paper", "official"):
        text = (parameters.PARAMS_DIR / profile / "01_curation.yaml").read_text()
        params = yaml.safe_load(text)
        assert params["deduplicate"] is False and params["remove_leakage"] is True, profile
        assert re.search(r"^deduplicate: false  # not stated in the paper", text, flags=re.M), profile
        assert re.search(r'^remove_leakage: true  # paper: "none of these datasets were included', text, flags=re.M)
    assert "releases no curation code" in (parameters.PARAMS_DIR / "official" / "01_curation.yaml").read_text()
    for profile in ("quick", "smoke"):
        params = yaml.safe_load((parameters.PARAMS_DIR / profile / "01_curation.yaml").read_text())
        assert not set(params) & set(SWITCHES), profile


# ============================================================================ US-43d marker
def test_registry_copies_the_bold_of_table1():
    reg = curation.load_registry()
    assert reg["us43d"].dtype == bool and int(reg["us43d"].sum()) == 43
    assert set(reg.loc[~reg["us43d"], "name"]) == NOT_BOLD
    if PAPER.exists():  # the paper beside a development checkout: the bold, row by row
        rows = PAPER.read_text().split("Dataset Name\tTarget Anatomy")[1].split("\n\n")[0].strip().splitlines()[1:]
        bold = {}
        for row in rows:
            cell = row.split("\t")[0]
            m = re.match(r"<b>(.*?)</b>", cell)
            bold[(m.group(1) if m else re.sub(r"\s*\[.*", "", cell)).strip()] = bool(m)
        assert bold == dict(zip(reg["name"], reg["us43d"]))


def test_curated_table1_marks_the_43_and_names_the_disagreement(both_on):
    _, out = both_on
    t1 = pd.read_csv(out / "table1.csv")
    reg_rows = t1[t1["in_registry"]]
    assert len(reg_rows) == 46
    marked = set(reg_rows.loc[reg_rows["us43d"].astype(str) == "True", "dataset"])
    assert len(marked) == 43 and set(reg_rows["dataset"]) - marked == NOT_BOLD
    assert t1.loc[~t1["in_registry"], "us43d"].isna().all()  # set_a, set_b: not in Table 1
    md = (out / "table1.md").read_text()
    header = md.splitlines()[0].split(" | ")
    assert header[1] == "US-43d"
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1]
            for line in md.splitlines()[2:] if line.startswith("| ")}
    assert {n for n, m in rows.items() if m == "yes"} == marked and rows["Total"] == "43"
    tex = " ".join((out / "table1.tex").read_text().split())
    for text in (" ".join(md.split()), tex):
        assert "43 of 46 rows" in text and "Cactus Dataset, CAMUS" in text
        assert "only 36 of US-43d's 43 datasets were incorporated" in text
        assert "disagree, and the paper does not say which 7 are meant" in text


def test_the_synthetic_tree_with_both_switches_off_keeps_every_readable_frame(tmp_path):
    """Acceptance of issue 27 on `usfmae synth`'s own tree (a small one: every kind of file, with
    its evaluation sets): nothing readable is lost when both switches are off."""
    from usfmae_lib import synthetic

    root = tmp_path / "synthetic"
    synthetic.generate_tree(root, seed=0, workers=1, progress=False, n_pretrain=10, n_videos=2, video_frames=5,
                            n_volumes=2, volume_shape=(5, 64, 64), n_annotated=4, n_busbra=8, n_otu=8, n_gist=6)
    off = curation.curate([root], tmp_path / "cur", workers=1, progress=False, deduplicate=False, remove_leakage=False)
    readable = readable_pretraining_frames(root)
    assert readable > 20 and len(off.manifest) == readable
    assert not {"BUS-BRA", "MMOTU-2D", "GIST514-DB"} & set(off.manifest["dataset"])  # evaluation sets: never
