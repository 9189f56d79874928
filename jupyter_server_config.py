# JupyterLab for this repository (README, "Notebooks in JupyterLab"). setup.sh already turns this
# hook on for .venv (.venv/etc/jupyter/jupyter_server_config.json); other environments
# (conda) use this file:
#     jupyter lab --config=jupyter_server_config.py
# Saving a notebook in notebooks/ then writes its .ipynb twin without outputs, execution counts
# or widget state (the .py twin never has any): the stored twins stay small and diffable. The
# outputs stay on screen until the notebook is closed; executed copies with their outputs are
# what `usfmae run` / `usfmae reproduce` write under outputs/. Notebooks anywhere else are saved as they are.
c = get_config()  # noqa: F821 - provided by Jupyter when it loads this file
c.ContentsManager.pre_save_hook = "usfmae_lib.study.strip_outputs_before_save"  # = study.HOOK
