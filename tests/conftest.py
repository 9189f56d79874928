"""Fixtures shared by several test files."""
import pytest

from usfmae_lib import synthetic


@pytest.fixture(scope="session")
def synth_eval(tmp_path_factory):
    """The three evaluation sets of the synthetic tree in their published layouts, nothing else
    (BUSBRA/, OTU_2d/, usd514_jpeg_roi/). Read-only: tests copy or link what they change."""
    root = tmp_path_factory.mktemp("synth_eval")
    synthetic.generate_tree(root, seed=3, profile="smoke", workers=1, progress=False, n_pretrain=0,
                            n_videos=0, n_volumes=0, n_annotated=0)
    return root
