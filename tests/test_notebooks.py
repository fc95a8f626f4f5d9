"""The committed notebooks: set up devices first, run on the standard kernel, carry outputs.

Executing the notebooks is nbmake's job (`pytest --nbmake notebooks`, quick setting); these
tests check what a reader of the committed files relies on without running them: that each
notebook starts by setting up devices, reads the quick-setting variable, and was saved with
the outputs of a full, error-free run that fit in a small file.
"""

import pathlib

import nbformat
import pytest

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9]*.ipynb"))
MAX_BYTES = 1_000_000


def code_cells(path):
    notebook = nbformat.read(path, as_version=4)
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def stdout_of(cell):
    return "".join(
        output.get("text", "") for output in cell.outputs
        if output.output_type == "stream" and output.name == "stdout"
    )


def test_the_notebooks_exist():
    assert [path.name for path in NOTEBOOKS] == [
        "01_wrap_an_existing_model.ipynb",
        "02_cifar10_convnet.ipynb",
        "03_mnist_mlp_and_genetic_search.ipynb",
        "04_single_vs_multi_device_speed.ipynb",
        "05_distillation.ipynb",
        "06_custom_training_step.ipynb",
        "07_many_models.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_first_code_cell_sets_up_devices_and_reads_the_quick_setting(path):
    setup = code_cells(path)[0].source
    assert "kerasmgpu.simulate_devices(" in setup
    assert "KERASMGPU_NOTEBOOK_QUICK" in setup
    # Nothing that would initialise TensorFlow's devices comes before the simulation.
    before = setup.split("kerasmgpu.simulate_devices(")[0]
    for premature in ("keras.", "tf.", "zoo."):
        assert premature not in before, premature


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_uses_the_standard_python3_kernel(path):
    notebook = nbformat.read(path, as_version=4)
    assert notebook.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_saved_outputs_come_from_a_full_error_free_run(path):
    cells = code_cells(path)
    assert all(cell.execution_count is not None for cell in cells), "a cell was not run"
    errors = [
        output for cell in cells for output in cell.outputs if output.output_type == "error"
    ]
    assert not errors, errors[0].get("evalue")
    setup_output = stdout_of(cells[0])
    assert "Setting: full" in setup_output
    assert "Python " in setup_output and "TensorFlow " in setup_output


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_saved_notebook_is_small(path):
    assert path.stat().st_size < MAX_BYTES
