"""Validation NLL of a study row in eval() and train() mode, float32 and bf16 autocast: a model whose eval-mode
NLL is far above its train-mode one depends on training-mode behaviour (dropout).

    python scripts/eval_vs_train_nll.py STUDY_DIR DATA_DIR BUDGET ROW
    e.g. python scripts/eval_vs_train_nll.py runs/m30k-full data/multi30k full tucker-all
"""

import sys

import torch
from torch import nn

from compressed_transformer.data.batching import collate
from compressed_transformer.data.parallel import load_dataset
from compressed_transformer.studies.translation import StudyConfig, load_row_model

out, data, budget, row = sys.argv[1:5]  # see the docstring
dev = "cuda" if torch.cuda.is_available() else "cpu"
study = StudyConfig("multi30k", out, data, budget)
model, tok = load_row_model(study, row)
model = model.to(dev)
valid = load_dataset("multi30k", data, "valid")
pairs = list(zip(tok.encode_batch(valid.src[:400]), tok.encode_batch(valid.tgt[:400]), strict=True))
c = model.config


def nll(train: bool, autocast: bool) -> float:
    model.train(train)
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


torch.manual_seed(0)
print(
    row,
    {
        "eval-f32": nll(False, False),
        "eval-bf16": nll(False, True),
        "train-f32": nll(True, False),
        "train-bf16": nll(True, True),
    },
)
