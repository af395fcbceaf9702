"""Shared sequence helpers for the objectives: padding, per-token log-probabilities, sampling.

Training batches are right-padded (positions then start at 0 for every row); only generation uses
the tokenizer's left padding, which `generate` handles itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


def pad_right(seqs: list[list[int]], pad_id: int, masks: list[list[int]] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> (input_ids, attention_mask, loss_mask); loss_mask defaults to all real tokens."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        loss[i, : len(s)] = torch.tensor(masks[i] if masks else [1] * len(s), dtype=torch.long)
    return ids, attn, loss


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                   temperature: float = 1.0, chunk_rows: int = 4, first_target: int = 1) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t = first_target..T-1 under softmax(logits / temperature), shape
    [B, T - first_target] (fp32); with the default, every token after the first.

    The temperature must be the one the tokens were sampled at, or PPO/GRPO ratios and KLs are off.
    `first_target` > 1 scores only the tail (RL scores completions, not prompts): the model then
    projects only the kept positions onto the vocabulary (`logits_to_keep`), which on a small model is
    most of a step's matmuls. A selective log-softmax: the chosen token's logit minus the row's
    logsumexp, a few rows at a time, so no fp32 copy of the [B, T, vocab] distribution ever exists
    (about 6 GB per copy at 124M).
    """
    if not 1 <= first_target < input_ids.shape[1]:
        raise ValueError(f"first_target={first_target} must be in [1, {input_ids.shape[1]})")
    kwargs = {"logits_to_keep": input_ids.shape[1] - first_target + 1} if first_target > 1 else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits[:, :-1]
    targets = input_ids[:, first_target:]
    scale = 1.0 / temperature if temperature > 0 else 1.0  # greedy (T=0) samples are scored at T=1
    out = []
    # split, not slices: each slice's backward writes a zero-filled gradient of the whole logits tensor
    # (quadratic in the rows: 9-15 s vs 1-1.5 s for 128 rows x 45 tokens x 4,096 vocabulary).
    for rows, chosen in zip(logits.split(chunk_rows), targets.split(chunk_rows), strict=True):
        if torch.is_grad_enabled() and rows.requires_grad:
            # Recomputed in backward, so the fp32 chunk is not kept alive for logsumexp's gradient.
            out.append(checkpoint(_chosen_logprobs, rows, chosen, scale, use_reentrant=False))
        else:
            out.append(_chosen_logprobs(rows, chosen, scale))
    return torch.cat(out)


def _chosen_logprobs(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    rows = logits.float() * scale
    return torch.gather(rows, 2, targets[:, :, None]).squeeze(-1) - torch.logsumexp(rows, dim=-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


@dataclass
class Samples:
    prompts: list[list[int]]  # token ids per sample (each prompt repeated `n` times, in order)
    completions: list[list[int]]  # sampled tokens, cut after the first stop token
    texts: list[str]  # decoded completions


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, n: int = 1, max_new_tokens: int = 32,
           temperature: float = 1.0, seed: int = 0) -> Samples:
    """`n` completions per prompt (greedy when temperature == 0), deterministic given the seed."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None, top_k=None, top_p=None,
        num_return_sequences=n, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    stops = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
                else [model.generation_config.eos_token_id])
    width = enc["input_ids"].shape[1]
    prompt_ids = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    completions, texts, expanded = [], [], []
    for i, row in enumerate(out[:, width:].tolist()):
        cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
        completions.append(row[:cut])
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
        expanded.append(prompt_ids[i // n])
    return Samples(prompts=expanded, completions=completions, texts=texts)
