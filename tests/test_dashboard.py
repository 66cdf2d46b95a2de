"""The live dashboard in headless Chromium (Playwright) during a real run: a coordinator process
and two client agents train tiny-bert for three rounds while the page, opened with a viewer
token in its URL fragment, shows the round advancing, the clients' rows, a train_loss point per
finished round, and finally the run as finished -- without an error banner. A screenshot of the
page is kept as a PNG. The run happens once (a module fixture); the tests check what the page
showed."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from fedfm.deploy.store import StateStore
from tests.deploy_util import (
    add_clients,
    agents_running,
    server_config_dict,
    start_server,
    wait_finished,
    write_config,
)

sync_api = pytest.importorskip("playwright.sync_api")

ROUNDS = 3
ROUND_INDEX = "Number(document.querySelector('#round-index').textContent)"
ROWS = """rows => rows.map(r => ({name: r.dataset.clientName,
    cells: Array.from(r.querySelectorAll('td'), td => td.textContent.trim())}))"""


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium on PATH for the dashboard test: run `make chromium`")
    return found


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run 2 agents x 3 rounds with the dashboard open; what the page showed along the way."""
    executable = chromium_path()
    tmp_path = tmp_path_factory.mktemp("dashboard")
    raw = server_config_dict(tmp_path, federation={"num_clients": 2, "clients_per_round": 2,
                                                   "rounds": ROUNDS})
    config_path = write_config(tmp_path, raw)
    state_dir = tmp_path / "state"
    tokens = add_clients(state_dir, 2)
    store = StateStore(state_dir / "coordinator.db")
    try:
        _, viewer = store.add_client("viewer", role="viewer")
    finally:
        store.close()
    # linger long enough for the page (polling every 2 s) to see the finished run
    server, url = start_server(config_path, state_dir, "--linger", "8")
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable,
                                                 args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.goto(f"{url.rstrip('/')}/#token={viewer}")
                with agents_running(url, tokens, tmp_path):
                    observed = follow_the_run(page, tmp_path)
                    observed["exit_code"] = wait_finished(server, 180)
            finally:
                browser.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
    return observed


def follow_the_run(page: Any, tmp_path: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    page.wait_for_function(
        f"{ROUND_INDEX} >= 1 && document.querySelector('#clients tr[data-client-name]')",
        timeout=90_000)
    seen["first_round"] = int(page.inner_text("#round-index"))
    seen["first_round_state"] = page.get_attribute("#round-state", "data-state")
    seen["first_rows"] = page.eval_on_selector_all("#clients tr[data-client-name]", ROWS)

    page.wait_for_function(f"{ROUND_INDEX} > {seen['first_round']}", timeout=90_000)
    seen["next_round"] = int(page.inner_text("#round-index"))
    page.wait_for_selector('#charts svg[data-series="train_loss"] circle', timeout=30_000)
    seen["error_while_running"] = None if page.is_hidden("#error") else page.inner_text("#error")
    seen["updated"] = page.inner_text("#updated")
    seen["screenshot"] = tmp_path / "dashboard.png"
    page.screenshot(path=str(seen["screenshot"]), full_page=True)

    page.wait_for_function(
        "document.querySelector('#run-state').textContent.trim() === 'finished'",
        timeout=120_000)
    seen["run_state"] = page.get_attribute("#run-state", "data-state")
    seen["last_round"] = int(page.inner_text("#round-index"))
    seen["error_when_finished"] = None if page.is_hidden("#error") else page.inner_text("#error")
    seen["series"] = page.eval_on_selector_all(
        "#charts svg[data-series]", "svgs => svgs.map(s => s.dataset.series)")
    seen["loss_points"] = [int(r) for r in page.eval_on_selector_all(
        '#charts svg[data-series="train_loss"] circle', "cs => cs.map(c => c.dataset.round)")]
    seen["final_rows"] = page.eval_on_selector_all("#clients tr[data-client-name]", ROWS)
    seen["elapsed"] = page.inner_text("#run-elapsed")
    return seen


def test_the_dashboard_follows_a_real_run(seen: dict[str, Any]) -> None:
    assert seen["first_round"] >= 1 and seen["first_round_state"]
    assert sorted(row["name"] for row in seen["first_rows"]) == ["site0", "site1"]  # no viewer
    assert seen["next_round"] > seen["first_round"]
    assert seen["error_while_running"] is None and seen["updated"] != "never"
    assert seen["run_state"] == "finished" and seen["last_round"] == ROUNDS
    assert seen["error_when_finished"] is None
    assert seen["loss_points"] == list(range(1, ROUNDS + 1))  # one point per round
    assert {"train_loss", "eval.global.loss", "wall_time.round", "bytes_up"} <= set(
        seen["series"])
    assert seen["exit_code"] == 0


def test_the_screenshot_is_a_real_png(seen: dict[str, Any]) -> None:
    data = Path(seen["screenshot"]).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, len(data)
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 1000 and height >= 600, (width, height)


def test_the_client_table_counts_every_clients_rounds(seen: dict[str, Any]) -> None:
    # columns: name, id, status, last seen, rounds done, last round, metrics...
    done = {row["name"]: (row["cells"][4], row["cells"][5]) for row in seen["final_rows"]}
    assert done == {"site0": (str(ROUNDS), str(ROUNDS)), "site1": (str(ROUNDS), str(ROUNDS))}


def test_the_elapsed_time_stays_shown_after_the_run(seen: dict[str, Any]) -> None:
    assert seen["elapsed"] != "—"
