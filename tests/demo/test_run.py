"""Tests for rapidin_index/demo/run.py that need no model: the data cache and the ROC-AUC explanation."""

from __future__ import annotations

import json

import pytest
from rapidin_index.cli.main import app
from typer.testing import CliRunner

from rapidin_index.demo.run import DemoPaths, DemoSettings, _roc_auc_line, prepare_data
from rapidin_index.errors import DemoError


def test_prepare_data_caches_and_remakes_when_the_data_set_changes(tmp_path):
    paths = DemoPaths(tmp_path)
    train, heldout = prepare_data(DemoSettings(folder=str(tmp_path), rows=300), paths)
    assert sum(row["poisoned"] for row in train) == round(0.1 * len(train))
    assert json.loads(paths.cache_settings.read_text())["dataset"] == "nonlexical"
    (paths.model).mkdir()
    (paths.model / "config.json").write_text("{}")
    assert prepare_data(DemoSettings(folder=str(tmp_path), rows=300), paths) == (train, heldout)
    assert paths.model.exists()  # same settings: reused
    lexical, _ = prepare_data(DemoSettings(folder=str(tmp_path), rows=300, dataset="lexical"), paths)
    assert lexical != train and not paths.model.exists()  # the old model came from other data
    assert lexical[0]["symbol"] == train[0]["symbol"]
    with pytest.raises(DemoError, match="--dataset 'other' is not one of nonlexical, lexical"):
        DemoSettings(folder=str(tmp_path), dataset="other")


def test_the_cli_refuses_an_unknown_dataset_before_any_work(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--folder", str(tmp_path / "demo"), "--dataset", "other"])
    assert result.exit_code == 2 and "--dataset 'other' is not one of" in result.output
    assert not (tmp_path / "demo").exists()


def test_roc_auc_line_says_why_only_when_it_is_lower():
    lower = _roc_auc_line({"roc_auc": 0.4, "auprc@10": 1.0}, [0.5, 0.7], 2151)
    assert lower.startswith("roc_auc ranks all 2,151 training rows") and "60% of the poisoned rows" in lower
    assert "lower" not in _roc_auc_line({"roc_auc": 0.99, "auprc@10": 0.9}, [0.0], 10)
    assert "lower" not in _roc_auc_line({"roc_auc": 0.5, "auprc@10": None}, [0.2], 10)
