"""The notebooks as a user meets them: JupyterLab in headless Chromium (README, "Notebooks in JupyterLab").

A copy of the repository's notebooks, params and library is served by `jupyter lab notebooks/` (the
README's command, so kernels run in notebooks/), and Chromium, driven by Selenium through Debian's
chromedriver (no browser download at run time), does what a user does:
- notebook 01: set `profile = "smoke"` in the parameters cell by typing, Run > Run All Cells, then no
  error output, every code cell executed, its figures drawn; saved from the lab, the stored .ipynb
  has no outputs (the pre-save hook setup.sh installs);
- notebook 04 (over an untrained checkpoint where notebook 03 leaves one): the interactive view is on
  by itself in the lab, and moving its mask-ratio slider redraws the image;
- notebook 06 (over fine-tuning results made by hand where notebook 05 leaves them): set to the smoke
  profile and run, its figures (confusion matrices, label efficiency) are drawn in the lab, not only
  saved;
- the outputs land in <repo>/outputs/smoke/, nothing under notebooks/ but the notebooks;
- the report `usfmae reproduce` writes (index.html, usfmae_lib/report.py), opened from disk: every
  image drawn, nothing fetched from the network (no JupyterLab needed for this one).
Screenshots go to the test's folder (pytest --basetemp, or the path printed with -s).

Needs `chromium` and `chromium-driver` (Debian/Ubuntu packages) and the `selenium` package (dev
extras); without them the test skips and says so, except where USFMAE_BROWSER_TEST=required (CI,
.ci/run), where it fails instead, so the check cannot vanish unnoticed.
"""
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from usfmae_lib import parameters

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
REQUIRED = os.environ.get("USFMAE_BROWSER_TEST") == "required"


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package (pip install -e '.[dev]')"
    if not CHROMIUM or not DRIVER:
        return "Chromium and its driver (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser_ready():
    missing = _missing()
    if missing and REQUIRED:
        pytest.fail(f"USFMAE_BROWSER_TEST=required but {missing} is missing")
    if missing:
        pytest.skip(f"browser test: needs {missing}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_finetuning_out(out: Path):
    """What notebook 06 reads from notebook 05, made by hand: results.csv, label_efficiency.csv,
    setup.json and each run's test_predictions.csv; two binary tasks x USF-MAE and scratch x two folds,
    at 25% and 100% of the labels."""
    import pandas as pd

    from usfmae_lib.metrics import classification_metrics

    step = out / "05_finetuning"
    rng = np.random.default_rng(0)
    rows = []
    for dataset, classes in (("bus-bra", ["benign", "malignant"]), ("gist514", ["leiomyoma", "GIST"])):
        for model in ("usf-mae", "scratch"):
            for fold in (1, 2):
                for fraction in (0.25, 1.0):
                    run = f"{dataset}/fold{fold}/{model}/finetune/hand/seed0_frac{fraction:g}"
                    labels, prob = rng.integers(0, 2, 20), rng.dirichlet([1, 1], 20)
                    (step / "runs" / run).mkdir(parents=True)
                    pd.DataFrame({"path": [f"{i}.png" for i in range(20)], "label": labels, "pred": prob.argmax(1),
                                  **{f"prob_{c}": prob[:, k] for k, c in enumerate(classes)}}).to_csv(
                        step / "runs" / run / "test_predictions.csv", index=False)
                    row = dict(dataset=dataset, fold=fold, model=model, mode="finetune", seed=0, fraction=fraction,
                               n_classes=2, run=run, init="random (scratch control)" if model == "scratch"
                               else "usf-mae: 03_mae_pretraining/checkpoints/checkpoint-last.pth")
                    for k, v in classification_metrics(labels, prob, 1).items():
                        row.update({k: v, f"{k}_low": v - 0.1, f"{k}_high": v + 0.1})
                    rows.append(row)
    table = pd.DataFrame(rows)
    table[table["fraction"] == 1.0].to_csv(step / "results.csv", index=False)
    table.to_csv(step / "label_efficiency.csv", index=False)
    (step / "setup.json").write_text(json.dumps(dict(profile="smoke", synthetic=True, img_size=32, epochs=1,
                                                     n_configs=1, n_bootstrap=20, select_on="balanced_accuracy",
                                                     head_norm=True, layer_decay=1.0)))


@pytest.fixture(scope="module")
def repo(tmp_path_factory, make_recon_out):
    """A copy of what the lab needs (the library, notebooks, params), and notebook 04's inputs under
    outputs/smoke/: a tiny cleaned tree and an untrained checkpoint (notebook 03 is not run here), and
    notebook 06's: fine-tuning results made by hand (notebook 05 is not run either).
    USFMAE_BROWSER_REPO=CLONE uses a throwaway clone instead, after `usfmae reproduce --profile smoke`
    there (README's own steps; the test edits and saves its notebook 01)."""
    given = os.environ.get("USFMAE_BROWSER_REPO")
    if given:
        return Path(given).resolve()
    root = tmp_path_factory.mktemp("lab") / "repo"
    ignore = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints", "outputs")
    for name in ("usfmae_lib", "notebooks", "params"):
        shutil.copytree(parameters.REPO_ROOT / name, root / name, ignore=ignore)
    rng = np.random.default_rng(0)
    scans = {a: [(rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(2)] for a in ("breast", "liver")}
    make_recon_out(root / "outputs" / "smoke", scans, "mae_vit_tiny_patch16_dec128d2b", 64, dict(depth=2, decoder_depth=1))
    _make_finetuning_out(root / "outputs" / "smoke")
    return root


@pytest.fixture(scope="module")
def lab(browser_ready, repo, tmp_path_factory):
    """`jupyter lab notebooks/` run from the copy, on 127.0.0.1 with a token; its URL."""
    port, token = _free_port(), secrets.token_hex(16)
    state = tmp_path_factory.mktemp("jupyter_state")
    env = {**os.environ, "PYTHONPATH": str(repo), "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces"), "JUPYTER_CONFIG_DIR": str(state / "config"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = open(state / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "notebooks/", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", *(["--allow-root"] if os.geteuid() == 0 else [])],  # CI runs as root
        cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited ({proc.returncode}): {(state / 'lab.log').read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"jupyter lab did not listen within 120 s: {(state / 'lab.log').read_text()[-3000:]}")
        yield dict(url=f"http://127.0.0.1:{port}", token=token, log=state / "lab.log")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _chrome():
    """Headless Chromium through Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # no background networking: this machine's closed network refuses Chromium's own connections
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    browser.set_page_load_timeout(120)
    return browser


@pytest.fixture(scope="module")
def driver(lab):
    browser = _chrome()
    yield browser
    browser.quit()


# ------------------------------------------------------------------------------------ the user's actions
# every query looks in the notebook _open named (window.usfmaeNotebook), found by its tab: on opening a
# second notebook the lab first restores the one opened before, visible for a second or two, and only
# then opens the new one and hides the old (CI once typed into the wrong notebook in that gap)
ACTIVE = ("const tab = [...document.querySelectorAll('#jp-main-dock-panel .lm-TabBar-tab')]"
          ".find(t => (t.querySelector('.lm-TabBar-tabLabel') || {}).textContent === window.usfmaeNotebook);"
          "const nb = (tab && document.getElementById(tab.dataset.id)) || document;")


def _wait(condition, timeout: float, what: str, browser=None, shot: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    if browser is not None and shot is not None:
        browser.save_screenshot(str(shot))
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (screenshot {shot})" if shot else ""))


def _open(browser, lab, name: str, shots: Path):
    browser.get(f"{lab['url']}/lab/tree/{name}?token={lab['token']}")
    browser.execute_script("window.usfmaeNotebook = arguments[0];", name)
    _wait(lambda: browser.execute_script(
        ACTIVE + "return nb !== document && !nb.classList.contains('lm-mod-hidden') && "
                 "nb.querySelectorAll('.jp-CodeCell .cm-content').length"),
        120, f"{name} to open", browser, shots / f"{name}_open_failed.png")
    _wait(lambda: _kernel_idle(browser), 120, f"{name}'s kernel to start", browser, shots / f"{name}_kernel_failed.png")


def _kernel_idle(browser) -> bool:
    return bool(browser.execute_script(
        ACTIVE + "return [...nb.querySelectorAll('.jp-Notebook-ExecutionIndicator, [data-status]')]"
        ".some(e => (e.getAttribute('data-status') || '') === 'idle')"))


def _set_profile(browser, profile: str, shots: Path):
    """Type over the value of `profile = "..."` in the parameters cell, as a user does."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from selenium.common.exceptions import WebDriverException

    def profile_line():
        panel = browser.execute_script(ACTIVE + "return nb;")
        return _wait(lambda: panel.find_elements(By.XPATH, ".//div[contains(@class,'cm-line')][starts-with("
                                                           "normalize-space(.),'profile =')]"), 60,
                     "the parameters cell's profile line", browser, shots / "no_profile_line.png")[0]

    old = None
    for _ in range(10):  # the notebook lays itself out for a while after opening: a line found can be
        try:             # re-rendered before the click lands; click until its editor has the focus
            line = profile_line()
            old = line.get_attribute("textContent").split("=", 1)[1].strip().strip('"')
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", line)
            ActionChains(browser).click(line).perform()
            time.sleep(0.5)
            if browser.execute_script("const a = document.activeElement; return !!(a && a.closest('.cm-content') && "
                                      "a.closest('.cm-content').contains(arguments[0]));", line):
                break
        except (WebDriverException, IndexError):  # re-rendered or hidden while we looked
            time.sleep(1)
    else:
        browser.save_screenshot(str(shots / "set_profile_failed.png"))
        pytest.fail("could not put the cursor in the parameters cell")
    ActionChains(browser).send_keys(Keys.END, Keys.ARROW_LEFT).perform()  # before the closing quote
    ActionChains(browser).send_keys(*[Keys.BACKSPACE] * len(old)).send_keys(profile).perform()
    _wait(lambda: browser.execute_script(
        ACTIVE + "return [...nb.querySelectorAll('.cm-line')].some(e => e.textContent.trim() === arguments[0])",
        f'profile = "{profile}"'), 10, f'the cell to read profile = "{profile}"', browser, shots / "set_profile_failed.png")


def _menu(browser, top: str, item: str):
    from selenium.webdriver.common.by import By

    browser.find_element(By.XPATH, f"//div[contains(@class,'lm-MenuBar-itemLabel')][normalize-space(.)='{top}']").click()
    _wait(lambda: browser.find_elements(By.XPATH, f"//div[contains(@class,'lm-Menu-itemLabel')][normalize-space(.)='{item}']"),
          10, f"menu item {top} > {item}")[0].click()


def _prompts(browser) -> list[str]:
    return browser.execute_script(
        ACTIVE + "return [...nb.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim())")


def _run_all(browser, name: str, shots: Path, timeout: float):
    before = _prompts(browser)
    _menu(browser, "Run", "Run All Cells")
    _wait(lambda: (now := _prompts(browser)) != before or any("*" in p for p in now), 30, f"{name} to start running")

    def finished():
        prompts = _prompts(browser)
        return not any("*" in p for p in prompts) and _kernel_idle(browser) and prompts
    _wait(finished, timeout, f"{name} to finish running", browser, shots / f"{name}_run_failed.png")
    time.sleep(1)  # let the last outputs render


def _outputs_text(browser) -> str:
    return browser.execute_script(
        ACTIVE + "return [...nb.querySelectorAll('.jp-OutputArea-output')].map(e => e.textContent).join('\\n')")


def _drawn_images(browser, selector: str = ".jp-OutputArea-output img") -> list[str]:
    """The src of every image in the outputs that the browser has decoded (naturalWidth > 0)."""
    return browser.execute_script(
        ACTIVE + "return [...nb.querySelectorAll(arguments[0])].filter(i => i.complete && i.naturalWidth > 0)"
        ".map(i => i.src)", selector)


def _assert_ran_cleanly(browser, name: str):
    """No traceback in any output, and every code cell executed (Run All stops at an error)."""
    prompts = _prompts(browser)
    text = _outputs_text(browser)
    assert "Traceback (most recent call last)" not in text, f"{name}: {text[-3000:]}"
    assert prompts and all(p.strip("[]:").isdigit() for p in prompts), f"{name}: cells not all executed: {prompts}"


# ------------------------------------------------------------------------------------ the test
def test_notebooks_01_and_04_run_in_jupyterlab_in_chromium(driver, lab, repo, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    before = sorted(p.relative_to(repo / "notebooks").as_posix() for p in (repo / "notebooks").rglob("*"))
    t0 = time.time()

    # notebook 01 with the smoke profile, typed into the parameters cell
    _open(driver, lab, "01_curation.ipynb", shots)
    _set_profile(driver, "smoke", shots)
    _run_all(driver, "01_curation.ipynb", shots, timeout=600)
    driver.save_screenshot(str(shots / "01_curation.png"))
    _assert_ran_cleanly(driver, "01_curation.ipynb")
    text = _outputs_text(driver)
    assert "profile smoke: applied params/smoke/01_curation.yaml" in text
    assert len(_drawn_images(driver)) >= 1, "notebook 01 drew no figure"
    assert (repo / "outputs" / "smoke" / "01_curation" / "manifest.csv").is_file()
    # saved from the lab: the stored notebook keeps the typed cell but no outputs (pre-save hook)
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    stored = repo / "notebooks" / "01_curation.ipynb"
    mtime = stored.stat().st_mtime
    _menu(driver, "File", "Save Notebook")
    _wait(lambda: stored.stat().st_mtime != mtime, 30, "the notebook to be saved")
    nb = json.loads(stored.read_text())
    assert 'profile = "smoke"' in "".join("".join(c["source"]) for c in nb["cells"])
    assert not any(c.get("outputs") or c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code")
    t1 = time.time()

    # notebook 04: the interactive view, on by itself in the lab, redraws when the slider moves
    _open(driver, lab, "04_reconstruction.ipynb", shots)
    _set_profile(driver, "smoke", shots)
    _run_all(driver, "04_reconstruction.ipynb", shots, timeout=300)
    _assert_ran_cleanly(driver, "04_reconstruction.ipynb")
    view = ".widget-vbox img"  # the view: a VBox of (picker, slider, seed) and the Output widget's figure
    first = _wait(lambda: _drawn_images(driver, view), 60, "the interactive view's image", driver,
                  shots / "04_no_widget.png")
    handle = driver.execute_script(ACTIVE + "return nb.querySelector('.noUi-handle');")
    assert handle is not None, "no mask-ratio slider in notebook 04's interactive view"
    handle.location_once_scrolled_into_view
    driver.save_screenshot(str(shots / "04_reconstruction_widget.png"))
    ActionChains(driver).click(handle).send_keys(Keys.ARROW_RIGHT).perform()
    _wait(lambda: (now := _drawn_images(driver, view)) and now != first, 60, "the view to redraw after the slider moved",
          driver, shots / "04_no_redraw.png")
    driver.save_screenshot(str(shots / "04_reconstruction_slider_moved.png"))
    t2 = time.time()

    assert (repo / "outputs" / "smoke" / "04_reconstruction" / "mask_ratio_sweep.png").is_file()
    after = sorted(p.relative_to(repo / "notebooks").as_posix() for p in (repo / "notebooks").rglob("*")
                   if ".ipynb_checkpoints" not in p.parts)
    assert after == [p for p in before if ".ipynb_checkpoints" not in p], "the lab wrote under notebooks/"
    print(f"browser test: notebook 01 {t1 - t0:.0f} s, notebook 04 {t2 - t1:.0f} s; screenshots in {shots}")


def test_notebook_06_draws_its_figures_in_jupyterlab(driver, lab, repo, tmp_path):
    """Issue 25: notebook 06 once set matplotlib's Agg backend, so its figures were saved but never shown."""
    shots = tmp_path / "screenshots"
    shots.mkdir()
    _open(driver, lab, "06_results.ipynb", shots)  # opened after 01 and 04: found by its tab (see ACTIVE)
    _set_profile(driver, "smoke", shots)
    _run_all(driver, "06_results.ipynb", shots, timeout=300)
    driver.save_screenshot(str(shots / "06_results.png"))
    _assert_ran_cleanly(driver, "06_results.ipynb")
    assert "profile smoke: applied params/smoke/06_results.yaml" in _outputs_text(driver)
    drawn = _wait(lambda: (images := _drawn_images(driver)) and len(images) >= 2 and images, 60,
                  "notebook 06's two figures to be drawn", driver, shots / "06_no_figures.png")
    assert len(set(drawn)) == len(drawn), "a figure is shown twice"
    step = repo / "outputs" / "smoke" / "06_results"
    for name in ("confusion_matrices.png", "label_efficiency.png", "verdicts.csv", "table2.md"):
        assert (step / name).is_file(), name


def test_report_draws_every_image_offline(browser_ready, tmp_path):
    """Issue 30: index.html (report.write_report over a small study folder made by hand), opened as a file,
    draws every image it has (figures displayed by the notebooks, and one a markdown cell gives by its
    path), with nothing fetched: the page holds them all."""
    from test_report import make_out

    from usfmae_lib import report

    records, current = make_out(tmp_path)
    page = report.write_report(tmp_path, "smoke", records, current=current)
    browser = _chrome()
    try:
        browser.get(page.as_uri())
        images = _wait(lambda: (found := browser.execute_script(
            "return [...document.images].map(i => [i.complete && i.naturalWidth > 0, i.src.slice(0, 30)])"))
            and all(ok for ok, _ in found) and found, 30, "every image of the report to be drawn", browser,
            tmp_path / "report_images.png")
        assert len(images) >= 1
        fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert not [name for name in fetched if not name.startswith(("data:", "file:"))], fetched
        browser.save_screenshot(str(tmp_path / "report.png"))
    finally:
        browser.quit()
