"""A model whose attention calls torch directly instead of transformers' attention registry:
tokaccel must refuse to patch it. Kept in its own file so its source mentions no registry."""

import torch


class LegacyAttention(torch.nn.Module):
    def __init__(self, layer_idx: int, config):
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        q = k = v = self.proj(x).unsqueeze(1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)


class LegacyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = None
        self.layers = torch.nn.ModuleList([LegacyAttention(i, None) for i in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x
