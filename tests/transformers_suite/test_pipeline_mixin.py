"""Stand-in for transformers' tests/test_pipeline_mixin.py (not vendored; see README.md).

test_modeling_dinat.py mixes in `PipelineTesterMixin`. transformers' mixin reads the hub's tiny-model
summary (tests/utils/tiny_model_summary.json) and its per-task pipeline test modules, and its tests run only
with RUN_PIPELINE_TESTS=1 against tiny checkpoints on the hub; none of that exists offline. This package tests
`pipeline("image-classification")` and `pipeline("image-feature-extraction")` in tests/test_auto_pipeline.py.
The stand-in adds no tests.
"""


class PipelineTesterMixin:
    pass
