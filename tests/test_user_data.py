"""Data of the user's own (``data = "python:package.module:loader"``): the loader contract,
the public-constants rule, and a typed error for each kind of bad output."""

from __future__ import annotations

import numpy as np
import pytest

from peer.training.data import load_source, load_train_source
from peer.training.tables import DataError, TableConfig, TableMetadataError, UnknownLabelError
from peer.training.user_data import LoaderError, load_python
from tests.user_factories import _records

F = "tests.user_factories"


def test_a_dataset_loader_is_standardised_with_its_declared_constants() -> None:
    x, y, classes, name = load_python(f"{F}:windows")
    raw, labels = _records()
    assert (classes, name, x.dtype, y.dtype) == (2, "windows", np.float32, np.int64)
    assert np.allclose(x, np.clip(raw / 2.0, -10, 10))
    assert np.array_equal(y, (labels == "high").astype(np.int64))


def test_the_source_splits_a_loader_like_a_table_and_trains_on_the_same_records() -> None:
    train, test = load_source(f"python:{F}:windows")
    assert (len(train), len(test), train.num_classes, train.input_shape) == (96, 24, 2, (2, 8))
    assert np.array_equal(load_train_source(f"python:{F}:windows").x, train.x)


def test_bare_arrays_need_the_class_list_from_the_config() -> None:
    with pytest.raises(TableMetadataError, match="no public class list"):
        load_python(f"{F}:bare_arrays")
    x, y, classes, _name = load_python(f"{F}:bare_arrays", TableConfig(classes=(0, 1),
                                                                      standardise=False))
    assert classes == 2 and set(np.unique(y)) == {0, 1} and x.shape == (120, 2, 8)


def test_one_record_never_moves_another_records_input() -> None:
    """The public-constants rule: a loader's records are mapped with declared constants, so
    making one record extreme leaves every other record's model input unchanged."""
    base, labels, _c, _n = load_python(f"{F}:windows")
    changed, labels_changed, _c2, _n2 = load_python(f"{F}:windows_one_extreme")
    assert np.array_equal(base[1:], changed[1:]) and np.array_equal(labels, labels_changed)
    assert np.all(changed[0] == 10.0)  # the extreme record is clipped to the bound


def test_the_class_count_is_the_declared_list_not_the_labels_present() -> None:
    _x, y, classes, _n = load_python(f"{F}:windows", TableConfig(classes=("low", "high",
                                                                           "spare")))
    assert classes == 3 and int(y.max()) == 1


@pytest.mark.parametrize(("loader", "error", "words"), [
    ("ragged", LoaderError, "ragged"),
    ("non_finite", DataError, "record 6 has a NaN or infinite"),
    ("unknown_label", UnknownLabelError, "'medium'"),
    ("float_labels", LoaderError, "expected integers or strings"),
    ("text_features", LoaderError, "expected numbers"),
    ("loader_raises", LoaderError, "raised FileNotFoundError"),
    ("returns_none", LoaderError, "returned a NoneType"),
    ("nothing_here", LoaderError, "has no 'nothing_here'"),
])
def test_bad_loader_output_gets_a_typed_error_naming_the_problem(
        loader: str, error: type[Exception], words: str) -> None:
    with pytest.raises(error) as caught:
        load_source(f"python:{F}:{loader}")
    assert words in str(caught.value)


def test_a_malformed_loader_path_is_a_loader_error() -> None:
    with pytest.raises(LoaderError, match="not an import path"):
        load_source("python:just-a-file.py")
