"""usfmae_lib: the helper library behind the USF-MAE study notebooks.

One module per step of the study (curation, preprocessing, MAE pretraining,
fine-tuning, ...), plus `cli` (the `usfmae` command) and `runner` (papermill).
"""

__version__ = "0.1.0"


class UsfmaeError(Exception):
    """A problem the user can fix; the message names the file or value and the fix.

    The command line prints it without a traceback and exits non-zero.
    """
