"""Writing a torch module as an ONNX graph: the one place this toolkit calls `torch.onnx.export`.

`write_graph(graph, path, image_shape, ...)` exports a module that takes images `(N, *image_shape)`
with torch's torch.export-based exporter (it needs onnxscript); a graph it cannot export is one
`UserError` line naming the operator when torch names it. Both the extraction engine
(`featuresExtractor.engines`, whose graphs `featuresExtractor.graph_cache` keeps) and the run export
(`retrieval.export`) write their graphs through it.

Example:
    >>> from featuresExtractor.engines import TapGraph                              # doctest: +SKIP
    >>> write_graph(TapGraph(visual, taps), Path("g.onnx"), (3, 288, 288), 18, True,
    ...             output_names=taps)                                              # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from toolkit.utils import UserError, first_line

__all__ = ["write_graph", "DEFAULT_OPSET"]

DEFAULT_OPSET = 18
"""The opset torch's exporter writes natively."""

_OPERATOR = (re.compile(r"operator '([\w:.]+)'"), re.compile(r"OpOverload\(op='([\w.]+)'"),
             re.compile(r"target=torch\.ops\.([\w.]+)"))


def _export_failure(err: Exception, arch: str) -> UserError:
    """One line for a graph torch.onnx cannot export, naming the operator when the error does."""
    text = f"{err} {err.__cause__ or ''}"
    for pattern in _OPERATOR:
        if m := pattern.search(text):
            return UserError(f"{arch} cannot be exported to ONNX: the operator {m.group(1)} has no ONNX conversion "
                             f"at this opset (try another --opset, or another backbone)")
    return UserError(f"{arch} cannot be exported to ONNX: {first_line(err)[:300]}")


def write_graph(graph: nn.Module, path: Path, image_shape: Sequence[int], opset: int, dynamic_batch: bool,
                arch: str = "the backbone", output_names: Sequence[str] = ("embedding",)) -> None:
    """`torch.onnx.export` of `graph` to `path`: input "images" (N, *image_shape), outputs `output_names`.

    Raises `UserError` (one line) when torch cannot export the graph.
    """
    # A batch of 2 when dynamic: torch.export would otherwise take the size-1 batch for a constant.
    x = torch.zeros(2 if dynamic_batch else 1, *image_shape)
    dynamic = {"images": {0: torch.export.Dim("batch")}} if dynamic_batch else None
    quiet = io.StringIO()
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(quiet), _quiet_logs():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, (x,), dynamo=True, opset_version=opset, input_names=["images"],
                                        output_names=list(output_names), dynamic_shapes=dynamic, external_data=False,
                                        optimize=True, verbose=False)
    except torch.onnx.OnnxExporterError as err:
        raise _export_failure(err, arch) from None
    except (RuntimeError, ValueError, TypeError) as err:  # torch.export's own refusals (e.g. data-dependent shapes)
        raise _export_failure(err, arch) from None
    program.save(str(path))


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    # torch.export logs each failed step with a traceback; the failure is said in one line instead.
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)
