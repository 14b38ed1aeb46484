"""The walkthrough notebook is stored clean and runs top to bottom (on synthetic data)."""

import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    cells = code_cells(nb)
    assert cells
    for cell in cells:
        assert cell.outputs == [], f"stored outputs in cell:\n{cell.source[:200]}"
        assert cell.execution_count is None, f"stored execution count in cell:\n{cell.source[:200]}"
    tagged = [cell for cell in cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and "KDLIGHT_NOTEBOOK_SOURCE" in tagged[0].source


@pytest.mark.slow
def test_notebook_runs_on_synthetic_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from nbclient import NotebookClient

    output, workdir = tmp_path / "output", tmp_path / "cwd"
    workdir.mkdir()
    # The kernel inherits this process's environment.
    monkeypatch.setenv("KDLIGHT_NOTEBOOK_SOURCE", "synthetic")
    monkeypatch.setenv("KDLIGHT_NOTEBOOK_OUTPUT", str(output))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # keep the kernel's inline backend

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    assert Path(nb.cells[-1].outputs[0]["text"].strip()) == Path(sys.executable)
    errors = [out for cell in code_cells(nb) for out in cell.outputs if out.output_type == "error"]
    assert not errors
    images = [
        out for cell in code_cells(nb) for out in cell.outputs if "image/png" in out.get("data", {})
    ]
    assert len(images) >= 2, "the dark-knowledge figure and the heatmap"
    text = "".join(out.get("text", "") for cell in code_cells(nb) for out in cell.outputs)
    assert "student distilled" in text and "Accuracy of the network on the 500 test images" in text

    assert (output / "report" / "heatmap.png").stat().st_size > 0
    assert (output / "teacher" / "checkpoints" / "last.ckpt").is_file()
    for temperature in (2, 4, 8):
        assert (output / "sweep" / f"T{temperature}_alpha0.9" / "metrics.json").is_file()
    assert (output / "student_baseline" / "small_cnn" / "metrics.json").is_file()
    assert not any(workdir.iterdir()), "everything goes to KDLIGHT_NOTEBOOK_OUTPUT"
