"""notebooks/tour.ipynb runs top to bottom, headless, without errors, and cleans up after
itself (no worker or runner of its simulated workstation left)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import nbclient
import nbformat
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import kill_simulated
from tests.ui.demo_process import simulated_processes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOUR = ROOT / "notebooks" / "tour.ipynb"


def test_tour_notebook_is_stored_without_outputs() -> None:
    nb = nbformat.read(TOUR, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.timeout(300)
def test_tour_executes_headless(
    tmp_path: Path, sim_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel inherits this environment: a fresh simulated workstation and state dir, and
    # a config with free worker ports (the zero-config ports may be taken on a shared host).
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    config = tmp_path / "gpupanel.toml"
    config.write_text(
        "".join(
            textwrap.dedent(
                f"""
                [[workers]]
                id = "gpu{i}"
                gpu = {i}
                port = {free_port()}
                """
            )
            for i in range(4)
        )
    )
    monkeypatch.setenv("GPUPANEL_CONFIG", str(config))
    nb = nbformat.read(TOUR, as_version=4)
    port_cells = [c for c in nb.cells if "PORT = 8765" in c.source]
    assert len(port_cells) == 1, "the tour sets its panel port in one cell: PORT = 8765"
    port_cells[0].source = port_cells[0].source.replace("PORT = 8765", f"PORT = {free_port()}")
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute()  # raises CellExecutionError on the first cell that fails
        text = "\n".join(
            out.get("text", "")
            for cell in nb.cells
            if cell.cell_type == "code"
            for out in cell.outputs
            if out.output_type == "stream"
        )
        assert "4 workers running" in text
        assert "pin of gpu0: verified" in text
        assert "refused (HTTP 409)" in text  # the guard refused the oversized load
        assert "in flight: req-" in text and "app tour" in text
        assert text.rstrip().endswith("stopped")
        assert not simulated_processes(sim_dir), "the tour's clean-up left processes"
    finally:
        kill_simulated(sim_dir)
