"""Stand-in for transformers' tests/exporters/test_export.py (not vendored; see ../README.md).

test_modeling_common.py imports `ExportTesterMixin` from here. transformers' export tests drive its
`transformers.exporters` backends (dynamo, ONNX, ExecuTorch, OpenVINO) over every model class; this package
tests torch.export and ONNX export of DiNAT itself in tests/test_export.py. The stand-in adds no tests.
"""


class ExportTesterMixin:
    pass
