"""Export of nfdet models for deployment (``tools/export_model.py``): TorchScript and ONNX by
tracing, as detectron2's deploy tool does, and ``torch.export``.

The model runs its plain code while it is captured (``nfdet.modeling.fused`` steps aside), so
an exported graph computes the weight standardization from the parameters (ONNX runtimes fold
it into constants when the session starts). Every export is checked: the exported file is
loaded back and run on the sample input, and the largest difference from the eager model's
outputs is reported (``ExportReport``).

What each format serves:

- ``torchscript`` (``model.ts``, ``torch.jit.trace``): any input size (SAME padding is traced
  from the input's shape); load with ``torch.jit.load``.
- ``onnx`` (``model.onnx``, TorchScript-based exporter): batch, height and width are dynamic
  axes of a classifier; run with onnxruntime.
- ``torch_export`` (``model.pt2``, ``torch.export``): the sample's shape; load with
  ``torch.export.load(path).module()``.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "FORMATS",
    "ExportError",
    "ExportReport",
    "build_classifier",
    "classifier_sample",
    "compare_outputs",
    "export_classifier",
    "export_traced",
    "load_exported",
]

FORMATS = ("torchscript", "onnx", "torch_export")
FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx", "torch_export": "model.pt2"}
ONNX_OPSET = 17


class ExportError(RuntimeError):
    """An export that cannot be done (unsupported model/format pair, bad input), with a one-line
    message saying why."""


@dataclass
class ExportReport:
    """The output check of one export.

    Args:
        model (str): what was exported (e.g. "classifier nano").
        format (str): one of ``FORMATS``.
        path (str): the exported file.
        input_shape (tuple[int, ...]): the sample input's shape.
        max_abs_diff (float): largest |exported - eager| over every output element.
        max_abs_output (float): largest |eager output| (the scale of the difference).
        note (str): anything else to say (e.g. a check that could not run).
    """

    model: str
    format: str
    path: str
    input_shape: tuple[int, ...]
    max_abs_diff: float
    max_abs_output: float
    note: str = ""

    @property
    def relative_diff(self) -> float:
        """``max_abs_diff / max_abs_output`` (0 when both are 0)."""
        if self.max_abs_diff == 0.0:
            return 0.0
        return self.max_abs_diff / self.max_abs_output if self.max_abs_output else math.inf

    def text(self) -> str:
        """A few lines for a terminal or ``export_report.txt``."""
        lines = [
            f"model: {self.model}",
            f"format: {self.format}",
            f"file: {self.path}",
            f"input shape: {list(self.input_shape)}",
            f"output check: max |exported - eager| = {self.max_abs_diff:.3g} "
            f"({self.relative_diff:.3g} of max |output| = {self.max_abs_output:.3g})",
        ]
        if self.note:
            lines.append(f"note: {self.note}")
        return "\n".join(lines) + "\n"


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")


def _drop_initializer_identities(proto) -> None:
    """Remove from an ONNX model the ``Identity`` nodes that merely rename an initializer.

    The TorchScript-based exporter stores parameters of equal values once and reads the
    copies through ``Identity`` nodes (e.g. the all-ones gains of a fresh model);
    onnxruntime's graph optimizer then drops those nodes without rewiring every reader, and
    the session fails to load ("... is not a graph input, initializer, or output of a
    previous node"). Reading the initializer directly computes the same.
    """
    import onnx

    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    rename = {n.output[0]: n.input[0] for n in graph.node
              if n.op_type == "Identity" and n.input[0] in initializers
              and n.output[0] not in outputs}
    if not rename:
        return

    def rewire(g) -> None:
        kept = [n for n in g.node if not (n.op_type == "Identity" and n.output[0] in rename)]
        for node in kept:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
            for attr in node.attribute:  # subgraphs (If, Loop) read outer names too
                if attr.type == onnx.AttributeProto.GRAPH:
                    rewire(attr.g)
                for sub in attr.graphs:
                    rewire(sub)
        del g.node[:]
        g.node.extend(kept)

    rewire(graph)


def export_traced(module: nn.Module, inputs: tuple[torch.Tensor, ...], fmt: str, path: str,
                  dynamic_axes: dict | None = None,
                  output_names: Sequence[str] | None = None) -> None:
    """Write ``module`` (in eval mode), captured on ``inputs``, to ``path`` in format ``fmt``.

    Args:
        module (nn.Module): takes ``inputs`` and returns a tensor or a tuple/list of tensors.
        inputs (tuple[Tensor]): the sample inputs.
        fmt (str): one of ``FORMATS``.
        path (str): the file to write.
        dynamic_axes (dict | None): ONNX dynamic axes by input name ("input0", ...) or
            output name.
        output_names (sequence[str] | None): ONNX output names.
    """
    from .checkpoint import atomic_write

    _check_format(fmt)
    # Each file is written atomically (beside the target, then renamed): a failed export never
    # leaves a broken file where an earlier one was.
    with torch.no_grad():
        if fmt == "torchscript":
            with warnings.catch_warnings():
                # Shape arithmetic (SAME padding, detectron2's boxes) is traced as such.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(module, inputs, check_trace=False)
            atomic_write(path, lambda f: torch.jit.save(traced, f))
        elif fmt == "onnx":
            proto = _onnx_proto(module, inputs, dynamic_axes, output_names)
            atomic_write(path, lambda f: f.write(proto.SerializeToString()))
        else:
            program = torch.export.export(module, inputs)
            atomic_write(path, lambda f: torch.export.save(program, f))


def _onnx_proto(module: nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_axes: dict | None,
                output_names: Sequence[str] | None):
    """The ONNX model of ``module`` (TorchScript-based exporter), ready for onnxruntime."""
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package (pip install onnx)") from None
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(module, inputs, path, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=[f"input{i}" for i in range(len(inputs))],
                              output_names=output_names, dynamic_axes=dynamic_axes)
        proto = onnx.load(path)
    _drop_initializer_identities(proto)
    return proto


def load_exported(path: str, fmt: str) -> Callable[..., list[torch.Tensor]]:
    """A function running the exported file on tensors and returning its outputs as a list.

    Raises:
        ExportError: ``fmt`` is "onnx" and onnxruntime is not installed.
    """
    _check_format(fmt)
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise ExportError("the ONNX output check needs onnxruntime (pip install "
                              "onnxruntime)") from None
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run_onnx(*inputs: torch.Tensor) -> list[torch.Tensor]:
            feed = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)}
            return [torch.from_numpy(a) for a in session.run(None, feed)]

        return run_onnx
    if fmt == "torchscript":
        module = torch.jit.load(path)
    else:
        module = torch.export.load(path).module()

    def run(*inputs: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            out = module(*inputs)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    return run


def compare_outputs(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> tuple[float,
                                                                                         float]:
    """``(max |got - want|, max |want|)`` over every element of every output.

    Raises:
        ExportError: the outputs differ in number or shape.
    """
    if len(got) != len(want):
        raise ExportError(f"the exported model returns {len(got)} outputs, eager {len(want)}")
    diff = scale = 0.0
    for i, (a, b) in enumerate(zip(got, want)):
        if tuple(a.shape) != tuple(b.shape):
            raise ExportError(f"output {i}: exported shape {tuple(a.shape)}, eager "
                              f"{tuple(b.shape)}")
        if b.numel():
            a, b = a.detach().double().cpu(), b.detach().double().cpu()
            diff = max(diff, (a - b).abs().max().item())
            scale = max(scale, b.abs().max().item())
    return diff, scale


def export_classifier(model: nn.Module, sample: torch.Tensor, fmt: str, output_dir: str,
                      name: str = "classifier") -> ExportReport:
    """Export an NFNet classifier (logits out) and check the file against the eager model.

    Args:
        model (nn.Module): the classifier (put in eval mode).
        sample (Tensor): an (N, 3, H, W) input.
        fmt (str): one of ``FORMATS``.
        output_dir (str): where ``model.ts`` / ``model.onnx`` / ``model.pt2`` is written.
        name (str): what to call the model in the report.

    Returns:
        ExportReport: the file and the largest difference of its logits from eager ones.
    """
    _check_format(fmt)
    if sample.dim() != 4:
        raise ExportError(f"the classifier takes (N, C, H, W) inputs, got {tuple(sample.shape)}")
    model.eval()
    path = os.path.join(output_dir, FILE_NAMES[fmt])
    dynamic = {"input0": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}
    export_traced(model, (sample,), fmt, path, dynamic_axes=dynamic if fmt == "onnx" else None,
                  output_names=["logits"])
    with torch.no_grad():
        want = [model(sample)]
    diff, scale = compare_outputs(load_exported(path, fmt)(sample), want)
    return ExportReport(name, fmt, path, tuple(sample.shape), diff, scale)


def build_classifier(config_file: str, opts: Sequence[str] = ()) -> tuple[nn.Module, object]:
    """The classifier of a pretraining config with ``MODEL.WEIGHTS`` loaded (an nfdet
    checkpoint ``{"model": state dict}``, or a bare state dict).

    Args:
        config_file (str): a pretraining config (path, or a name under ``configs/``).
        opts (sequence[str]): ``KEY VALUE`` overrides.

    Returns:
        (NFNet, CfgNode): the model in eval mode, and the config.

    Raises:
        ExportError: the weights do not fit the model (the file and the keys named).
    """
    from .checkpoint import load_torch_checkpoint
    from .classification.config import load_pretrain_cfg
    from .modeling import build_nfnet

    cfg = load_pretrain_cfg(config_file, list(opts))
    model = build_nfnet(cfg.MODEL.NFNET.VARIANT, num_classes=cfg.MODEL.NUM_CLASSES)
    weights = cfg.MODEL.WEIGHTS
    if weights:
        ckpt = load_torch_checkpoint(weights)
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise ExportError(f"MODEL.WEIGHTS {weights}: not an nfdet checkpoint or state dict")
        own = model.state_dict()
        problems = ([f"missing {k}" for k in own if k not in state]
                    + [f"unexpected {k}" for k in state if k not in own]
                    + [f"{k} has shape {tuple(state[k].shape)}, the model {tuple(own[k].shape)}"
                       for k in own if k in state and hasattr(state[k], "shape")
                       and tuple(state[k].shape) != tuple(own[k].shape)])
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ExportError(f"MODEL.WEIGHTS {weights} does not fit NFNet "
                              f"{cfg.MODEL.NFNET.VARIANT}: {'; '.join(problems[:3])}{more}")
        model.load_state_dict(state)
    return model.eval(), cfg


def classifier_sample(cfg, path: str | None = None) -> torch.Tensor:
    """A (1, 3, S, S) classifier input, S = ``INPUT.TEST_SIZE``: the image file ``path`` (read
    as RGB, resized bicubically, normalized with ``DATA.PIXEL_MEAN``/``PIXEL_STD``), or seeded
    noise.

    Raises:
        ImageReadError: the file cannot be read (the message names it).
    """
    size = cfg.INPUT.TEST_SIZE
    if not path:
        return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    import numpy as np
    from PIL import Image

    from .data.validate import read_image_rgb

    image = read_image_rgb(path).resize((size, size), Image.BICUBIC)
    x = torch.as_tensor(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    mean = torch.tensor(cfg.DATA.PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(cfg.DATA.PIXEL_STD).view(3, 1, 1)
    return ((x - mean) / std)[None]
