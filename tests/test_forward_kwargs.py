"""Keyword arguments of the models' forward: a misspelled one is a TypeError naming it (never silently ignored:
`label=` would return no loss), while every keyword transformers itself passes to a model (its TransformersKwargs)
is accepted and changes nothing."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments
from transformers.utils import TransformersKwargs

from dinat import DinatBackbone, DinatConfig, DinatForImageClassification, DinatModel

TRANSFORMERS_KWARGS = sorted(TransformersKwargs.__required_keys__ | TransformersKwargs.__optional_keys__)


def small_config(**overrides) -> DinatConfig:
    fields = dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], dilations=[[1], [2]], kernel_size=3, mlp_ratio=2.0,
                  num_labels=4, drop_path_rate=0.0, out_features=["stage1", "stage2"])
    return DinatConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return DinatForImageClassification(small_config()).eval()


PIXELS = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([1, 3])


@pytest.mark.parametrize("typo, suggestion", [("label", "labels"), ("output_attention", "output_attentions"),
                                              ("pixel_value", "pixel_values"), ("return_dicts", "return_dict")])
def test_misspelled_keyword_is_a_type_error_naming_it(classifier, typo, suggestion):
    with pytest.raises(TypeError, match=rf"DinatForImageClassification\.forward\(\) got an unexpected keyword "
                                        rf"argument '{typo}'; did you mean '{suggestion}'\?"):
        classifier(pixel_values=PIXELS, **{typo: LABELS})


@pytest.mark.parametrize("model_class", [DinatModel, DinatBackbone])
def test_trunk_and_backbone_refuse_labels(model_class):
    model = model_class(small_config()).eval()
    with pytest.raises(TypeError, match=rf"{model_class.__name__}\.forward\(\) got an unexpected keyword "
                                        r"argument 'labels'; it takes pixel_values, "):
        model(PIXELS, labels=LABELS)


@pytest.mark.parametrize("name", [n for n in TRANSFORMERS_KWARGS if not n.startswith("output_")])
def test_transformers_kwargs_are_accepted_and_change_nothing(classifier, name):
    value = torch.tensor(2) if name == "num_items_in_batch" else None
    with torch.no_grad():
        out = classifier(PIXELS, labels=LABELS, **{name: value})
    # the loss stays the mean over the batch whatever transformers passes along
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, LABELS))
    with torch.no_grad():
        torch.testing.assert_close(out.logits, classifier(PIXELS).logits)


def test_output_flags_as_keywords(classifier):
    with torch.no_grad():
        out = classifier(PIXELS, **{"output_hidden_states": True, "output_attentions": True, "return_dict": False})
    logits, hidden_states, attentions, reshaped = out
    assert logits.shape == (2, 4)
    assert [tuple(h.shape) for h in hidden_states] == [(2, 12, 10, 16), (2, 6, 5, 32), (2, 6, 5, 32)]
    # stage 2 (dilation 2, kernel 3) pads its 6x5 map to 6x6; its weights cover the padded map (docs/semantics.md)
    assert [tuple(a.shape) for a in attentions] == [(2, 1, 12, 10, 9), (2, 2, 6, 6, 9)]
    assert len(reshaped) == 3


def test_backbone_as_dense_heads_call_it():
    """UperNet, Depth Anything and DPT call forward_with_filtered_kwargs with the output flags (DPT also hands on
    its caller's TransformersKwargs); OneFormer and Mask2Former call the backbone with pixels only."""
    torch.manual_seed(0)
    backbone = DinatBackbone(small_config()).eval()
    with torch.no_grad():
        plain = backbone(PIXELS)
        filtered = backbone.forward_with_filtered_kwargs(PIXELS, output_hidden_states=False, output_attentions=True,
                                                         num_items_in_batch=None)
    assert filtered.hidden_states is None and len(filtered.attentions) == 2
    for a, b in zip(plain.feature_maps, filtered.feature_maps):
        torch.testing.assert_close(a, b)
    assert [tuple(m.shape) for m in plain.feature_maps] == [(2, 16, 12, 10), (2, 32, 6, 5)]


class _Pixels(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        generator = torch.Generator().manual_seed(i)
        return {"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": i % 4}


def test_trainer_that_passes_num_items_in_batch(tmp_path):
    """A Trainer told the model takes loss keywords passes num_items_in_batch into forward; it must train."""
    torch.manual_seed(0)
    model = DinatForImageClassification(small_config())
    model.accepts_loss_kwargs = True  # as a subclass or another training library might declare
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, report_to=[],
                             save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Pixels())
    assert trainer.model_accepts_loss_kwargs
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
