"""Activation patching written out as TransformerLens runs it: one full hooked forward pass per patched site. The
oracle the batched sweeps of ll.patching are checked against."""

import torch


def naive_setter(site, act, clean, index, by_pos):
    """TransformerLens' patch setters, written out: which part of the activation a patch replaces."""
    if site == "pattern":
        if by_pos == "dest_src":
            h, dest, src = index
            act[:, h, dest, src] = clean[:, h, dest, src]
        elif by_pos:
            p, h = index
            act[:, h, p, :] = clean[:, h, p, :]
        else:
            act[:, index[0], :, :] = clean[:, index[0], :, :]
    elif site in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
        act[:, index[0], :] = clean[:, index[0], :]
    elif by_pos:
        p, h = index
        act[:, p, h, :] = clean[:, p, h, :]
    else:
        act[:, :, index[0], :] = clean[:, :, index[0], :]


HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "z": "attn.hook_z",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "pattern": "attn.hook_pattern",
}


def naive_sweep(model, corrupted, clean_cache, metric, site, by_pos, attention_mask=None):
    cfg = model.cfg
    pos = corrupted.shape[1]
    heads = cfg.n_kv_heads if site in ("k", "v") else cfg.n_heads
    if by_pos == "dest_src":
        indices = [(h, dest, src) for h in range(heads) for dest in range(pos) for src in range(pos)]
        shape = (cfg.n_layers, heads, pos, pos)
    elif site in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
        indices, shape = [(p,) for p in range(pos)], (cfg.n_layers, pos)
    elif by_pos:
        indices, shape = [(p, h) for p in range(pos) for h in range(heads)], (cfg.n_layers, pos, heads)
    else:
        indices, shape = [(h,) for h in range(heads)], (cfg.n_layers, heads)
    scores = []
    for layer in range(cfg.n_layers):
        name = f"blocks.{layer}.{HOOKS[site]}"
        for index in indices:

            def hook(act, *, hook, index=index, name=name):
                naive_setter(site, act, clean_cache[name], index, by_pos)

            with torch.no_grad():
                logits = model.run_with_hooks(corrupted, attention_mask=attention_mask, fwd_hooks=[(name, hook)])
                scores.append(float(metric(logits)))
    return torch.tensor(scores).view(shape)
