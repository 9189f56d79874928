"""usfmae_lib: the helper library behind the USF-MAE study notebooks.

One module per step of the study (curation, preprocessing, MAE pretraining,
fine-tuning, ...), plus `cli` (the `usfmae` command) and `runner` (papermill).
"""

__version__ = "0.1.0"


class UsfmaeError(Exception):
    """A problem the user can fix; the message names the file or value and the fix.

    The command line prints it without a traceback and exits non-zero.
    """


def atomic_write(path, write):
    """Call write(tmp) on a temporary file beside `path`, then rename it onto `path`, so that a
    killed run never leaves a half-written output. The temporary name is `.<stem>.part<pid><suffix>`:
    hidden, found by the `.*.part*` clean-ups, and with the suffix that writers such as np.save
    and savefig read the format from. Returns `path` as a Path."""
    import os
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.part{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path, text: str):
    """Write text to `path` atomically (see atomic_write)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path, data: bytes):
    """Write bytes to `path` atomically (see atomic_write)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def help_with_defaults(prog: str):
    """argparse formatter for the step commands: every option's default in --help (options whose help
    already names its default, flags off by default and options without a default are left alone)."""
    import argparse

    class Formatter(argparse.HelpFormatter):
        def _fill_text(self, text, width, indent):  # each line wrapped alone: a listing keeps its lines
            import textwrap

            return "\n".join(textwrap.fill(line, width, initial_indent=indent, break_on_hyphens=False,
                                            subsequent_indent=indent + " " * (len(line) - len(line.lstrip()) + 4))
                             for line in text.splitlines())

        def _get_help_string(self, action):
            text = action.help or ""
            if (not action.option_strings or action.default is None or action.default is False
                    or action.default == argparse.SUPPRESS or "default" in text.lower()):
                return text
            return f"{text} (default: %(default)s)".strip()

    return Formatter(prog)
