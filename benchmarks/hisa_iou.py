"""Mean IoU of HISA's candidate set with flat TokenSelect's on SmolLM2's real decode queries.

Records the scoring query and the cached (pre-RoPE) keys of every layer at each decode-step miss
of flat TokenSelect (k=256, 2,000-token prompt, 3 new tokens, theta=1: every step a miss), then
compares HISA's choice for the same inputs (tokaccel.policies.hisa.selection_iou).
Run: python benchmarks/hisa_iou.py  (about 20 s on one CPU thread).
"""
import torch

import tokaccel
from tokaccel import models
from tokaccel.policies import HISA, TokenSelect
from tokaccel.policies.hisa import selection_iou


def main():
    torch.set_num_threads(1)
    model, tok = models.load("smollm2-135m-instruct")
    text = " ".join(f"Line {i}: the colour of box {i} is {['red','blue','green','amber'][i % 4]}." for i in range(150))
    ids = tok(text + " The colour of box 77 is", return_tensors="pt").input_ids[:, :2000]
    print("context", ids.shape[1])
    records = []
    orig = TokenSelect.choose
    def recording(self, call, q, start, end, valid, query_valid=None, orig=orig, records=records):
        if q.dim() == 3 and call.layer is not None:
            records.append((call.ctx.info.layer_idx, q.clone(), call.key.clone()))
        return orig(self, call, q, start, end, valid, query_valid)
    TokenSelect.choose = recording
    flat = TokenSelect(k=256, n_init=32, n_local=128, theta=1.0)
    try:
        with torch.no_grad(), tokaccel.patched(model, flat):
            model.generate(ids, max_new_tokens=3, do_sample=False)
    finally:
        TokenSelect.choose = orig
    print("decode misses recorded", len(records))
    for block, m, score in [(64, 32, "mean"), (64, 8, "mean"), (64, 8, "bound"), (64, 16, "mean"), (64, 16, "bound"), (32, 16, "mean")]:
        hisa = HISA(k=256, n_init=32, n_local=128, block=block, m=m, block_score=score)
        ious = torch.stack([selection_iou(hisa, flat, q, k)[0] for _, q, k in records])
        print(f"block={block} m={m} ({m*block} of ~{ids.shape[1]} tokens) {score}: mean IoU {ious.mean():.3f} min {ious.min():.3f}")


if __name__ == "__main__":
    main()
