"""TEMPORARY until kernels/eviction.py lands: torch column sums + decode probs."""
import torch


def attention_column_sums(q, k, scale, *, causal=True, key_valid=None, query_valid=None, query_weight=None, lse=None, tile=256):
    B, H, S, D = q.shape
    Hk, N = k.shape[1], k.shape[2]
    G = H // Hk
    out = torch.zeros(B, Hk, N, dtype=torch.float32, device=q.device)
    kf = k.float()
    for a in range(0, S, tile):
        b = min(S, a + tile)
        qt = q[:, :, a:b].float().reshape(B, Hk, G, b - a, D)
        s = torch.einsum("bkgid,bknd->bkgin", qt, kf) * scale
        allowed = torch.ones(b - a, N, dtype=torch.bool, device=q.device)
        if causal:
            allowed = allowed.tril(N - S + a)
        if key_valid is not None:
            allowed = allowed & key_valid[:, :, None, None, :]
        s = s.masked_fill(~allowed, float("-inf"))
        l = torch.logsumexp(s, -1, keepdim=True)
        p = torch.exp(s - l).nan_to_num(0.0)
        w = torch.ones(B, b - a, device=q.device)
        if query_valid is not None:
            w = w * query_valid[:, a:b].float()
        if query_weight is not None:
            w = w * query_weight[:, a:b]
        out += torch.einsum("bkgin,bi->bkn", p, w) / G
    return out


def decode_attention_probs(q, k, v, scale, key_valid=None):
    B, H, D = q.shape
    Hk = k.shape[1]
    G = H // Hk
    s = torch.einsum("bkgd,bknd->bkgn", q.float().reshape(B, Hk, G, D), k.float()) * scale
    if key_valid is not None:
        s = s.masked_fill(~key_valid[:, :, None], float("-inf"))
    p = s.softmax(-1)
    out = torch.einsum("bkgn,bknd->bkgd", p, v.float()).reshape(B, H, D).to(q.dtype)
    return out, p.mean(2)
