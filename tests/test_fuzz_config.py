"""Hypothesis over the schemas every user-facing value goes through (the training recipe, study files, the
faces' option records, method options, CSV options): whatever the input, the answer is a valid object or a
``XailabError`` naming the field, never another exception (a traceback for the user)."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xailab import api
from xailab.config import folder_name
from xailab.data.folders import CsvOptions
from xailab.errors import XailabError
from xailab.study.spec import StudySpec, spec_from_dict
from xailab.train import TrainConfig

SETTINGS = settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))

# What YAML, TOML, JSON and the command line can produce, plus the awkward corners of each kind.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2**63, -(2**63), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "²", "٣", "1_0", "../../x", "auto", "cpu", "cuda", "banana", "fp32", "adam", "nan"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def records(cls: type, extra_keys: list[str] = ()) -> st.SearchStrategy[dict]:
    """Dicts over ``cls``'s field names (and a few near misses) with any values."""
    names = [f.name for f in dataclasses.fields(cls)]
    keys = st.sampled_from([*names, *extra_keys, "learning_rate", "epoch", ""]) | st.text(max_size=6)
    return st.dictionaries(keys, values, max_size=8)


def only_xailab_errors(build, data):
    """``build(data)``; the only exceptions allowed are ``XailabError``s with a message."""
    try:
        return build(data)
    except XailabError as e:
        assert str(e), f"an empty error message for {data!r}"
        return None


@SETTINGS
@given(data=records(TrainConfig), model=st.sampled_from(["mnist_cnn", "resnet81", 3]), dataset=values)
def test_train_config(data, model, dataset):
    config = only_xailab_errors(TrainConfig.from_dict, {"model": model, "dataset": dataset, **data})
    if config is not None:  # what was accepted is within bounds and survives a round trip through JSON
        assert config.epochs >= 1 and config.batch_size >= 1 and config.lr > 0
        assert TrainConfig.from_dict(config.to_dict()) == config


@SETTINGS
@given(
    data=records(StudySpec, ["train.epochs"]),
    datasets=st.lists(st.sampled_from(["digits", "csv_folder", "mnits"]), max_size=2) | values,
    models=st.lists(st.sampled_from(["mnist_cnn", "keras_cnn"]), max_size=2) | values,
    methods=st.lists(st.sampled_from(["saliency", "captum:Saliency", "gradcam", "nope"]), max_size=2)
    | values,
)
def test_study_spec(data, datasets, models, methods):
    spec = only_xailab_errors(
        spec_from_dict, {"name": "s", "datasets": datasets, "models": models, "methods": methods, **data}
    )
    if spec is not None:
        assert folder_name(spec.name, "name") == spec.name and "/" not in spec.name


@SETTINGS
@given(
    cls=st.sampled_from(
        [api.PredictOptions, api.ExplainOptions, api.AssessOptions, api.ServeOptions, CsvOptions]
    ),
    data=st.dictionaries(
        st.sampled_from(
            [
                "top_k",
                "n",
                "batch_size",
                "seed",
                "port",
                "max_upload_mb",
                "test_fraction",
                "split_seed",
                "csv",
            ]
        ),
        values,
        max_size=4,
    ),
)
def test_option_records(cls, data):
    names = {f.name for f in dataclasses.fields(cls)}
    only_xailab_errors(
        lambda d: api.options(cls, "options", **d), {k: v for k, v in data.items() if k in names}
    )


@SETTINGS
@given(
    methods=st.lists(
        st.sampled_from(["saliency", "integrated_gradients", "smoothgrad", "occlusion", "captum:Saliency"]),
        min_size=1,
        max_size=3,
        unique=True,
    ),
    options=st.dictionaries(
        st.sampled_from(
            [
                "n_steps",
                "integrated_gradients.method",
                "internal_batch_size",
                "baseline",
                "x.y",
                "saliency.abs",
                "",
                ".",
                "stdevs",
                "window",
            ]
        )
        | st.text(max_size=10),
        values,
        max_size=4,
    ),
)
def test_method_options(methods, options):
    params = only_xailab_errors(lambda o: api.method_options(methods, o), options)
    if params is not None:  # every accepted parameter went to a chosen method that declares it
        for method, given_params in params.items():
            assert method in methods and set(given_params) <= api.method_param_names(method)


@SETTINGS
@given(name=values)
def test_folder_names(name):
    checked = only_xailab_errors(lambda n: folder_name(n, "name"), name)
    if checked is not None:
        assert checked not in (".", "..") and "/" not in checked and "\\" not in checked
        assert not checked.startswith(".")
