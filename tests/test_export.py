"""Deployment outside eager PyTorch: torch.export and ONNX (run in onnxruntime), on the pure-PyTorch backend.

Models and expected logits are the golden fixtures of the reference implementation (transformers 4.46.3 +
NATTEN 0.17.5): tiny_pad pads its last stage (2x2 map, 3x3 window) and has dilations up to 4; odd_shapes has
uneven dilation groups (92x76 input) and layer scale.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import load_case
from dinat import DinatForImageClassification

TOLERANCE = 1e-4


def eager_logits(model: DinatForImageClassification, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixels).logits


@pytest.mark.parametrize("case", ["tiny_pad", "odd_shapes"])
def test_torch_export_and_onnx(case, tmp_path):
    """torch.export with a dynamic batch, then ONNX from that program, run in onnxruntime."""
    model, io = load_case(case)
    pixels = io["pixel_values"]
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (pixels,), dynamic_shapes={"pixel_values": {0: batch}})
    exported = program.module()
    torch.testing.assert_close(exported(pixels).logits, io["logits"], rtol=TOLERANCE, atol=TOLERANCE)
    for other in (pixels[:1], torch.cat([pixels, pixels[:1]])):  # batch sizes other than the traced one
        torch.testing.assert_close(exported(other).logits, eager_logits(model, other), rtol=1e-5, atol=1e-5)

    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (torchvision ops not installed, deprecations)
        torch.onnx.export(program, (pixels,), path, dynamo=True, input_names=["pixel_values"],
                          output_names=["logits"], verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["logits"]

    (logits,) = session.run(None, {"pixel_values": pixels.numpy()})
    error = (torch.from_numpy(logits) - eager_logits(model, pixels)).abs().max().item()
    print(f"{case}: onnxruntime vs PyTorch max abs logits error {error:.2e}")
    assert error <= TOLERANCE
    torch.testing.assert_close(torch.from_numpy(logits), io["logits"], rtol=TOLERANCE, atol=TOLERANCE)
    for size in (1, 4):  # the batch stays dynamic in the ONNX graph
        other = torch.randn(size, *pixels.shape[1:], generator=torch.Generator().manual_seed(size))
        (logits,) = session.run(None, {"pixel_values": other.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), eager_logits(model, other),
                                   rtol=TOLERANCE, atol=TOLERANCE)
