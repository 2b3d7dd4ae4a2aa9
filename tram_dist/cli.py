"""`tram-dist finetune CONFIG [key=value ...]`: fine-tune a local transformers model with TRAM.

Also `python -m tram_dist finetune ...`; on several processes under any launcher, e.g.
`torchrun --nproc_per_node 8 -m tram_dist finetune run.yaml`. One YAML or JSON file says
everything (docs/trainer-and-cli.md: Fine-tuning CLI); `key=value` arguments override it by dotted path
(`training.max_steps=20 tram.target=previous`). The run is the HF Trainer with TRAMTrainer:
a progress bar on rank 0, metrics in OUTPUT_DIR/metrics.jsonl and OUTPUT_DIR/tensorboard,
evaluation on every held-out set by name, checkpoints it can resume from (`resume: true`).
Nothing is downloaded: the model, tokenizer (SentencePiece included) and data are local files.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
from typing import Any, NoReturn, Optional

TASKS = ("sequence_classification", "causal_lm")
KEYS = {"task", "model", "model_class", "model_kwargs", "tokenizer", "num_labels", "data", "deepspeed", "fsdp",
        "fsdp_config", "lora", "tram", "training", "resume", "save_final"}
DATA_KEYS = {"train", "eval", "text_field", "label_field", "max_length"}
FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".txt")


# -- the config -----------------------------------------------------------------------------------
def load_config(path: str, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a YAML/JSON config, apply dotted key=value overrides (values parsed as YAML), validate."""
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    with open(path) as f:
        cfg = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path!r} must be a mapping of settings, got {type(cfg).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value (e.g. training.max_steps=20)")
        node, *parents = cfg, *key.split(".")[:-1]
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a mapping in the config")
        node[key.split(".")[-1]] = yaml.safe_load(value)
    training = cfg.get("training")
    for key, value in (training.items() if isinstance(training, dict) else ()):
        if key.endswith("_strategy") and value is False:  # YAML 1.1 reads `save_strategy: no` as false
            training[key] = "no"
    validate(cfg, os.path.dirname(os.path.abspath(path)))
    return cfg


def validate(cfg: dict[str, Any], base: str) -> None:
    """Every check that needs no process group: a bad config fails alike on every rank, first."""
    unknown = sorted(set(cfg) - KEYS)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; allowed: {sorted(KEYS)}")
    for key in ("task", "model", "data"):
        if key not in cfg:
            raise ValueError(f"config needs {key!r}")
    if cfg["task"] not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {cfg['task']!r}")
    data = cfg["data"]
    if not isinstance(data, dict) or "train" not in data:
        raise ValueError("data must be a mapping with at least 'train' (a local file)")
    unknown = sorted(set(data) - DATA_KEYS)
    if unknown:
        raise ValueError(f"unknown data key(s) {unknown}; allowed: {sorted(DATA_KEYS)}")
    evals = data.get("eval") or {}
    if not isinstance(evals, dict):
        raise ValueError("data.eval must map a name to a file, e.g. {in_domain: dev.jsonl, tweets: tweets.jsonl}")
    for name, path in [("data.train", data["train"]), *((f"data.eval.{k}", v) for k, v in evals.items())]:
        _check_file(name, _resolve(base, path))
        if cfg["task"] == "sequence_classification" and str(path).endswith(".txt"):
            raise ValueError(f"{name}: a .txt file has no labels; sequence_classification needs .jsonl, .json or .csv")
    if cfg["task"] == "sequence_classification":
        text_field, label_field = data.get("text_field", "text"), data.get("label_field", "label")
        classes = label_classes(read_records(_resolve(base, data["train"]), text_field), label_field,
                                f"data.train ({data['train']})", cfg.get("num_labels"))
        for name, path in evals.items():
            for i, row in enumerate(read_records(_resolve(base, path), text_field)):
                label_id(row, label_field, classes, f"data.eval.{name} ({path}) row {i}")
    if not os.path.isdir(_resolve(base, cfg["model"])):
        raise ValueError(f"model must be a local directory from_pretrained can load, got {cfg['model']!r}")
    model_class = cfg.get("model_class")
    if model_class is not None and (not isinstance(model_class, str) or model_class.count(":") != 1):
        raise ValueError(f"model_class must be 'package.module:ClassName', got {model_class!r}")
    if not isinstance(cfg.get("model_kwargs", {}), dict):
        raise ValueError("model_kwargs must be a mapping passed to from_pretrained, e.g. {num_hidden_layers: 3}")
    lora_config(cfg)  # names a bad LoRA setting
    if cfg.get("deepspeed") and cfg.get("fsdp"):
        raise ValueError("set one of deepspeed or fsdp, not both")
    ds = cfg.get("deepspeed")
    if isinstance(ds, str):
        _check_file("deepspeed", _resolve(base, ds))
    tram = cfg.get("tram", {})
    if tram is not False and tram is not None:
        from .config import TRAMConfig

        if not isinstance(tram, dict):
            raise ValueError("tram must be a mapping of TRAMConfig settings, or false for the base optimizer alone")
        if "max_grad_norm" in tram:
            raise ValueError("tram.max_grad_norm: set training.max_grad_norm (the Trainer clips the descent gradient)")
        TRAMConfig.from_dict(tram)  # names a bad setting
    training = cfg.get("training") or {}
    if "output_dir" not in training:
        raise ValueError("training.output_dir is required (checkpoints, metrics.jsonl, tensorboard)")
    import dataclasses

    from transformers import TrainingArguments

    allowed = {f.name for f in dataclasses.fields(TrainingArguments)} - {"deepspeed", "fsdp", "fsdp_config"}
    unknown = sorted(set(training) - allowed)
    if unknown:
        raise ValueError(f"unknown training key(s) {unknown}: training takes TrainingArguments fields "
                         "(transformers docs); deepspeed and fsdp go at the top level")
    if cfg.get("resume") not in (None, False, True) and not os.path.isdir(_resolve(base, cfg["resume"])):
        raise ValueError(f"resume must be true, false or a checkpoint directory, got {cfg['resume']!r}")


def _resolve(base: str, path: str) -> str:
    """Relative paths in a config are relative to the config file."""
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.join(base, path)


def _check_file(name: str, path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"{name}: file {path!r} does not exist")
    if not path.endswith(FORMATS):
        raise ValueError(f"{name}: {path!r} must end in one of {list(FORMATS)}")


# -- data -------------------------------------------------------------------------------------------
def read_records(path: str, text_field: str) -> list[dict[str, Any]]:
    """Rows of a local .jsonl / .json (a list) / .csv / .tsv file, or lines of a .txt file."""
    if path.endswith(".jsonl"):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    if path.endswith((".csv", ".tsv")):
        with open(path, newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))
    with open(path) as f:
        return [{text_field: line.rstrip("\n")} for line in f if line.strip()]


def tokenize(records, tokenizer, task: str, text_field: str, label_field: str, max_length: int,
             classes: Optional["Classes"] = None, where: str = "data") -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(records):
        if text_field not in row:
            raise ValueError(f"{where} row {i} has no {text_field!r} field (data.text_field); it has {sorted(row)}")
        item = dict(tokenizer(row[text_field], truncation=True, max_length=max_length))
        if task == "sequence_classification":
            item["labels"] = label_id(row, label_field, classes, f"{where} row {i}")
        out.append(item)
    return out


@dataclasses.dataclass
class Classes:
    """A classification task's labels: integer ids 0..count-1 as given (names None), or names
    mapped to ids in sorted order."""
    count: int
    names: Optional[dict[str, int]] = None


def _label_key(value: Any, where: str, label_field: str) -> Any:
    """An int for an integer label (1, 1.0, "1" from a CSV), else the name as a string."""
    if value is None:
        raise ValueError(f"{where}: {label_field!r} is null; every row needs a class label (an integer 0..K-1 or "
                         "a name)")
    if isinstance(value, bool):
        return str(value).lower()  # a YAML/JSON true/false is a name, as in a CSV
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value.strip()
        value = number
    if isinstance(value, (int, float)):
        if not float(value).is_integer():
            raise ValueError(f"{where}: {label_field!r} is {value!r}; a class label is an integer 0..K-1 or a name")
        return int(value)
    raise ValueError(f"{where}: {label_field!r} is a {type(value).__name__}; a class label is an integer or a name")


def label_classes(records, label_field: str, where: str, num_labels: Optional[int] = None) -> Classes:
    """The classes of the training file: integer labels must be 0..K-1 (K = num_labels or the
    largest + 1); names (any label that is not an integer) are mapped in sorted order."""
    keys = []
    for i, row in enumerate(records):
        if label_field not in row:
            raise ValueError(f"{where} row {i} has no {label_field!r} field (data.label_field); it has {sorted(row)}")
        keys.append(_label_key(row[label_field], f"{where} row {i}", label_field))
    if keys and all(isinstance(k, int) for k in keys):
        i = min(range(len(keys)), key=keys.__getitem__)
        if keys[i] < 0:
            raise ValueError(f"{where} row {i}: {label_field!r} is {keys[i]}; integer labels must be 0..K-1 "
                             "(or use names)")
        count = num_labels or max(keys) + 1
        if max(keys) >= count:
            raise ValueError(f"{where}: label {max(keys)} does not fit num_labels={num_labels} (labels are 0..K-1)")
        return Classes(count)
    names = sorted({str(k) for k in keys})
    if num_labels is not None and num_labels != len(names):
        raise ValueError(f"{where}: {len(names)} class names {names[:10]} but num_labels={num_labels}")
    return Classes(len(names), {name: i for i, name in enumerate(names)})


def label_id(row: dict, label_field: str, classes: Classes, where: str) -> int:
    """The id of one row's label, or a ValueError naming the row and the classes training has."""
    if label_field not in row:
        raise ValueError(f"{where} has no {label_field!r} field (data.label_field); it has {sorted(row)}")
    key = _label_key(row[label_field], where, label_field)
    if classes.names is None:
        if not isinstance(key, int) or not 0 <= key < classes.count:
            raise ValueError(f"{where}: label {row[label_field]!r} is not one of training's classes 0..{classes.count - 1}")
        return key
    if str(key) not in classes.names:
        raise ValueError(f"{where}: label {row[label_field]!r} is not one of training's classes "
                         f"{sorted(classes.names)[:10]}")
    return classes.names[str(key)]


def classification_metrics(eval_pred) -> dict[str, float]:
    """Accuracy and balanced accuracy (the mean of per-class recalls: fair on skewed sets)."""
    import numpy as np

    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    predictions = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    recalls = [float((predictions[labels == c] == c).mean()) for c in np.unique(labels)]
    return {"accuracy": float((predictions == labels).mean()), "balanced_accuracy": float(np.mean(recalls))}


# -- the run -----------------------------------------------------------------------------------------
def lora_config(cfg: dict[str, Any]):
    """peft's LoraConfig from the config's `lora` mapping (its fields: r, lora_alpha,
    target_modules, lora_dropout, ...), or None without one."""
    lora = cfg.get("lora")
    if lora is None:
        return None
    if not isinstance(lora, dict):
        raise ValueError("lora must be a mapping of peft LoraConfig fields, e.g. {r: 16, target_modules: [q_proj, v_proj]}")
    try:
        from peft import LoraConfig
    except ImportError:
        raise ValueError("lora: needs peft (pip install peft)") from None
    task_type = "CAUSAL_LM" if cfg["task"] == "causal_lm" else "SEQ_CLS"
    try:
        return LoraConfig(**{"task_type": task_type, **lora})
    except (TypeError, ValueError) as e:
        raise ValueError(f"lora: {e}") from None


def finetune(cfg: dict[str, Any], base: str) -> dict[str, dict[str, float]]:
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorForLanguageModeling, DataCollatorWithPadding, set_seed)
    from transformers.integrations import TensorBoardCallback

    from .hf import TRAMTrainer, TRAMTrainingArguments

    task, data = cfg["task"], cfg["data"]
    training = dict(cfg.get("training") or {})
    training["output_dir"] = _resolve(base, training["output_dir"])
    ds = cfg.get("deepspeed")
    if isinstance(ds, str):
        ds = _resolve(base, ds)
    if ds and not torch.cuda.is_available():
        _cpu_deepspeed_state(training)
    tram = cfg.get("tram", {})
    tram_fields = {"tram": False} if tram is False else {f"tram_{k}": v for k, v in (tram or {}).items()}
    training.setdefault("report_to", [])
    if data.get("eval"):
        training.setdefault("eval_strategy", "epoch")
    args = TRAMTrainingArguments(deepspeed=ds, fsdp=cfg.get("fsdp") or "", fsdp_config=cfg.get("fsdp_config"),
                                 **training, **tram_fields)

    model_dir = _resolve(base, cfg["model"])
    tokenizer_dir = _resolve(base, cfg.get("tokenizer") or cfg["model"])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if tokenizer.pad_token is None:  # Llama-style SentencePiece models ship without one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    text_field, label_field = data.get("text_field", "text"), data.get("label_field", "label")
    max_length = int(data.get("max_length", 128))
    train_rows = read_records(_resolve(base, data["train"]), text_field)
    classes = (label_classes(train_rows, label_field, f"data.train ({data['train']})", cfg.get("num_labels"))
               if task == "sequence_classification" else None)

    def dataset(path: str, where: str):
        return tokenize(read_records(_resolve(base, path), text_field), tokenizer, task, text_field, label_field,
                        max_length, classes, f"{where} ({path})")

    train = dataset(data["train"], "data.train")
    evals = {name: dataset(path, f"data.eval.{name}") for name, path in (data.get("eval") or {}).items()}
    # After TrainingArguments: under ZeRO-3 from_pretrained then loads straight into partitions.
    # Seeded first: a new head (a classifier) is initialised from the global RNG.
    set_seed(args.seed)
    model_kwargs = dict(cfg.get("model_kwargs") or {}, local_files_only=True)
    auto_class = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM
    model_class = _import(cfg["model_class"]) if cfg.get("model_class") else auto_class
    if task == "sequence_classification":
        names = classes.names
        extra = {"id2label": {i: n for n, i in names.items()}, "label2id": names} if names else {}
        model = model_class.from_pretrained(model_dir, num_labels=classes.count, **model_kwargs, **extra)
        collator = DataCollatorWithPadding(tokenizer)
        metrics = classification_metrics
    else:
        model = model_class.from_pretrained(model_dir, **model_kwargs)
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        metrics = None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    lora = lora_config(cfg)
    if lora is not None:  # only the adapters train (and, for classification, the new head)
        from peft import get_peft_model

        model = get_peft_model(model, lora)

    trainer = TRAMTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals or None,
                          data_collator=collator, processing_class=tokenizer, compute_metrics=metrics,
                          callbacks=[_jsonl_callback(os.path.join(args.output_dir, "metrics.jsonl"))])
    if args.process_index == 0:
        from torch.utils.tensorboard import SummaryWriter

        trainer.add_callback(TensorBoardCallback(SummaryWriter(os.path.join(args.output_dir, "tensorboard"))))
    resume = cfg.get("resume")
    trainer.train(resume_from_checkpoint=_resolve(base, resume) if isinstance(resume, str) else (resume or None))
    if cfg.get("save_final", True):
        trainer.save_model()  # the final weights (ZeRO-3: gathered if the config allows it) and tokenizer
    results = {}
    for name, ds_eval in evals.items():
        scores = trainer.evaluate(ds_eval, metric_key_prefix=f"eval_{name}")
        if task == "causal_lm":
            scores[f"eval_{name}_perplexity"] = math.exp(min(scores[f"eval_{name}_loss"], 50.0))
        results[name] = {k.removeprefix(f"eval_{name}_"): v for k, v in scores.items()}
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(_table(results), flush=True)
    return results


def _import(path: str):
    """'package.module:ClassName' -> the class."""
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _cpu_deepspeed_state(training: dict) -> None:
    """CPU only: make accelerate's state on gloo before the Trainer does (it would
    otherwise make every process rank 0 of 1 under DeepSpeed) and skip a ~100 s JIT build of a
    shared-memory op that training never uses. GPU runs never come here."""
    import importlib

    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]
    training["accelerator_config"] = {**training.get("accelerator_config", {}), "use_configured_state": True}


def _table(results: dict[str, dict[str, float]]) -> str:
    keys = [k for k in ("balanced_accuracy", "accuracy", "loss", "perplexity")
            if any(k in r for r in results.values())]
    lines = ["| eval set | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4f}" if k in r else "" for k in keys) + " |")
    return "\n".join(lines)


def _jsonl_callback(path: str):
    """Every log line (training, TRAM's tram/* metrics, evaluation) as one JSON object, rank 0 only.

    A run from step 0 starts the file afresh; a resumed run appends to what its first part wrote."""
    from transformers import TrainerCallback

    class JsonlLogger(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero and state.global_step == 0 and os.path.exists(path):
                os.remove(path)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return JsonlLogger()


def main(argv: Optional[list[str]] = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="tram-dist", description="TRAM fine-tuning of local transformers models")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="fine-tune a model from one YAML/JSON config")
    ft.add_argument("config", help="YAML or JSON config file (docs/trainer-and-cli.md: Fine-tuning CLI)")
    ft.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.max_steps=20")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        parser.error(str(e))  # exit 2 with the message, before any process group exists
    finetune(cfg, os.path.dirname(os.path.abspath(args.config)))
    from .shutdown import exit_run

    exit_run(0)  # all ranks together, once every file is written (over gloo: no interpreter teardown)


if __name__ == "__main__":
    main()
