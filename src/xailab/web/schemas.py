"""The JSON shapes of the web API (request fields and responses), as pydantic models: the OpenAPI schema at
``/openapi.json`` is generated from them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Form
from pydantic import BaseModel

TopK = Annotated[int, Form(ge=1, le=1000, description="how many classes, most probable first")]


class ClassProbability(BaseModel):
    index: int
    name: str
    probability: float


class RunSummary(BaseModel):
    run: str
    model: str
    dataset: str
    status: str  # "finished", "running", ..., or "broken" (then ``error`` says why)
    epochs: str
    test_accuracy: float | None
    error: str | None = None


class RunInfo(RunSummary):
    class_names: list[str]
    image_size: list[int]
    channels: int
    test_macro_f1: float | None
    device: str
    methods: list[str]  # the explanation methods that apply to the run's model


class Prediction(BaseModel):
    run: str
    top: list[ClassProbability]
    seconds: float


class MethodMap(BaseModel):
    method: str
    overlay_png: str  # data URL: the image blended with the colour-mapped map (alpha)
    heatmap_png: str  # data URL: the colour-mapped map alone, for an opacity slider over ``image_png``
    seconds: float
    attribution: list[list[float]] | None = None  # the raw map [H][W], when asked for with raw=true


class Explanation(BaseModel):
    run: str
    image_png: str
    top: list[ClassProbability]
    target: ClassProbability
    maps: list[MethodMap]


class MethodInfo(BaseModel):
    name: str
    description: str


class Sample(BaseModel):
    index: int
    label: str
    url: str


class Report(BaseModel):
    name: str
    url: str


class ErrorDetail(BaseModel):
    detail: str


ERROR_MEANINGS = {
    400: "bad input (unreadable or too large image, unknown method or parameter, bad target), or a broken run",
    404: "unknown run, sample or report file",
    413: "upload over the size limit",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the 4xx answers of a route (all ``{"detail": "..."}``)."""
    return {code: {"model": ErrorDetail, "description": ERROR_MEANINGS[code]} for code in codes}
