"""Model behaviour beyond the golden fixtures and the heads' common contract (test_contract.py): pooling, losses,
backbone selection, input sizes, dtypes, bad input, new heads."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config, tiny_model
from dinat import DinatBackbone, DinatConfig, DinatForImageClassification, DinatModel


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_labels=5).eval()


def test_pooler_is_mean_of_last_hidden_state(model):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model.dinat(x)
        logits = model(x).logits
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(dim=(1, 2)))
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits)


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (100, 20), (7, 9), (224, 160)])
def test_any_input_size(model, size):
    with torch.no_grad():
        out = model.dinat(torch.randn(1, 3, *size), output_hidden_states=True)
    h, w = size
    for _ in range(2):
        h, w = (h + 1) // 2, (w + 1) // 2
    assert out.hidden_states[0].shape[1:3] == (h, w)
    assert torch.isfinite(out.last_hidden_state).all()


def test_losses_by_problem_type():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    single = DinatForImageClassification(tiny_config(num_labels=5)).eval()
    labels = torch.tensor([0, 4, 2])
    out = single(x, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))

    multi = DinatForImageClassification(tiny_config(num_labels=5, problem_type="multi_label_classification")).eval()
    targets = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.float)
    out = multi(x, labels=targets)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, targets))

    regression = DinatForImageClassification(tiny_config(num_labels=1)).eval()
    values = torch.tensor([0.5, -1.0, 2.0])
    out = regression(x, labels=values)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(), values))
    assert regression(x, labels=values, return_dict=False)[0].shape == ()

    with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
        single(x, labels=torch.tensor([0, 5, 1]))


def test_backbone_out_features_and_indices():
    config = tiny_config(out_features=["stem", "stage2"])
    assert config.out_indices == [0, 2]
    backbone = tiny_model(DinatBackbone, out_features=["stem", "stage2"]).eval()
    assert backbone.channels == [16, 32]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = backbone(x).feature_maps
        hidden = backbone(x, output_hidden_states=True).hidden_states
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 16), (2, 32, 8, 8)]
    # feature maps are the stage outputs before downsampling, layer-normed over channels
    norm = backbone.hidden_states_norms["stage2"]
    torch.testing.assert_close(maps[1], norm(hidden[2]).permute(0, 3, 1, 2))
    by_index = DinatConfig(**{**tiny_config().to_dict(), "out_features": None, "out_indices": [-1]})
    assert by_index.out_features == ["stage3"]


def test_model_without_pooler():
    model = DinatModel(tiny_config(), add_pooling_layer=False).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.pooler_output is None


def test_bfloat16_model_runs():
    model = tiny_model().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).logits
        out = model.to(torch.bfloat16)(x).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("make, message", [
    (lambda: torch.randn(3, 32, 32), "must be 4-D"),
    (lambda: torch.randn(1, 1, 32, 32), "has 1 channels but the model expects 3"),
    (lambda: torch.randint(0, 255, (1, 3, 32, 32)), "floating-point"),
    (lambda: torch.randn(0, 3, 32, 32), "empty batch"),
    (lambda: [[0.0]], "must be a torch.Tensor"),
])
def test_bad_input_is_a_clear_error(model, make, message):
    with pytest.raises(ValueError, match=message):
        model(make())
    with pytest.raises(ValueError, match=message):
        DinatBackbone(tiny_config())(make())


def test_reset_classifier_keeps_the_trunk(model):
    import copy

    m = copy.deepcopy(model)
    trunk = {k: v.clone() for k, v in m.dinat.state_dict().items()}
    m.reset_classifier(3, id2label={0: "a", 1: "b", 2: "c"})
    assert m.classifier.weight.shape == (3, 64) and m.config.num_labels == 3
    assert m.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert all(torch.equal(v, m.dinat.state_dict()[k]) for k, v in trunk.items())
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).logits.shape == (1, 3)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bfloat16-autocast"])
def test_weights_changed_through_data_are_used_by_the_next_call(bf16):
    """`p.data.copy_(...)` (EMA updates, weight surgery) bumps no version counter: nothing may keep answering with
    the weights of an earlier call."""
    model, donor = tiny_model(seed=0).eval(), tiny_model(seed=1).eval()
    x = torch.randn(2, 3, 32, 32)

    def logits(m):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return m(x).logits.float()

    before = logits(model)
    for mine, theirs in zip(model.parameters(), donor.parameters()):
        mine.data.copy_(theirs.data)
    after, expected = logits(model), logits(donor)
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
