"""Stand-in for transformers' tests/generation/test_utils.py (not vendored; see ../README.md).

test_modeling_common.py imports `GenerationTesterMixin` from here only to check that a tester of a model
that can `generate` inherits it. DiNAT cannot generate, so an empty class is all that check needs.
"""


class GenerationTesterMixin:
    pass
