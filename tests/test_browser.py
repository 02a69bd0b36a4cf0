"""The dashboards as a person sees them: JupyterLab in headless Chromium, driven by Playwright.

One JupyterLab server (127.0.0.1, no token, temporary config / data / runtime / settings directories) serves
the module. Each test writes a tiny notebook, opens it, waits for the kernel to be idle, runs all cells, waits
for the plots, moves one control through the DOM, waits until the plot's data change, checks that no cell
raised and that JupyterLab's log console received nothing (outputs of widget callbacks that no widget captured,
tracebacks included, land there), and saves screenshots (under pytest's tmp_path, and under
$TINYGPT_SCREENSHOTS if set).

Needs Debian's chromium (`apt-get install -y chromium`, /usr/bin/chromium or $TINYGPT_CHROMIUM) and the
`playwright` Python package (no `playwright install`). Missing either is a test failure; a developer can skip
the module with TINYGPT_SKIP_BROWSER=1 or deselect it with `-m "not browser"`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("TINYGPT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 90_000  # a cold kernel importing torch and plotly on a loaded 2-core machine
NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook in view

SETUP = """\
import torch
torch.set_num_threads(1)
import tinygpt
from tinygpt import GPT, GPTConfig
torch.manual_seed(0)
model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64)).eval()
tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
"""

# JS: a string that changes whenever any plot's data change (every array, typed arrays included).
SIGNATURE_JS = """() => {
  const pick = v => v == null ? null : ArrayBuffer.isView(v) ? Array.from(v)
      : Array.isArray(v) ? v.map(pick) : (typeof v === 'object' ? JSON.stringify(v) : v);
  const root = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)') || document;
  const plots = [...root.querySelectorAll('.jp-OutputArea-output .js-plotly-plot')];
  return JSON.stringify(plots.map(gd => (gd.data || []).map(t => [t.type, pick(t.x), pick(t.y), pick(t.z),
      pick(t.marker && t.marker.color), pick(t.line && t.line.width)])));
}"""

PLOTS_READY_JS = """(n) => {
  const root = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)') || document;
  const plots = [...root.querySelectorAll('.jp-OutputArea-output .js-plotly-plot')];
  return plots.length >= n && plots.every(gd => gd.data && gd.data.length > 0);
}"""

# JS: true once every code cell has run ([n]) or any output shows a traceback.
CELLS_DONE_JS = """() => {
  const root = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  if (!root) return false;
  const outs = [...root.querySelectorAll('.jp-OutputArea-output')];
  if (outs.some(o => o.textContent.includes('Traceback'))) return true;
  const prompts = [...root.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
  return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
}"""


def _require_browser() -> None:
    if os.environ.get("TINYGPT_SKIP_BROWSER") == "1":
        pytest.skip("TINYGPT_SKIP_BROWSER=1: browser tests skipped on request")
    problems = []
    if not Path(CHROMIUM).exists():
        problems.append(f"no Chromium at {CHROMIUM} (install Debian's package: apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the playwright package is missing (pip install playwright; no `playwright install` needed)")
    if problems:
        pytest.fail(
            "browser tests cannot run: " + "; ".join(problems) + ". To skip them deliberately set "
            "TINYGPT_SKIP_BROWSER=1 or run pytest -m 'not browser'.",
            pytrace=False,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    url: str
    root: Path
    log: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    """A JupyterLab server on a free port of 127.0.0.1, with every Jupyter directory under a temp dir."""
    _require_browser()
    base = tmp_path_factory.mktemp("jupyterlab")
    root = base / "root"
    root.mkdir()
    dirs = {
        "JUPYTER_CONFIG_DIR": base / "config",
        "JUPYTER_DATA_DIR": base / "data",
        "JUPYTER_RUNTIME_DIR": base / "runtime",
        "JUPYTERLAB_SETTINGS_DIR": base / "settings",
        "JUPYTERLAB_WORKSPACES_DIR": base / "workspaces",
        "IPYTHONDIR": base / "ipython",
    }
    for d in dirs.values():
        d.mkdir()
    # Render every cell (JupyterLab 4 otherwise only renders the cells in view) and keep the UI quiet.
    tracker = dirs["JUPYTERLAB_SETTINGS_DIR"] / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    notification = tracker.parent.parent / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {
        **os.environ,
        **{k: str(v) for k, v in dirs.items()},
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "TINYGPT_CACHE_DIR": os.environ.get("TINYGPT_CACHE_DIR", str(base / "tinygpt-cache")),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }
    port = _free_port()
    log = base / "jupyterlab.log"
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--ServerApp.root_dir={root}",
        "--IdentityProvider.token=",
        "--ServerApp.password=",
        "--ServerApp.disable_check_xsrf=True",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer on {url}:\n{log.read_text()[-3000:]}", pytrace=False)
            time.sleep(0.3)
        yield Lab(url, root, log)
    finally:
        # The server starts kernels in sessions of their own: ask it to shut them down with itself.
        try:
            _api(url, "POST", "/api/shutdown")
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)


def _api(url: str, method: str, path: str):
    req = urllib.request.Request(f"{url}{path}", method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return json.loads(body) if body else None


def _shutdown_kernels(lab: Lab) -> None:
    """End every session (and its kernel) the test opened, so kernels do not pile up across the module."""
    for s in _api(lab.url, "GET", "/api/sessions") or []:
        _api(lab.url, "DELETE", f"/api/sessions/{s['id']}")


@pytest.fixture(scope="module")
def browser_context(lab, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 1700},
        )
        ctx.set_default_timeout(TIMEOUT_MS)
        try:
            yield ctx
        finally:
            ctx.close()


def _notebook(cells: list[str]) -> str:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    return nbformat.writes(nb)


def _screens(tmp_path: Path) -> list[Path]:
    dirs = [tmp_path / "screenshots"]
    if os.environ.get("TINYGPT_SCREENSHOTS"):
        dirs.append(Path(os.environ["TINYGPT_SCREENSHOTS"]))
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return dirs


def _shoot(page, tmp_path: Path, name: str) -> None:
    """Screenshot of the last cell (the dashboard) and of the window."""
    dirs = _screens(tmp_path)
    first = dirs[0] / f"{name}.png"
    page.locator(NOTEBOOK).locator(".jp-CodeCell").last.screenshot(path=str(first))
    page.screenshot(path=str(dirs[0] / f"{name}-window.png"))
    for d in dirs[1:]:
        shutil.copy(first, d / first.name)
        shutil.copy(dirs[0] / f"{name}-window.png", d / f"{name}-window.png")


def _wait_idle(page) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#jp-main-statusbar")).to_contain_text("(ipykernel) | Idle", timeout=TIMEOUT_MS)


def _log_console(page) -> str:
    """The log console badge's text and title ('' when it has no entries)."""
    item = page.locator(".jp-LogConsoleStatusItem")
    if item.count() == 0:
        return ""
    text = item.first.inner_text().strip()
    title = item.first.locator("[title]").first.get_attribute("title") if text else None
    return f"{text} ({title})" if text else ""


def _tracebacks(page) -> list[str]:
    outs = page.locator(NOTEBOOK).locator(".jp-OutputArea-output")
    return [t for t in outs.all_inner_texts() if "Traceback" in t]


def run_dashboard(
    page,
    lab: Lab,
    tmp_path: Path,
    name: str,
    cells: list[str],
    move: Callable,
    *,
    plots: int = 1,
) -> tuple[str, str]:
    """Open a notebook of `cells`, run all, wait for `plots` plots, call `move(dashboard_output)`, wait for a
    plot to change. Returns the plot signatures (before, after)."""
    (lab.root / f"{name}.ipynb").write_text(_notebook(cells))
    page.goto(f"{lab.url}/lab/tree/{name}.ipynb?reset")  # ?reset: no tabs restored from an earlier test
    nb = page.locator(NOTEBOOK)
    nb.locator(".jp-Notebook").wait_for()
    _wait_idle(page)  # the toolbar says idle earlier, before the kernel is ready
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
    page.wait_for_function(CELLS_DONE_JS, timeout=TIMEOUT_MS)
    assert not _tracebacks(page), _tracebacks(page)
    page.wait_for_function(PLOTS_READY_JS, arg=plots, timeout=TIMEOUT_MS)
    _wait_idle(page)
    time.sleep(0.5)  # let plotly finish drawing before the screenshot
    before = page.evaluate(SIGNATURE_JS)
    _shoot(page, tmp_path, f"{name}-1-before")
    dashboard = nb.locator(".jp-CodeCell").last.locator(".jp-Cell-outputWrapper")
    move(dashboard)
    page.wait_for_function(f"(before) => ({SIGNATURE_JS})() !== before", arg=before, timeout=TIMEOUT_MS)
    _wait_idle(page)
    time.sleep(0.5)
    after = page.evaluate(SIGNATURE_JS)
    _shoot(page, tmp_path, f"{name}-2-after")
    assert not _tracebacks(page), _tracebacks(page)
    assert _log_console(page) == "", f"the log console received messages: {_log_console(page)}"
    return before, after


@pytest.fixture
def page(browser_context, lab):
    p = browser_context.new_page()
    try:
        yield p
    finally:
        p.close()
        _shutdown_kernels(lab)


def _select(label: str, option: str):
    """Choose `option` in the dropdown whose description is `label`."""

    def move(dash):
        dash.locator(".widget-dropdown", has_text=label).first.locator("select").select_option(label=option)

    return move


def _click_toggle(text: str):
    def move(dash):
        dash.locator(".widget-toggle-button", has_text=text).first.click()

    return move


# ------------------------------------------------------------------------------------------ the dashboards
def test_lens_dashboard_in_jupyterlab(page, lab, tmp_path):
    cells = [
        SETUP,
        "from tinygpt.interp import TunedLens\n"
        "from tinygpt.widgets import LensDashboard\n"
        "lens = TunedLens.from_model(model)\n"
        "with torch.no_grad():\n"
        "    for p in lens.parameters():\n"
        "        p.normal_(0, 0.1)\n"
        "dash = LensDashboard(model, lens=lens, prompt='ROMEO: But soft')\n"
        "dash",
    ]
    before, after = run_dashboard(page, lab, tmp_path, "lens", cells, _click_toggle("logit lens"))
    assert before != after
    assert page.locator(NOTEBOOK).locator(".js-plotly-plot .gtitle").first.text_content().startswith("logit lens")


def test_ablation_explorer_in_jupyterlab(page, lab, tmp_path):
    cells = [
        SETUP,
        "from tinygpt.widgets import AblationExplorer\n"
        "ex = AblationExplorer(model, tokens, prompt='ab', max_new_tokens=20)\n"
        "ex",
    ]
    run_dashboard(page, lab, tmp_path, "ablation", cells, _click_toggle("mean"))
    assert "mean ablation" in page.locator(NOTEBOOK).locator(".js-plotly-plot .gtitle").first.text_content()
    assert "with 0.attn:mean" in page.locator(NOTEBOOK).locator(".jp-CodeCell").last.inner_text()  # the samples


def test_patching_dashboard_in_jupyterlab(page, lab, tmp_path):
    cells = [
        SETUP,
        "from tinygpt.widgets import PatchingDashboard\n"
        "dash = PatchingDashboard(model, 'abcdefgh abcdefg', 'abcdefXh abcdefg', correct='h', incorrect='X')\n"
        "dash",
    ]

    def move(dash):
        box = dash.locator(".widget-text", has_text="corrupted").locator("input")
        box.fill("abcdYfgh abcdefg")
        box.press("Enter")

    run_dashboard(page, lab, tmp_path, "patching", cells, move)


def test_circuit_dashboard_in_jupyterlab(page, lab, tmp_path):
    cells = [
        SETUP,
        "from tinygpt.widgets import CircuitDashboard\n"
        "dash = CircuitDashboard(model, 'abcdefgh abcdefg', 'abcdefXh abcdefg', correct='h', incorrect='X', size=8)\n"
        "dash",
    ]
    before, after = run_dashboard(page, lab, tmp_path, "circuits", cells, _select("method", "exact"), plots=2)
    titles = page.locator(NOTEBOOK).locator(".js-plotly-plot .gtitle").all_text_contents()
    assert titles[0].startswith("exact: top 8 of") and titles[1].startswith("Faithfulness of the exact ranking")
    graph, curve = json.loads(after)
    assert len(graph) == 8 + 1 and len(curve) == 1  # 8 edges and the nodes; one faithfulness line
    assert "L0H0" in page.locator(NOTEBOOK).locator(".jp-CodeCell").last.inner_text()  # the node table


def test_attention_viewer_in_jupyterlab(page, lab, tmp_path):
    # differential attention (three maps per head) and mixture-of-experts (a router view) in one model
    cells = [
        "import torch\ntorch.set_num_threads(1)\nfrom tinygpt import GPT, GPTConfig\ntorch.manual_seed(0)\n"
        "model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64, diff_attn=True, moe_experts=4)).eval()",
        "from tinygpt.widgets import AttentionViewer\nview = AttentionViewer(model, 'To be, or not to be')\nview",
    ]
    before, after = run_dashboard(page, lab, tmp_path, "attention", cells, _select("layer", "layer 1"), plots=2)
    titles = page.locator(NOTEBOOK).locator(".js-plotly-plot .gtitle").all_text_contents()
    assert titles[0] == "layer 1, head 0"
    maps, router = json.loads(after)
    assert len(maps) == 3 and len(router) == 2  # A1, A2, A1 - λ A2; the experts per token, the load per layer
    notes = page.locator(NOTEBOOK).locator(".js-plotly-plot .annotation-text").all_text_contents()
    assert any("λ = " in t for t in notes) and any("expert load per layer" in t for t in notes)


def test_training_dashboard_in_jupyterlab(page, lab, tmp_path):
    corpus = lab.root / "corpus.txt"
    corpus.write_text("First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n" * 40)
    cells = [
        SETUP,
        "from tinygpt.widgets import TrainingDashboard\ndash = TrainingDashboard(steps=30)\ndash",
        "result = tinygpt.train(model, 'corpus.txt', steps=30, batch_size=4, ctx=32, warmup=5, val_every=10,\n"
        "                       val_split=0.2, val_batches=1, device='cpu', progress=False,\n"
        "                       callbacks=[dash.callback])\n"
        "assert len(dash.history) == 30",
    ]

    def move(dash):
        handle = page.locator(NOTEBOOK).locator(".widget-slider .noUi-handle").first
        handle.focus()
        handle.press("Home")  # smoothing 0.6 -> 0: the smoothed line becomes the raw loss

    # the dashboard is in the second cell; `move` finds the slider on the page
    run_dashboard(page, lab, tmp_path, "training", cells, move)
    sig = json.loads(page.evaluate(SIGNATURE_JS))
    raw, smoothed = sig[0][0][2], sig[0][1][2]
    assert len(raw) == 30 and smoothed == raw
    assert sig[0][2][1] == [10, 20, 30]  # validation steps


def test_laser_dashboard_in_jupyterlab(page, lab, tmp_path):
    cells = [
        SETUP,
        "from tinygpt.widgets import LaserDashboard\n"
        "dash = LaserDashboard(model, tokens, fractions=(0.5, 0.1), max_new_tokens=10, prompt='ab')\n"
        "dash",
    ]
    run_dashboard(page, lab, tmp_path, "laser", cells, _select("target", "mlp.fc_out"), plots=2)


def test_hqq_dashboard_in_jupyterlab(page, lab, tmp_path):
    cells = [
        SETUP,
        "from tinygpt.widgets import HqqDashboard\n"
        "dash = HqqDashboard(model, tokens, bits=(2, 4), group_sizes=(16, 32), iters=5)\n"
        "dash",
    ]
    run_dashboard(page, lab, tmp_path, "hqq", cells, _click_toggle("RTN"), plots=3)


def test_feature_dashboard_in_jupyterlab(page, lab, tmp_path):
    cells = [
        SETUP,
        "from tinygpt.dictionary import DictionaryConfig, build_feature_index, make_dictionary\n"
        "from tinygpt.dictionary.files import model_pin\n"
        "from tinygpt.widgets import FeatureDashboard\n"
        "cfg = DictionaryConfig(arch='topk', d_in=32, d_sae=48, hook='blocks.0.hook_resid_post', k=4)\n"
        "sae = make_dictionary(cfg, seed=2)\n"
        "sae.base = model_pin(model)\n"
        "index = build_feature_index(model, sae, tokens.reshape(-1), tokens=128, context=32, progress=False)\n"
        "dash = FeatureDashboard(model, sae, index, latent=5, max_new_tokens=8)\n"
        "dash",
    ]

    def move(dash):
        dash.locator(".widget-dropdown", has_text="latent").first.locator("select").select_option(index=11)

    run_dashboard(page, lab, tmp_path, "features", cells, move)
    text = page.locator(NOTEBOOK).locator(".jp-CodeCell").last.inner_text()
    assert "latent 11: active on" in text and "promoted" in text
    title = page.locator(NOTEBOOK).locator(".js-plotly-plot .gtitle").first.text_content()
    assert title.startswith("feature 11 @ blocks.0.hook_resid_post")


def test_log_console_check_sees_callback_errors(page, lab, tmp_path):
    """The check the other tests rely on: an uncaught error in a widget callback shows in the log console."""
    cells = [
        "import ipywidgets as W\nimport plotly.graph_objects as go\n"
        "fig = go.FigureWidget(go.Bar(y=[1, 2]))\nbutton = W.Button(description='fail')\n"
        "def fail(_):\n    fig.data[0].y = [2, 1]\n    raise ZeroDivisionError('callback failed')\n"
        "button.on_click(fail)\nW.VBox([button, fig])",
    ]
    with pytest.raises(AssertionError, match="log console"):
        run_dashboard(page, lab, tmp_path, "failing", cells, lambda d: d.locator(".widget-button").click())
