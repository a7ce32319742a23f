"""One base class for every typed error, and the CLI turns any of them into one clear line."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import typer
from rapidin_index.cli import main as cli

import rapidin_index
from rapidin_index import errors

ERROR_CLASSES = [
    value
    for name, value in vars(errors).items()
    if inspect.isclass(value) and issubclass(value, Exception) and name != "RapidinIndexError"
]


def all_modules():
    names = [m.name for m in pkgutil.walk_packages(rapidin_index.__path__, "rapidin_index.")]
    return [importlib.import_module(name) for name in names if not name.startswith("rapidin_index.cli")]


def test_every_error_is_a_rapidin_index_error_and_keeps_its_builtin_base():
    assert len(ERROR_CLASSES) >= 20
    for error_class in ERROR_CLASSES:
        assert issubclass(error_class, errors.RapidinIndexError), error_class
        # old `except` clauses still work; a write the disk refused (WriteError) is an OSError
        assert issubclass(error_class, ValueError | RuntimeError | OSError), error_class


def test_no_module_defines_an_error_class_of_its_own():
    for module in all_modules():
        if module is errors:
            continue
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, Exception)
                and value.__module__ == module.__name__
            ):
                pytest.fail(f"{module.__name__}.{name} is defined outside rapidin_index.errors")


def test_no_module_raises_a_bare_value_error():
    for module in all_modules():
        source = Path(module.__file__).read_text()
        assert "raise ValueError(" not in source, module.__name__
        assert "raise RuntimeError(" not in source, module.__name__


@pytest.mark.parametrize(
    "error_class",
    [errors.TokenAttributionError, errors.IntegrityError, errors.FinetuneError, errors.StoreError],
    ids=lambda c: c.__name__,
)
def test_the_cli_prints_any_typed_error_as_one_line_and_exits_2(error_class, capsys):
    def command():
        raise error_class("the index is damaged; rebuild it")

    with pytest.raises(typer.Exit) as stopped:
        cli._one_line_errors(command)()
    assert stopped.value.exit_code == 2
    assert capsys.readouterr().err.strip() == "error: the index is damaged; rebuild it"


def test_a_bug_keeps_its_traceback():
    def command():
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        cli._one_line_errors(command)()

    def asks_for_an_exit():
        raise typer.Exit(code=0)

    with pytest.raises(typer.Exit):  # the CLI's own exits pass through untouched
        cli._one_line_errors(asks_for_an_exit)()
