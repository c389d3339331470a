"""notebooks/analysis.ipynb runs top to bottom on a run directory and shows the run's POPE numbers.

The run directory is the one `tests/test_report.py` builds (no training, no inference); the notebook is
executed with nbclient in a kernel of this interpreter, with ``HADPO_RUN_DIR`` pointing at the run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.test_report import hadpo_metric_paths, make_run, pope_values

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"


def kernel_of_this_python(tmp_path: Path, monkeypatch) -> str:
    """A kernel spec that starts ipykernel with this interpreter (not whatever `python` is on PATH)."""
    spec = tmp_path / "jupyter" / "kernels" / "hadpo-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "hadpo test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return "hadpo-test"


def outputs_text(notebook) -> str:
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if "text" in output:
                texts.append(output["text"])
            data = output.get("data", {})
            texts += [data[key] for key in ("text/plain", "text/html") if key in data]
    return "\n".join(texts)


def test_analysis_notebook_runs_top_to_bottom_and_shows_the_f1(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path / "runs", "demo", seeds=(1, 2))
    kernel = kernel_of_this_python(tmp_path, monkeypatch)
    monkeypatch.setenv("HADPO_RUN_DIR", str(run_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert "HADPO_RUN_DIR" in notebook.cells[1].source and "parameters" in notebook.cells[1].metadata.get("tags", [])

    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name=kernel,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()   # raises CellExecutionError, with the cell and traceback, if any cell fails

    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = outputs_text(notebook)
    paths = hadpo_metric_paths(run_dir)
    before = pope_values(paths["eval_baseline"])
    after = [pope_values(paths[k]) for k in ("eval_hadpo_seed1", "eval_hadpo_seed2")]
    mean_after = pd.Series([a.loc["mean", "f1"] for a in after]).mean()
    assert (f"POPE mean F1: {100 * before.loc['mean', 'f1']:.2f} before -> {100 * mean_after:.2f} after HA-DPO "
            "(2 DPO seeds)") in text
    adversarial_after = pd.Series([a.loc["adversarial", "f1"] for a in after]).mean()
    assert f"{100 * adversarial_after:.2f}" in text
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4      # POPE bars, p(yes), DPO curves, warm-up curve, sweep
