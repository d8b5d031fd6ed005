"""Metrics of a model (with whatever adapters or compositions are attached) on a set of examples.

- ``exact_match``: greedy generation, stripped, equals the stripped completion;
- ``token_accuracy``: teacher-forced argmax equals the completion token (EOS included);
- ``loss`` / ``perplexity``: mean cross-entropy over completion tokens.
Every composition is scored through the same forward, so single adapters, sums, stacks and mixtures compare fairly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from hub.data import Example, collate, encode_all
from hub.errors import InvalidArtifact


@dataclass(frozen=True)
class EvalResult:
    exact_match: float
    token_accuracy: float
    loss: float
    perplexity: float
    count: int

    def as_metrics(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "count"}


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    generate: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> EvalResult:
    """Score ``model`` (any causal LM, with whatever is attached) on ``examples``: exact match (when
    ``generate``), token accuracy, loss and perplexity over the completion tokens.

    ``device``: move the model there first (None: evaluate where it is; batches go to its input embeddings'
    device, so ``device_map`` placements work). Raises InvalidArtifact (no examples), Incompatible (a model that
    cannot move to ``device``).
    """
    from hub.runtime import place
    if not examples:
        raise InvalidArtifact("no examples to evaluate on")
    was_training = model.training
    model.eval()
    encoded, pad = encode_all(model, tokenizer, examples)
    device = place(model, device)
    total_loss = correct_tokens = scored_tokens = exact = 0.0
    bar = tqdm(total=len(examples), desc="evaluate", unit="ex", disable=not progress, leave=False)
    try:
        for start in range(0, len(examples), batch_size):
            batch = encoded[start:start + batch_size]
            ids, labels, mask = (t.to(device) for t in collate(batch, pad_id=pad))
            # A soft prompt (prompt tuning) puts its virtual tokens in front: keep the positions of the real ones.
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:-1].float()
            targets = labels[:, 1:]
            scored = targets != -100
            total_loss += torch.nn.functional.cross_entropy(
                logits[scored], targets[scored], reduction="sum").item()
            correct_tokens += (logits.argmax(-1)[scored] == targets[scored]).sum().item()
            scored_tokens += scored.sum().item()
            if generate:
                exact += _exact_matches(model, tokenizer, batch, examples[start:start + batch_size], pad, device)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    loss = total_loss / max(scored_tokens, 1)
    return EvalResult(exact_match=exact / len(examples) if generate else float("nan"),
                      token_accuracy=correct_tokens / max(scored_tokens, 1), loss=loss,
                      perplexity=math.exp(min(loss, 50.0)), count=len(examples))


def _exact_matches(model: Any, tokenizer: Any, batch: Sequence[Any], examples: Sequence[Example], pad: int,
                   device: torch.device) -> int:
    """Greedy-generate every prompt of the batch at once (left padding) and count exact answers."""
    prompts = [e.input_ids[:e.prompt_length] for e in batch]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    new_tokens = max(len(e.input_ids) - e.prompt_length for e in batch) + 2
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    answers = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return sum(answer.strip() == ex.completion.strip() for answer, ex in zip(answers, examples, strict=True))
