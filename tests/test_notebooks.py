"""The notebooks in ``notebooks/``: committed without outputs, and run top to bottom against a real server.

Each notebook is executed with nbclient in a fresh ``python3`` kernel whose working directory is ``notebooks/`` (as
in Jupyter, so ``import falcon_client`` works) and whose environment points ``PREDICTOR_URL`` at a tiny-Falcon
server. The server needs an API key, so every call a notebook makes is also a check that the key is sent.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import free_port
from jupyter_client.kernelspec import NoSuchKernel, get_kernel_spec
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 120
API_KEY = "notebook-test-key"
STRIP_HINT = "strip outputs before committing: jupyter nbconvert --clear-output --inplace notebooks/*.ipynb"

sys.path.insert(0, str(NOTEBOOK_DIR))
from falcon_client import FalconClient, FalconError  # noqa: E402 - lives beside the notebooks, not in a package


def notebook_id(path: Path) -> str:
    return path.stem


def test_notebooks_exist() -> None:
    assert [path.name for path in NOTEBOOKS], f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_id)
def test_notebook_is_committed_stripped(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for number, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {number} of {path.name} has outputs; {STRIP_HINT}"
            assert cell.execution_count is None, f"cell {number} of {path.name} has an execution count; {STRIP_HINT}"


@pytest.fixture(scope="module")
def notebook_server(start_server, tiny_dir):
    return start_server(tiny_dir, "--api_key", API_KEY, model_name="falcon-tiny-notebooks")


@pytest.fixture(scope="module")
def kernel_name() -> str:
    """ipykernel ships the ``python3`` kernelspec; it is missing only where the package was installed oddly."""
    try:
        get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.fail("no python3 Jupyter kernel: run `python -m ipykernel install --user`")
    return "python3"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_id)
def test_notebook_runs_against_a_server(path: Path, notebook_server, tiny_dir: Path, kernel_name: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel is a subprocess started with this process's environment.
    monkeypatch.setenv("PREDICTOR_URL", notebook_server.url)
    monkeypatch.setenv("PREDICTOR_API_KEY", API_KEY)
    monkeypatch.setenv("PREDICTOR_TOKENIZER", str(tiny_dir))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # charts inline, whatever CI sets
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    try:
        client.execute()
    except CellExecutionError as exc:
        traceback = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # IPython colours its tracebacks
        pytest.fail(f"{path.name} failed:\n{traceback}\n--- server log ---\n{notebook_server.log()[-3000:]}")
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if output.output_type == "error"]
    assert not errors
    if path.name == "02_latency.ipynb":
        images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
                  if "image/png" in output.get("data", {})]
        assert len(images) == 2, "the latency notebook should draw its two charts"


def test_client_raises_the_servers_message(notebook_server) -> None:
    client = FalconClient(notebook_server.url, api_key=API_KEY)
    with pytest.raises(FalconError) as caught:
        client.chat("Hello", top_p=2.0)
    error = caught.value
    assert (error.status, error.error_type, error.param) == (400, "invalid_request", "generate_kwargs.top_p")
    assert "top_p" in error.message and str(error).startswith("HTTP 400: ")


def test_client_without_the_key_is_refused(notebook_server) -> None:
    with pytest.raises(FalconError) as caught:
        FalconClient(notebook_server.url).chat("Hello", max_new_tokens=1)
    assert caught.value.status == 401


def test_client_returns_a_list_for_several_sequences(notebook_server) -> None:
    client = FalconClient(notebook_server.url, api_key=API_KEY)
    texts = client.chat("Hello", seed=1, num_return_sequences=2, max_new_tokens=4, return_full_text=False)
    assert isinstance(texts, list) and len(texts) == 2
    completion = client.generate("Hello", do_sample=False, max_new_tokens=4, min_new_tokens=4)
    assert completion.generated_tokens == 4 and completion.tokens_per_second > 0


def test_wait_until_ready_gives_up_at_its_deadline() -> None:
    client = FalconClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TimeoutError, match="not ready within"):
        client.wait_until_ready(deadline_s=0.5, poll_s=0.1)
