"""Four LoRA adapters trained at once on one frozen MiniLM (issue 30, item 4), against four separate runs.

The task, data, split, model and recipe are those of ``examples/finetune_sms_spam.py`` (SMS Spam Collection,
all-MiniLM-L6-v2 with mean pooling, LoRA on every linear layer of the encoder). Here the encoder's layers hold
four named adapters of different ranks, alphas and learning rates (``LinearWithLoRA.add_adapter``), each with
its own 2-class head. A joint step takes one batch per adapter, each message tagged with its adapter
(``lora_fast.use_adapter_names``: one fused ``lora_linear_multi`` call per layer), and sums the adapters' mean
losses, so each adapter gets the gradient its own run would get; AdamW has one parameter group (learning rate)
per adapter. Then each adapter is trained alone (the same code with one adapter). Prints and writes (``--out``)
the test accuracy of every adapter in both settings and the training time of the joint run and of the four
separate runs.

    python -m examples.multi_adapter_sms_spam [--epochs 3] [--max-examples N] [--out PATH]

Measured (one epoch, CPU reference path): docs/multi-adapter.md and examples/results/multi-adapter-*.json. Adapter d
trains at lr 1e-3; at 2e-3 it diverged in some runs, alone as well as together (docs/multi-adapter.md). On CPU the
layers run lora-fast's reference path; with ``LORA_FAST_MULTI=triton`` on a GPU, the opt-in fused kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

import lora_fast

from .finetune_sms_spam import balanced_split, find_data, load_minilm, read_sms_spam

# (name, rank, alpha, learning rate): the first is each layer's "default" adapter. d's 1e-3: at 2e-3 (rank 32, scale
# 1.0) it diverged late in the epoch in some runs, trained alone or together (docs/multi-adapter.md)
ADAPTERS = (("default", 4, 8.0, 1e-3), ("b", 8, 16.0, 5e-4), ("c", 16, 16.0, 1e-3), ("d", 32, 32.0, 1e-3))


class MultiAdapterClassifier(nn.Module):
    """The frozen encoder with several named adapters in its linear layers, mean pooling and one head per
    adapter. forward(input_ids (batch, seq), attention_mask, names: one adapter name per message) -> logits
    (batch, 2), each message through its own adapter and head."""

    def __init__(self, encoder: nn.Module, adapters, dropout: float = 0.0):
        super().__init__()
        for p in encoder.parameters():
            p.requires_grad = False
        first, rank, alpha, _ = adapters[0]
        lora_fast.replace_linear_with_lora(encoder, rank, alpha, scaling="alpha/rank", dropout=dropout)
        self.layers = [m for m in encoder.modules() if isinstance(m, lora_fast.LinearWithLoRA)]
        for name, rank, alpha, _ in adapters[1:]:
            for layer in self.layers:
                layer.add_adapter(name, rank, alpha, scaling="alpha/rank", dropout=dropout)
        self.encoder = encoder
        self.names = [a[0] for a in adapters]
        self.heads = nn.ModuleDict({name: nn.Linear(encoder.config.hidden_size, 2) for name in self.names})

    def adapter_parameters(self, name: str) -> list:
        return [p for layer in self.layers for p in (layer.adapter(name).A, layer.adapter(name).B)] \
            + list(self.heads[name].parameters())

    def forward(self, input_ids, attention_mask, names) -> torch.Tensor:
        with lora_fast.use_adapter_names(self.encoder, list(names)):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        logits = torch.stack([self.heads[n](pooled) for n in self.names])        # (heads, batch, 2)
        which = torch.tensor([self.names.index(n) for n in names], device=pooled.device)
        return logits[which, torch.arange(len(names), device=pooled.device)]


def _encode(tokenizer, texts, max_length, device):
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


@torch.no_grad()
def accuracy(model, rows, name, tokenizer, max_length, device) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(rows), 64):
        chunk = rows[start:start + 64]
        ids, mask = _encode(tokenizer, [t for t, _ in chunk], max_length, device)
        predicted = model(ids, mask, [name] * len(chunk)).argmax(-1).cpu()
        correct += int((predicted == torch.tensor([y for _, y in chunk])).sum())
    model.train()
    return correct / max(len(rows), 1)


def train(adapters, splits, args, device) -> dict:
    """Train ``adapters`` together (one batch of each per step); returns test accuracies and seconds."""
    torch.manual_seed(args.seed)
    encoder, tokenizer = load_minilm()
    model = MultiAdapterClassifier(encoder, adapters, args.dropout).to(device)
    optimizer = torch.optim.AdamW([{"params": model.adapter_parameters(name), "lr": lr}
                                   for name, _, _, lr in adapters], weight_decay=args.weight_decay)
    train_rows = splits["train"]
    steps = math.ceil(len(train_rows) / args.batch_size)
    model.train()
    seconds = 0.0
    for epoch in range(args.epochs):
        # each adapter its own order of the training split, as its own run would draw it
        orders = {name: torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(args.seed + 97 * i
                                                                                                 + epoch)).tolist()
                  for i, (name, *_) in enumerate(adapters)}
        start = time.perf_counter()
        for step in range(steps):
            texts, labels, names = [], [], []
            for name, *_ in adapters:
                for i in orders[name][step * args.batch_size:(step + 1) * args.batch_size]:
                    texts.append(train_rows[i][0])
                    labels.append(train_rows[i][1])
                    names.append(name)
            ids, mask = _encode(tokenizer, texts, args.max_length, device)
            logits = model(ids, mask, names)
            labels_t = torch.tensor(labels, device=device)
            # the sum of each adapter's mean loss over its own messages: its gradient as in its own run
            loss = sum(nn.functional.cross_entropy(logits[[j for j, n in enumerate(names) if n == name]],
                                                   labels_t[[j for j, n in enumerate(names) if n == name]])
                       for name, *_ in adapters)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
    return {"seconds": seconds,
            "test_accuracy": {name: accuracy(model, splits["test"], name, tokenizer, args.max_length, device)
                              for name, *_ in adapters}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="the SMS Spam Collection file (see finetune_sms_spam)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="messages per adapter per step")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-examples", type=int, default=None, help="keep the first N of each split (smoke)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    splits = balanced_split(read_sms_spam(find_data(args.data)))
    if args.max_examples:
        splits = {name: rows[:args.max_examples] for name, rows in splits.items()}
    joint = train(ADAPTERS, splits, args, device)
    separate = {}
    for name, rank, alpha, lr in ADAPTERS:
        alone = train((("default", rank, alpha, lr),), splits, args, device)
        separate[name] = {"seconds": alone["seconds"], "test_accuracy": alone["test_accuracy"]["default"]}
    result = {"adapters": [dict(zip(("name", "rank", "alpha", "lr"), a)) for a in ADAPTERS],
              "config": vars(args), "device": str(device), "joint": joint, "separate": separate,
              "separate_seconds": sum(s["seconds"] for s in separate.values())}
    for name, *_ in ADAPTERS:
        print(f"adapter {name}: test accuracy {100 * joint['test_accuracy'][name]:.2f}% joint, "
              f"{100 * separate[name]['test_accuracy']:.2f}% alone")
    print(f"training time: {joint['seconds']:.1f} s joint, {result['separate_seconds']:.1f} s in four separate runs")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
