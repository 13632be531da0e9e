"""Text classifiers' routes: TEI's ``/predict`` (and ``POST /`` of a classifier artifact, in TEI's shape or, for a
body with ``parameters``, the Hugging Face Inference API's that ``huggingface_hub.InferenceClient`` parses) and
vLLM's ``/classify``.

Both read the task table's ``classify`` (``toolkit.runtime.tasks``): per-label probabilities with the activation
the export recorded (transformers' text-classification pipeline's: softmax over labels; sigmoid for one label or
a multi-label model; none for regression), raw logits when asked.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
from litestar import Controller, Request, Response, post

from toolkit.errors import ModelKindError, RequestError
from toolkit.runtime.async_embedder import Timings
from toolkit.runtime.pooling import activate
from toolkit.runtime.tasks import labelled
from toolkit.server.inputs import ChatRequest, prompt_or_chat
from toolkit.server.limits import check_limits, check_priority, tei_truncation
from toolkit.server.metrics import timing_headers
from toolkit.server.schema import ListResponse, UsageInfo

__all__ = ["ClassificationResponse", "ClassifyController", "ClassifyRequest", "TEIPrediction", "TEIPredictRequest",
           "create_classification", "predict_inputs", "tei_predict"]


class TEIPredictParameters(msgspec.Struct, kw_only=True):
    """The Hugging Face Inference API's text-classification parameters (``InferenceClient`` sends them)."""

    top_k: int | None = None
    function_to_apply: str | None = None  # sigmoid | softmax | none


class TEIPredictRequest(msgspec.Struct, kw_only=True):
    """TEI's /predict body: ``inputs`` a text, a pair ``[a, b]``, or a batch of ``[text]`` / ``[a, b]``."""

    inputs: str | list[Any]
    truncate: bool | None = None
    truncation_direction: str = "Right"
    raw_scores: bool = False
    parameters: TEIPredictParameters | None = None  # the Inference API's body: answered in its nested shape
    model: str | None = None  # an extension: TEI serves one model


class TEIPrediction(msgspec.Struct):
    score: float
    label: str


def predict_inputs(inputs: str | list[Any]) -> tuple[list, bool]:
    """TEI's reading of /predict's ``inputs`` -> (texts and (a, b) pairs, whether it was a batch): a string is one
    text; a list of strings is one text (one string) or one pair (two); a list of lists is a batch whose entries
    are ``[text]`` or ``[a, b]``. Anything else is refused as TEI refuses it."""
    expected = "a string, a pair of strings [string, string] or a batch of mixed strings and pairs [[string], " \
               "[string, string], ...]"
    if isinstance(inputs, str):
        return [inputs], False
    if not inputs:
        raise RequestError(f"`inputs` cannot be empty: give {expected}", param="inputs")
    if all(isinstance(x, str) for x in inputs):
        if len(inputs) > 2:
            raise RequestError(f"invalid length {len(inputs)}, expected {expected}", param="inputs")
        return [inputs[0] if len(inputs) == 1 else (inputs[0], inputs[1])], False
    batch = []
    for i, entry in enumerate(inputs):
        if not (isinstance(entry, list) and 1 <= len(entry) <= 2 and all(isinstance(x, str) for x in entry)):
            raise RequestError(f"inputs[{i}] is not [string] or [string, string]; expected {expected}",
                               param="inputs")
        batch.append(entry[0] if len(entry) == 1 else (entry[0], entry[1]))
    return batch, True


async def tei_predict(request: Request, data: TEIPredictRequest) -> Response:
    """TEI's ``/predict``: every label with its score, best first; a list for one input, a list per input for a
    batch. With ``parameters`` (the Inference API's body) a list per input always, cut to ``top_k``, the scores
    through ``function_to_apply`` when given."""
    request.state.dialect = "tei"
    served = request.app.state.registry.get(data.model)
    emb, options = served.embedder, request.app.state.options
    if "classify" not in emb.tasks:
        raise ModelKindError(f"Backend error: Model is not a classifier model (this is a {emb.kind} "
                             f"artifact; it answers {', '.join(emb.tasks)})", param="inputs")
    items, batch = predict_inputs(data.inputs)
    check_limits(len(items), options, param="inputs")
    params = data.parameters
    function = params.function_to_apply.lower() if params and params.function_to_apply else None
    if function is not None and function not in ("sigmoid", "softmax", "none"):
        raise RequestError(f"function_to_apply '{params.function_to_apply}' is not one of: sigmoid, softmax, none",
                           param="parameters.function_to_apply")
    if params is not None and params.top_k is not None and params.top_k < 1:
        raise RequestError("top_k must be at least 1", param="parameters.top_k")
    timings, started = Timings(), time.perf_counter()
    scores, tokens = await served.engine.classify(
        items, use_activation=not data.raw_scores and function is None, timings=timings,
        max_tokens=options.max_request_tokens, **tei_truncation(data.truncate, data.truncation_direction))
    if function is not None and not data.raw_scores:
        scores = activate(scores, None if function == "none" else function)
    ranked = labelled(emb.context, scores, params.top_k if params is not None else None)
    body = ranked if batch or params is not None else ranked[0]
    return Response(body, headers={**timing_headers(timings, started), "x-compute-tokens": str(tokens)})


class ClassifyRequest(ChatRequest, kw_only=True):
    """vLLM's classification request: ``input``, or chat ``messages`` (one item); ``activation`` and ``softmax``
    are older names of ``use_activation``."""

    model: str | None = None
    input: str | list[Any] | None = None  # a text, texts, token ids, or lists of token ids (checked when tokenized)
    truncate_prompt_tokens: int | None = None
    use_activation: bool | None = None
    activation: bool | None = None
    softmax: bool | None = None
    priority: int = 0
    user: str | None = None
    request_id: str | None = None


class ClassificationData(msgspec.Struct):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(ListResponse):
    data: list[ClassificationData]
    usage: UsageInfo


async def create_classification(request: Request, data: ClassifyRequest) -> ClassificationResponse:
    """vLLM's ``/classify``: per input its probabilities in label order and the most likely label."""
    served = request.app.state.registry.get(data.model)
    emb, options = served.embedder, request.app.state.options
    response_id = f"classify-{data.request_id or uuid.uuid4().hex}"
    emb.require("classify")
    if data.input == "" or (data.input is None and not data.messages):
        raise RequestError("Input or messages must be provided", param="input")
    inputs, specials = await prompt_or_chat(emb, data, data.input, "input", options)
    listed = [inputs] if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)) else inputs
    if not listed:  # vLLM answers an empty list with an empty list
        return ClassificationResponse(id=response_id, object="list", created=int(time.time()), model=served.name,
                                      data=[], usage=UsageInfo.of(0))
    check_limits(len(listed), options)
    activation = next((v for v in (data.softmax, data.activation, data.use_activation) if v is not None), True)
    scores, tokens = await served.engine.classify(
        listed, use_activation=activation, truncate_prompt_tokens=data.truncate_prompt_tokens,
        add_special_tokens=specials, priority=check_priority(data.priority, options),
        max_tokens=options.max_request_tokens)
    labels = emb.labels
    rows = [ClassificationData(i, labels[int(row.argmax())], [float(x) for x in row], len(row))
            for i, row in enumerate(scores)]
    return ClassificationResponse(id=response_id, object="list", created=int(time.time()), model=served.name,
                                  data=rows, usage=UsageInfo.of(tokens))


class ClassifyController(Controller):
    tags = ["Classification"]

    @post("/predict", status_code=200, summary="Labels and scores of texts or text pairs (text-embeddings-inference)")
    async def predict(self, request: Request, data: TEIPredictRequest) -> Response:
        return await tei_predict(request, data)

    @post("/classify", status_code=200, summary="Per-label probabilities and the most likely label (vLLM)")
    async def classify(self, request: Request, data: ClassifyRequest) -> ClassificationResponse:
        return await create_classification(request, data)
