"""Every notebook source (``notebooks/*.py``, jupytext percent format) executes without error.

Each source is converted with jupytext and run cell by cell by nbclient in a fresh
``python3`` kernel, inside a temporary working directory, so nothing a notebook writes
lands in the repository and no ``.ipynb`` is ever written. The kernel is the interpreter
running the tests: a kernelspec for ``sys.executable`` is written to a temporary
directory placed first on ``JUPYTER_PATH``, so a ``python3`` kernelspec installed
elsewhere (a user's, another environment's) cannot shadow it, and a fresh machine needs
nothing beyond the ``demo`` extra (what the notebooks import) and the ``test`` extra
(ipykernel, jupytext, nbclient).
"""

from __future__ import annotations

import pathlib
import re

import pytest

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


@pytest.fixture(scope="session")
def kernel_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Jupyter data directory holding a ``python3`` kernelspec that runs ``sys.executable``."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(root / "kernels" / "python3")
    return str(root)


def test_notebooks_found():
    assert NOTEBOOKS, "no notebooks/*.py found"


# jupyter_core 5.0 to 5.7 (allowed by nbclient's requirements) warns on import that its
# default paths will move to platformdirs unless JUPYTER_PLATFORM_DIRS is set. It is a
# notice about configuration directories, not about this code, and filterwarnings=["error"]
# would turn it into a failure; that one message is ignored, nothing else.
@pytest.mark.filterwarnings("ignore:Jupyter is migrating its paths:DeprecationWarning")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path, kernel_path: str, tmp_path, monkeypatch):
    import jupytext
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("JUPYTER_PATH", kernel_path)
    nb = jupytext.read(path)
    assert any(cell.cell_type == "code" for cell in nb.cells), f"{path.name} has no code cells"
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
        # The kernel logs a warning that it talks to its client over local TCP without
        # encryption; keep the test output to errors.
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
    )
    try:
        client.execute()
        error = None
    except CellExecutionError as e:
        error = ANSI_ESCAPE.sub("", str(e))  # IPython colours its tracebacks
    if error is not None:
        pytest.fail(f"{path.name} failed:\n{error}", pytrace=False)
