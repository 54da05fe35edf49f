"""`launcher ui` in a real browser (Debian's chromium, selenium + chromium-driver) against
the real server: tabs and sections, reference configs in and out, errors at their fields.
`KUBETUNE_UI_SCREENSHOTS=docs/img` refreshes the screenshots of docs/ui.md."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import find_chromium
from pydantic import Field
from selenium.webdriver.common.by import By
from ui_support import browser, chromedriver, console_errors, field, screenshot, wait_for

from kubetune.config import PIPELINE_CLASSES, SdLoraConfig, config_to_dict, load_config
from kubetune.config import parse_config as parse
from launcher.config_files import validate_file
from launcher.ui.security import UiSettings
from launcher.ui.server import create_app, serve_in_thread

pytestmark = pytest.mark.skipif(
    not (find_chromium() and chromedriver()), reason="needs chromium and chromium-driver"
)
ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "tests" / "data" / "invoke_training_samples").glob("*.yaml"))


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    home = tmp_path_factory.mktemp("kubetune-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBETUNE_HOME", str(home))
        app = create_app(UiSettings(port=0, local_only=True, roots=[ROOT]))
        with serve_in_thread(app) as url, browser() as driver:
            yield driver, url


def open_page(driver: Any, url: str) -> None:
    driver.get("about:blank")  # a fresh page: the same URL with another #hash would not reload
    driver.get(url + "/#configure")
    wait_for(driver, "document.body.dataset.ready === 'true'")


def click(driver: Any, element_id: str) -> None:
    driver.find_element(By.ID, element_id).click()


def set_input(driver: Any, element: Any, value: str) -> None:
    driver.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'))",
        element,
        value,
    )


def reload_reference(driver: Any, path: Path) -> str:
    set_input(driver, driver.find_element(By.ID, "ref-path"), str(path))
    driver.execute_script("document.getElementById('ref-msg').textContent = ''")
    click(driver, "ref-reload")
    return wait_for(driver, "document.getElementById('ref-msg').textContent")


def generate(driver: Any) -> str:
    driver.execute_script("document.getElementById('gen-msg').textContent = ''")
    click(driver, "generate")
    return wait_for(driver, "document.getElementById('gen-msg').textContent")


@pytest.mark.slow
def test_every_tab_renders_its_sections(page: tuple[Any, str]) -> None:
    driver, url = page
    open_page(driver, url)
    types = [b.text for b in driver.find_elements(By.CSS_SELECTOR, "#tabs button")]
    assert types == [cls.model_fields["type"].default for cls in PIPELINE_CLASSES]
    common = ["Basic", "Data Source", "Data Loading", "Aspect Ratio Bucketing", "Optimizer",
              "General Training", "Validation", "Job", "Storage", "Notify"]  # fmt: skip
    for kind in types:
        driver.find_element(By.CSS_SELECTOR, f'#tabs button[data-type="{kind}"]').click()
        tab = driver.find_element(By.CSS_SELECTOR, f'.tab[data-type="{kind}"]')
        assert tab.is_displayed()
        shown = [h.text for h in tab.find_elements(By.CSS_SELECTOR, "section > h2")]
        assert set(common) <= set(shown), kind
        assert ("Textual Inversion" in shown) == ("TEXTUAL_INVERSION" in kind), kind
        advanced = tab.find_element(By.CSS_SELECTOR, '[data-section="General Training"] details')
        assert advanced.find_elements(By.CSS_SELECTOR, '[data-path="train_batch_size"]')
    driver.find_element(By.CSS_SELECTOR, '#tabs button[data-type="SD_LORA"]').click()
    # defaults shown are the schema's
    assert field(driver, "train_batch_size").find_element(By.TAG_NAME, "input").get_attribute(
        "value"
    ) == str(SdLoraConfig.model_fields["train_batch_size"].default)
    # the screenshot shows the starter config the tab opens on, not an empty form
    steps = field(driver, "max_train_steps").find_element(By.TAG_NAME, "input")
    assert steps.get_attribute("value") == "2000"
    screenshot(driver, "ui-configure.png")
    assert console_errors(driver) == []


@pytest.mark.parametrize(
    "sample",
    [SAMPLES[0], *(pytest.param(p, marks=pytest.mark.slow) for p in SAMPLES[1:])],
    ids=lambda p: p.stem,
)
def test_sample_config_reloads_and_generates_back(page: tuple[Any, str], sample: Path) -> None:
    driver, url = page
    open_page(driver, url)
    assert reload_reference(driver, sample).startswith("loaded")
    expected = load_config(sample)
    active = driver.find_element(By.CSS_SELECTOR, "#tabs button.active").text
    assert active == expected.type
    assert driver.find_element(By.ID, "problems").text == ""
    assert generate(driver).startswith("ok:")
    text = driver.execute_script("return window.kubetune.state.yaml")
    assert config_to_dict(parse(text)) == config_to_dict(expected)
    # what `launcher validate` refuses (the sample's dataset is not here): a warning at its field
    for line in validate_file(str(sample)).errors:
        css = f'.tab:not([hidden]) .field.warned[data-path="{line.split(": ")[1]}"] .err'
        marked = [e.text for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
        assert marked and marked[0].startswith("warning: "), (line, marked)


def test_a_wrong_value_shows_its_error_at_the_field(page: tuple[Any, str]) -> None:
    driver, url = page
    open_page(driver, url)
    reload_reference(driver, ROOT / "examples" / "quickstart.yaml")
    row = field(driver, "train_batch_size")
    driver.execute_script("arguments[0].closest('details').open = true", row)
    set_input(driver, row.find_element(By.TAG_NAME, "input"), "0")
    assert "problem" in generate(driver)
    assert "invalid" in row.get_attribute("class")
    assert "greater than 0" in row.find_element(By.CLASS_NAME, "err").text
    assert "train_batch_size" in driver.find_element(By.ID, "problems").text
    driver.execute_script("arguments[0].scrollIntoView()", row)
    screenshot(driver, "ui-field-error.png")


def test_unknown_fields_are_listed_and_a_bad_file_is_one_line(
    page: tuple[Any, str], tmp_path: Path
) -> None:
    driver, url = page
    open_page(driver, url)
    extra = tmp_path / "extra.yaml"
    extra.write_text((ROOT / "examples" / "quickstart.yaml").read_text() + "frobnicate: 3\n")
    assert reload_reference(driver, extra).startswith("loaded")
    assert "frobnicate" in driver.find_element(By.ID, "ref-unknown").text
    bad = tmp_path / "bad.yaml"
    bad.write_text("type: SD_LORA\n  : [\n")
    message = reload_reference(driver, bad)
    assert "invalid YAML" in message and "\n" not in message
    assert "no such file" in reload_reference(driver, tmp_path / "missing.yaml")


class _WithNewField(SdLoraConfig):
    """SD_LORA plus a field only this test knows."""

    shiny_new_knob: int = Field(default=7, ge=2, le=9)
    """A knob added to the schema: it must show up with no UI code."""


@pytest.mark.slow
def test_a_new_schema_field_appears_in_the_form() -> None:
    app = create_app(UiSettings(port=0, local_only=True), classes=[_WithNewField])
    with serve_in_thread(app) as url, browser() as driver:
        open_page(driver, url)
        row = field(driver, "shiny_new_knob")
        control = row.find_element(By.TAG_NAME, "input")
        assert (control.get_attribute("value"), control.get_attribute("min")) == ("7", "2")
        assert control.get_attribute("max") == "9"
        help_text = row.find_element(By.CLASS_NAME, "help").get_attribute("textContent")
        assert "must show up with no UI code" in help_text


def tiny_run_config(tmp_path: Path, name: str, steps: int) -> Path:
    """examples/quickstart.yaml, shorter: builtin:tiny-sd on the sample data, on the CPU."""
    import yaml

    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data["base_output_dir"] = str(tmp_path / "runs" / name)
    data["data_loader"]["dataset"]["dataset_dir"] = str(ROOT / "examples" / "sample_data")
    data["data_loader"]["resolution"] = 32
    data.update(max_train_steps=steps, save_every_n_steps=3, validate_every_n_steps=3,
                log_every_n_steps=1, num_validation_images_per_prompt=1,
                num_validation_inference_steps=2, job={"name": name, "gpus": 0})  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_training(driver: Any, config: Path) -> None:
    assert reload_reference(driver, config).startswith("loaded")
    driver.execute_script("document.getElementById('start-msg').textContent = ''")
    click(driver, "start")
    wait_for(driver, "document.getElementById('start-link')", timeout=60)
    driver.find_element(By.ID, "start-link").click()
    wait_for(driver, "location.hash.startsWith('#run/')")


def run_phase(driver: Any) -> str:
    return driver.execute_script("return document.getElementById('run-status').dataset.phase")


@pytest.mark.slow
def test_start_training_shows_progress_to_completion(page: tuple[Any, str], tmp_path: Path) -> None:
    """A tiny local run (builtin:tiny-sd) from the page: progress, the loss curve and the
    validation grids appear, the run succeeds; the runs table lists it."""
    driver, url = page
    open_page(driver, url)
    start_training(driver, tiny_run_config(tmp_path, "ui-tiny", steps=6))
    wait_for(driver, "document.getElementById('run-status').dataset.phase === 'Succeeded'", 600)
    wait_for(driver, "document.querySelectorAll('#grids img').length >= 2", 30)
    wait_for(driver, "[...document.querySelectorAll('#grids img')].every(i => i.naturalWidth > 0)")
    points = driver.execute_script(
        "return document.querySelector('#loss-chart polyline').dataset.points"
    )
    assert int(points) >= 2
    assert "step 6/6" in driver.find_element(By.ID, "run-status").text
    assert driver.find_elements(By.CSS_SELECTOR, "#final-files a.pull")
    set_input(driver, driver.find_element(By.ID, "pull-path"), str(tmp_path / "pulled"))
    click(driver, "pull")
    assert "MB), checked against the manifest" in wait_for(
        driver, "document.getElementById('run-msg').textContent.startsWith('pulled') && "
        "document.getElementById('run-msg').textContent", 60)  # fmt: skip
    assert (tmp_path / "pulled" / "lora.safetensors").stat().st_size > 0
    screenshot(driver, "ui-run.png")
    driver.get(url + "/#runs")
    wait_for(driver, "document.querySelector('#runs-table tr[data-run=\"ui-tiny\"]')")
    row = driver.find_element(By.CSS_SELECTOR, '#runs-table tr[data-run="ui-tiny"]')
    assert "Succeeded" in row.text and "6/6" in row.text
    screenshot(driver, "ui-runs.png")
    # idempotent as the CLI: the same config again is the same run
    open_page(driver, url)
    assert reload_reference(driver, tmp_path / "ui-tiny.yaml").startswith("loaded")
    click(driver, "start")
    done = "document.getElementById('start-msg').textContent.includes('(local)')"
    wait_for(driver, done, 60)
    assert "ui-tiny: already submitted" in driver.find_element(By.ID, "start-msg").text


@pytest.mark.slow
def test_cancel_stops_a_run(page: tuple[Any, str], tmp_path: Path) -> None:
    driver, url = page
    open_page(driver, url)
    start_training(driver, tiny_run_config(tmp_path, "ui-cancel", steps=5000))
    wait_for(driver, "document.getElementById('run-status').dataset.phase === 'Running'", 60)
    click(driver, "cancel")
    wait_for(driver, "document.getElementById('run-msg').textContent.startsWith('cancel')", 60)
    wait_for(driver, "document.getElementById('run-status').dataset.phase === 'Cancelled'", 120)
    assert not driver.find_element(By.ID, "cancel").is_displayed()
    assert driver.find_element(By.ID, "resume").is_displayed()  # a cancelled run resumes


def test_dataset_preview_shows_thumbnails_buckets_and_bad_images(
    page: tuple[Any, str], tmp_path: Path
) -> None:
    import yaml
    from data_fixtures import write_image_dir

    driver, url = page
    data = tmp_path / "photos"
    write_image_dir(data, [(64, 64), (96, 64), (64, 96), (128, 64), (64, 64), (80, 64)])
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "broken.txt").write_text("a broken image")
    config = yaml.safe_load(tiny_run_config(tmp_path, "ui-data", steps=6).read_text())
    config["data_loader"]["dataset"]["dataset_dir"] = str(data)
    config["data_loader"]["aspect_ratio_buckets"] = {
        "target_resolution": 64, "start_dim": 32, "end_dim": 128, "divisible_by": 16}  # fmt: skip
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(config))
    open_page(driver, url)
    reload_reference(driver, tmp_path / "data.yaml")
    click(driver, "preview")
    wait_for(driver, "document.querySelector('#dataset h2')", 60)
    box = driver.find_element(By.ID, "dataset")
    assert "Dataset: 7 examples" in box.text
    assert len(box.find_elements(By.CSS_SELECTOR, ".thumbs img")) == 6
    assert "caption 0" in box.text and "64x64: 3" in box.text
    assert "broken.png" in box.find_element(By.CSS_SELECTOR, "ul.bad").text
    driver.execute_script("arguments[0].scrollIntoView()", box)
    screenshot(driver, "ui-dataset.png")


@pytest.mark.slow
def test_an_unreachable_cluster_is_one_line_in_place(tmp_path: Path) -> None:
    """A kube context whose API does not answer: the runs page lists local runs and says why
    the cluster's are missing; Start Training on the cluster says why it cannot."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: gone\n"
        f"clusters: [{{name: gone, cluster: {{server: 'https://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: u, user: {token: x}}]\n"
        "contexts: [{name: gone, context: {cluster: gone, user: u}}]\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBECONFIG", str(kubeconfig))
        mp.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
        app = create_app(UiSettings(port=0, roots=[ROOT]))
        with serve_in_thread(app) as url, browser() as driver:
            driver.get(url + "/#runs")
            wait_for(driver, "document.body.dataset.runsReady", 60)
            message = driver.find_element(By.ID, "runs-msg").text
            assert "cannot reach the Kubernetes API" in message and "\n" not in message
            import yaml

            config = yaml.safe_load(tiny_run_config(tmp_path, "ui-far", steps=6).read_text())
            config["storage"] = {"bucket": "far-bucket", "endpoint_url": "http://127.0.0.1:1"}
            (tmp_path / "far.yaml").write_text(yaml.safe_dump(config))
            open_page(driver, url)
            reload_reference(driver, tmp_path / "far.yaml")
            driver.find_element(By.CSS_SELECTOR, '#target option[value="cluster"]').click()
            click(driver, "start")
            wait_for(driver, "!document.getElementById('start-msg').textContent.endsWith('…')", 60)
            text = driver.find_element(By.ID, "start-msg").text
            assert "cannot reach the Kubernetes API" in text and "\n" not in text


@pytest.mark.slow
def test_a_sweep_page_shows_runs_side_by_side_and_prompt_by_run_images(tmp_path: Path) -> None:
    from ui_support import fake_local_run

    from launcher.sweeps import LABEL_SWEEP, PARAM_LABEL_PREFIX

    home, outputs = tmp_path / "home", tmp_path / "outputs"
    prompts = ["a red circle", "a blue ring"]
    for rank in ("4", "16"):
        labels = {LABEL_SWEEP: "rank-sweep", f"{PARAM_LABEL_PREFIX}lora_rank_dim": rank}
        fake_local_run(home, outputs, f"rank-sweep-{rank}", labels=labels, prompts=prompts,
                       thumbs={10: 2, 20: 2})  # fmt: skip
    fake_local_run(home, outputs, "lonely")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBETUNE_HOME", str(home))
        app = create_app(UiSettings(port=0, local_only=True))
        with serve_in_thread(app) as url, browser() as driver:
            driver.get(url + "/#runs")
            wait_for(driver, "document.body.dataset.runsReady")
            header = driver.find_element(By.CSS_SELECTOR, 'tr.sweep[data-sweep="rank-sweep"]')
            assert "2 runs" in header.text
            header.find_element(By.TAG_NAME, "a").click()
            wait_for(driver, "document.body.dataset.sweepReady")
            table = driver.find_element(By.ID, "sweep-table").text
            assert "lora_rank_dim" in table and "rank-sweep-16" in table and "lonely" not in table
            assert driver.find_element(By.ID, "sweep-step").get_attribute("value") == "20"
            grid = driver.find_element(By.ID, "sweep-grid")
            assert len(grid.find_elements(By.CSS_SELECTOR, "tr[data-prompt]")) == 2
            wait_for(driver, "[...document.querySelectorAll('#sweep-grid img')]"
                     ".filter(i => i.naturalWidth > 0).length === 4")  # fmt: skip
            assert "a blue ring" in grid.text
            screenshot(driver, "ui-sweep.png")


def test_an_uploaded_reference_loads_and_the_yaml_saves(
    page: tuple[Any, str], tmp_path: Path
) -> None:
    driver, url = page
    open_page(driver, url)
    sample = SAMPLES[0]
    driver.find_element(By.ID, "ref-file").send_keys(str(sample))
    driver.execute_script("document.getElementById('ref-msg').textContent = ''")
    click(driver, "ref-reload")
    assert wait_for(driver, "document.getElementById('ref-msg').textContent").startswith(
        f"loaded {sample.name}"
    )
    assert generate(driver).startswith("ok:")
    target = tmp_path / "saved" / "config.yaml"
    set_input(driver, driver.find_element(By.ID, "save-path"), str(target))
    click(driver, "save")
    assert wait_for(driver, "document.getElementById('save-msg').textContent").startswith("saved")
    assert target.read_text() == driver.execute_script("return window.kubetune.state.yaml")
    assert load_config(target).type == load_config(sample).type
    target.write_text("# my notes\n" + target.read_text())  # Save again: asks first
    driver.execute_script("document.getElementById('save-msg').textContent = ''")
    click(driver, "save")
    said = wait_for(driver, "document.getElementById('save-msg').textContent")
    assert "already exists" in said and "Save again" in said
    assert target.read_text().startswith("# my notes")
    driver.execute_script("document.getElementById('save-msg').textContent = ''")
    click(driver, "save")
    assert wait_for(driver, "document.getElementById('save-msg').textContent").startswith("saved")
    assert not target.read_text().startswith("# my notes")
    downloads = tmp_path / "downloads"
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    click(driver, "download")
    deadline = time.monotonic() + 30
    while not list(downloads.glob("*.yaml")):
        assert time.monotonic() < deadline, "no download"
        time.sleep(0.1)
    assert next(downloads.glob("*.yaml")).read_text() == target.read_text()


def test_a_tab_opens_filled_with_its_starter_config(page: tuple[Any, str]) -> None:
    driver, url = page
    open_page(driver, url)
    driver.find_element(By.CSS_SELECTOR, '#tabs button[data-type="SDXL_LORA"]').click()
    steps = field(driver, "max_train_steps").find_element(By.TAG_NAME, "input")
    assert steps.get_attribute("value") == "2000"  # the schema's default is none
    assert generate(driver).startswith("ok: SDXL_LORA run 'my-sdxl-lora'")  # valid as it opens


def test_the_page_counts_as_the_cli_does(page: tuple[Any, str]) -> None:
    """The UI's `count` words every number as `kubetune.humanize.count` does ("1 file")."""
    from kubetune.humanize import count

    driver, url = page
    driver.get("about:blank")
    driver.get(url + "/#runs")
    wait_for(driver, "typeof window.kubetune?.count === 'function'")
    cases = [(n, noun) for n in (0, 1, 2) for noun in ("file", "process", "entry", "day", "run")]
    shown = driver.execute_script(
        "return arguments[0].map(([n, noun]) => window.kubetune.count(n, noun))", cases
    )
    assert shown == [count(n, noun) for n, noun in cases]


@pytest.mark.slow
def test_a_run_page_offers_what_its_phase_allows(page: tuple[Any, str]) -> None:
    """A failed run offers Resume, its report and its log, not Pull; a succeeded one Pull
    and the report, not Cancel; a running one Cancel; an unreadable one nothing but why."""
    import os
    import subprocess

    from ui_support import fake_local_run

    driver, url = page
    home = Path(os.environ["KUBETUNE_HOME"])
    out = home.parent / "actions-out"
    fake_local_run(home, out, "page-done", final=True, report=True)
    fake_local_run(home, out, "page-broke", exit_code=1, report=True)
    (home / "runs" / "page-broke" / "log.txt").write_text("RuntimeError: out of memory\n")
    sleeper = subprocess.Popen(["sleep", "60"])  # the running run's process (never cancelled)
    fake_local_run(home, out, "page-going", exit_code=None, pid=sleeper.pid)
    (home / "runs" / "page-unreadable").mkdir(parents=True)
    (home / "runs" / "page-unreadable" / "run.json").write_text('{"run": "page-unre')
    buttons = ("cancel", "resume", "pull", "pull-path", "report-link")
    expected = {
        "page-done": {"pull", "pull-path", "report-link"},
        "page-broke": {"resume", "report-link"},
        "page-going": {"cancel"},
        "page-unreadable": set(),
    }
    try:
        for run, shown in expected.items():
            driver.get("about:blank")
            driver.get(f"{url}/#run/local/{run}")
            wait_for(driver, "document.getElementById('run-actions').dataset.offered !== undefined")
            visible = {b for b in buttons if driver.find_element(By.ID, b).is_displayed()}
            assert visible == shown, run
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "run.json" in driver.find_element(By.ID, "run-status").text
    driver.get("about:blank")
    driver.get(f"{url}/#run/local/page-broke")
    wait_for(driver, "document.getElementById('logs').textContent.includes('out of memory')")
    assert "ETA" not in driver.find_element(By.ID, "run-status").text
    # how it ended, from its record (a runner's own failure record: its step, error, code)
    assert "; failed at step 40" in driver.find_element(By.ID, "run-status").text
