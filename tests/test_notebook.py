"""``examples/quickstart.ipynb`` runs end to end (a fresh kernel in an empty folder), so it never rots."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_is_stored_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), "clear the outputs"
    sources = "\n".join(c.source for c in nb.cells)
    # a quoted path that starts at a root ("/x/..." or "C:\\...") only works on the machine that wrote it
    assert not re.search(r"[\"'](/\w+/|[A-Z]:\\\\)", sources), "no absolute paths in the notebook"


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel is this interpreter (ipykernel's native "python3" spec), started in an empty folder.
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # It trained a run that learned, wrote the explanation panels, and showed its figures.
    metrics = json.loads((tmp_path / "runs" / "quickstart" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.9
    assert sorted(p.name for p in (tmp_path / "explanations" / "panels").iterdir()) == [
        f"{i}.png" for i in range(4)
    ]
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 3  # training curves, an explanation panel, the metric chart
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for name in ("deletion_auc", "insertion_auc", "integrated_gradients", "gradcam"):
        assert name in printed
