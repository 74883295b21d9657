"""Placeholder end-to-end run: classify a random image with a freshly built DiNAT-mini."""
import torch

from dinat import DinatConfig, DinatForImageClassification

config = DinatConfig.from_preset("mini", num_labels=10)
model = DinatForImageClassification(config).eval()
with torch.no_grad():
    logits = model(torch.randn(1, 3, 224, 224)).logits
print("predicted class:", logits.argmax(-1).item())
