"""Validation NLL of a trained translation model in eval() and train() mode, and with dropout switched on in one
kind of module at a time: a model whose eval-mode NLL is far above its train-mode one depends on training-mode
behaviour, and the per-kind figures say which dropout it depends on. Also prints, per FFN block, the RMS of its
input and output in eval mode and the fraction of its hidden units that are active.

    python scripts/eval_vs_train_nll.py CHECKPOINT DATA_DIR
    python scripts/eval_vs_train_nll.py STUDY_DIR DATA_DIR BUDGET ROW
    e.g. python scripts/eval_vs_train_nll.py runs/m30k-full data/multi30k full tucker-all
"""

import json
import sys

import torch
from torch import nn

from compressed_transformer.data.batching import collate
from compressed_transformer.data.parallel import load_dataset
from compressed_transformer.data.tokenizer import Tokenizer
from compressed_transformer.models.transformer import FeedForward, MultiHeadAttention
from compressed_transformer.studies.translation import StudyConfig, load_row_model
from compressed_transformer.train.checkpoint import load_checkpoint, load_model

dev = "cuda" if torch.cuda.is_available() else "cpu"
if len(sys.argv) == 3:
    state = load_checkpoint(sys.argv[1])
    model, tok = load_model(state), Tokenizer(state["tokenizer"])
    data = sys.argv[2]
else:  # see the docstring
    out, data, budget, row = sys.argv[1:5]
    model, tok = load_row_model(StudyConfig("multi30k", out, data, budget), row)
model = model.to(dev)
valid = load_dataset("multi30k", data, "valid")
pairs = list(zip(tok.encode_batch(valid.src[:400]), tok.encode_batch(valid.tgt[:400]), strict=True))
c = model.config

# Modules whose training-mode behaviour is dropout, by kind.
ffn_dropouts = [m.dropout for m in model.modules() if isinstance(m, FeedForward)]
attention = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
kinds = {
    "ffn-hidden": ffn_dropouts,
    "attention": attention,
    "residual+embedding": [
        m for m in model.modules() if isinstance(m, nn.Dropout) and not any(m is f for f in ffn_dropouts)
    ],
}


def nll(train: list[nn.Module] | None, autocast: bool = False) -> float:
    """Mean NLL per target token; ``train``: modules put in train mode (None: the whole model)."""
    model.train(train is None)
    for module in train or []:
        module.train()
    total = n = 0
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
        for s in range(0, len(pairs), 50):
            b = collate(pairs[s : s + 50], c.pad_id, c.bos_id, c.eos_id).to(dev)
            logits = model(b.src, b.tgt_in).float()
            total += float(
                nn.functional.cross_entropy(
                    logits.flatten(0, 1), b.tgt_out.flatten(), ignore_index=c.pad_id, reduction="sum"
                )
            )
            n += int((b.tgt_out != c.pad_id).sum())
    return round(total / n, 4)


def ffn_stats() -> list[dict[str, float]]:
    """Per FFN block in eval mode: RMS of input and output, active fraction of the hidden ReLU units."""
    stats, hooks = [], []
    for name, module in model.named_modules():
        if isinstance(module, FeedForward):

            def hook(mod, args, output, name=name):
                hidden = torch.relu(mod.fc1(args[0]))
                stats.append(
                    {
                        "block": name,
                        "in_rms": round(float(args[0].float().pow(2).mean().sqrt()), 3),
                        "out_rms": round(float(output.float().pow(2).mean().sqrt()), 3),
                        "hidden_active": round(float((hidden > 0).float().mean()), 3),
                    }
                )

            hooks.append(module.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        b = collate(pairs[:50], c.pad_id, c.bos_id, c.eos_id).to(dev)
        model(b.src, b.tgt_in)
    for h in hooks:
        h.remove()
    return stats


torch.manual_seed(0)
result = {"eval-f32": nll([]), "eval-bf16": nll([], True), "train-f32": nll(None), "train-bf16": nll(None, True)}
result.update({f"only-{kind}-dropout": nll(modules) for kind, modules in kinds.items()})
print(json.dumps(result))
for line in ffn_stats():
    print(json.dumps(line))
