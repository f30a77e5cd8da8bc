"""The README's model API example runs as written."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    section = text.split("## Model API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    out = capsys.readouterr().out
    assert "torch.Size([3, 730])" in out
    assert float(ns["sol"].mass_balance_error().detach().abs().max()) < 1e-8
    assert ns["hybrid"].flux("et").net[0].weight.grad is not None
    assert torch.isfinite(ns["hybrid"].raw.grad).all()


def test_readme_calibration_example_runs(capsys):
    """The calibration and training example: M0 calibrated, the hybrid trained, both scored."""
    text = README.read_text()
    section = text.split("## Calibration and training", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    out = capsys.readouterr().out
    assert "test NSE: M0" in out
    assert 0.5 < float(1 - ns["cal"].loss[0]) < 1  # train NSE of the calibrated M0
    assert len(ns["result"].history) == 5
    from adjointhydro.metrics import nse

    test = ns["test"]
    for q in (ns["q_m0"], ns["q_hybrid"]):
        assert 0.3 < nse(ns["observed"][0, test], q[test]) < 1
