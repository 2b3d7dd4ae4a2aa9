"""The fine-tuning CLI end to end: `torchrun -m tram_dist finetune` on 2 gloo ranks under ZeRO-3.

Everything is made here, offline: a SentencePiece tokenizer trained on the training text, a
tiny Llama built from a config, local text files (an in-domain and an out-of-domain held-out
set). Run A trains 4 steps with gradient accumulation 2 and checkpoints at step 2; run B starts
from A's step-2 checkpoint (`resume: true` in its own output_dir) and must end where A ended.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import yaml

from launcher import WORLD, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_DOMAIN = "the movie was good bad great awful plot actor scene film love hate boring fun story".split()
OUT_OF_DOMAIN = "the phone was good bad great awful battery screen price fast slow love hate".split()


def sentences(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) for _ in range(n)]


def make_model_dir(tmp_path) -> str:
    """A tiny Llama and a SentencePiece tokenizer trained offline on the training text."""
    import sentencepiece as spm
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(IN_DOMAIN + OUT_OF_DOMAIN, 400, 0)))
    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(sp_dir / "tokenizer"), vocab_size=64,
                                   hard_vocab_limit=False, model_type="unigram", unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=3, minloglevel=2)
    tokenizer = AutoTokenizer.from_pretrained(str(sp_dir), local_files_only=True)  # reads tokenizer.model
    assert len(tokenizer) > 20 and tokenizer("the movie was good")["input_ids"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2))
    model_dir = tmp_path / "tiny-llama"
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    return str(model_dir)


def write_config(tmp_path, model_dir: str) -> str:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("\n".join(sentences(IN_DOMAIN, 32, 1)))
    (data / "in_domain.txt").write_text("\n".join(sentences(IN_DOMAIN, 8, 2)))
    with open(data / "out_of_domain.jsonl", "w") as f:
        f.writelines(json.dumps({"text": s}) + "\n" for s in sentences(OUT_OF_DOMAIN, 8, 3))
    ds_config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                       "stage3_gather_16bit_weights_on_model_save": True},
                 "zero_allow_untested_optimizer": True, "bf16": {"enabled": "auto"}}
    (tmp_path / "zero3.json").write_text(json.dumps(ds_config))
    cfg = {
        "task": "causal_lm", "model": model_dir, "deepspeed": "zero3.json",
        "data": {"train": "data/train.txt", "max_length": 32,
                 "eval": {"in_domain": "data/in_domain.txt", "out_of_domain": "data/out_of_domain.jsonl"}},
        "tram": {"target": "noised_input", "sigma": 0.1, "scale": 100.0, "rho_max": 1.0},
        "training": {"output_dir": "run_a", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                     "max_steps": 4, "learning_rate": 1e-3, "lr_scheduler_type": "linear", "optim": "adamw_torch",
                     "logging_steps": 1, "save_strategy": "steps", "save_steps": 2, "eval_strategy": "no",
                     "seed": 0, "dataloader_num_workers": 0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def finetune(config: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "tram_dist", "finetune", config, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def final_weights(output_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(output_dir, "model.safetensors"))


def test_finetune_tiny_llama_zero3_then_resume(tmp_path):
    config = write_config(tmp_path, make_model_dir(tmp_path))
    run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
    run_a.mkdir()
    (run_a / "metrics.jsonl").write_text(json.dumps({"step": 9, "loss": 1.0}) + "\n")  # an older run's
    proc = finetune(config)

    logs = read_jsonl(run_a / "metrics.jsonl")
    train_logs = [entry for entry in logs if "loss" in entry]
    assert [e["step"] for e in train_logs] == [1, 2, 3, 4]
    assert all(e["tram/d"] > 0 and e["tram/e_norm"] > 0 and "tram/loss_perturbed" in e for e in train_logs)
    assert os.listdir(run_a / "tensorboard"), "no TensorBoard event file"
    for step in (2, 4):
        assert {"tram_rank0.pt", "tram_rank1.pt"} <= set(os.listdir(run_a / f"checkpoint-{step}"))
    results = json.loads((run_a / "eval_results.json").read_text())
    assert set(results) == {"in_domain", "out_of_domain"}
    assert all(r["loss"] > 0 and r["perplexity"] > 1 for r in results.values())
    assert "| in_domain |" in proc.stdout and "| out_of_domain |" in proc.stdout  # rank 0's table

    # B: A's step-2 checkpoint in its own output_dir, `resume: true` picks it up.
    # The resumed run appends to the lines its first part wrote up to the checkpoint.
    run_b.mkdir()
    shutil.copytree(run_a / "checkpoint-2", run_b / "checkpoint-2")
    (run_b / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in train_logs[:2]))
    finetune(config, "training.output_dir=run_b", "resume=true")
    resumed = [e for e in read_jsonl(run_b / "metrics.jsonl") if "loss" in e]
    assert [e["step"] for e in resumed] == [1, 2, 3, 4]
    for a, b in zip(train_logs[2:], resumed[2:]):
        assert b["tram/d"] == pytest.approx(a["tram/d"], rel=1e-6, abs=1e-12)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    weights_a, weights_b = final_weights(run_a), final_weights(run_b)
    assert weights_a.keys() == weights_b.keys()
    assert max(float((weights_a[k] - weights_b[k]).abs().max()) for k in weights_a) <= 1e-6
    results_b = json.loads((run_b / "eval_results.json").read_text())
    for name in results:
        assert results_b[name]["loss"] == pytest.approx(results[name]["loss"], rel=1e-6)


def test_finetune_lora_causal_lm_one_process(tmp_path):
    """docs/trainer-and-cli.md's LoRA config: only the adapters train, and e > 0 from the first TRAM step (SAM geometry)."""
    from safetensors.torch import load_file

    config = write_config(tmp_path, make_model_dir(tmp_path))
    lora = "lora={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj], lora_dropout: 0.0}"
    tram = "tram={geometry: sam, target: previous, scale: 30.0, rho_max: 0.5, radius_at_start: 0.05}"
    cmd = [sys.executable, "-m", "tram_dist", "finetune", config, lora, tram, "deepspeed=null", "training.max_steps=2",
           "training.save_strategy=no", "training.output_dir=run_lora", "data.eval={}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-6000:]
    logs = [e for e in read_jsonl(tmp_path / "run_lora" / "metrics.jsonl") if "loss" in e]
    assert [e["step"] for e in logs] == [1, 2]
    assert logs[0]["tram/e_norm"] == pytest.approx(0.05, rel=1e-6) and logs[1]["tram/e_norm"] > 0
    adapters = load_file(str(tmp_path / "run_lora" / "adapter_model.safetensors"))  # the adapters alone
    assert adapters and all("lora_" in k for k in adapters)
    assert max(float(v.abs().max()) for k, v in adapters.items() if "lora_B" in k) > 0  # B trained from zero


def test_yaml_no_is_the_no_strategy(tmp_path):
    """YAML 1.1 reads `no` as false: `save_strategy: no` (file or override) means the "no" strategy."""
    from tram_dist.cli import load_config

    (tmp_path / "model").mkdir()
    config = write_config(tmp_path, str(tmp_path / "model"))
    with open(config) as f:
        text = f.read()
    assert "save_strategy: steps" in text
    with open(config, "w") as f:
        f.write(text.replace("save_strategy: steps", "save_strategy: no"))
    assert load_config(config)["training"]["save_strategy"] == "no"
    assert load_config(config, ["training.eval_strategy=no"])["training"]["eval_strategy"] == "no"


@pytest.mark.parametrize("override,message", [
    ("lora={rank: 4}", r"lora: .*rank"),
    ("task=regression", r"task must be one of \['sequence_classification', 'causal_lm'\], got 'regression'"),
    ("tram.geometry=adam", r"TRAMConfig\.geometry must be one of"),
    ("data.train=missing.txt", r"data\.train: file .*missing\.txt' does not exist"),
    ("optimizer=sgd", r"unknown config key\(s\) \['optimizer'\]"),
    ("tram.max_grad_norm=1.0", r"tram\.max_grad_norm: set training\.max_grad_norm"),
    ("training.warmup_ratio=0.1", r"unknown training key\(s\) \['warmup_ratio'\]: training takes TrainingArguments"),
])
def test_bad_config_fails_before_any_process_group(tmp_path, override, message):
    """Exit 2 with the setting named, from config checks alone (no model, no process group)."""
    import re

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    config = write_config(tmp_path, str(model_dir))
    proc = subprocess.run([sys.executable, "-m", "tram_dist", "finetune", config, override],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert re.search(message, proc.stderr), proc.stderr


def _classification_config(tmp_path, train_labels, eval_labels=None):
    (tmp_path / "model").mkdir(exist_ok=True)
    for name, labels in (("train", train_labels), ("tweets", eval_labels)):
        if labels is not None:
            with open(tmp_path / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps({"text": f"sentence {i}", "label": label}) + "\n" for i, label in enumerate(labels))
    cfg = {"task": "sequence_classification", "model": "model", "data": {"train": "train.jsonl"},
           "training": {"output_dir": "run"}}
    if eval_labels is not None:
        cfg["data"]["eval"] = {"tweets": "tweets.jsonl"}
    path = tmp_path / "cls.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("train,evals,message", [
    ([0, 1, None], None, r"data\.train \(train\.jsonl\) row 2: 'label' is null; every row needs a class label"),
    ([0, 1, -1], None, r"data\.train \(train\.jsonl\) row 2: 'label' is -1; integer labels must be 0\.\.K-1"),
    ([0, 0.5], None, r"data\.train \(train\.jsonl\) row 1: 'label' is 0\.5; a class label is an integer 0\.\.K-1 or a name"),
    (["neg", "pos"], ["pos", "neutral"], r"data\.eval\.tweets \(tweets\.jsonl\) row 1: label 'neutral' is not one of "
                                         r"training's classes \['neg', 'pos'\]"),
    ([0, 1], [1, 2], r"data\.eval\.tweets \(tweets\.jsonl\) row 1: label 2 is not one of training's classes 0\.\.1"),
])
def test_bad_labels_exit_2_naming_file_and_row_before_training(tmp_path, capsys, train, evals, message):
    """Label faults in the data files are found by the config checks, before any model or process
    group: null, negative, fractional, and an evaluation label training never saw."""
    import re

    from tram_dist.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", _classification_config(tmp_path, train, evals)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_integer_labels_written_as_floats_or_strings_are_one_class(tmp_path):
    """1, 1.0 and "1" (as a CSV gives it) are the same class 1, not three."""
    from tram_dist.cli import label_classes, label_id

    rows = [{"label": v} for v in (0, 1, 1.0, "1", "0")]
    classes = label_classes(rows, "label", "data.train")
    assert classes.count == 2 and classes.names is None
    assert [label_id(r, "label", classes, "row") for r in rows] == [0, 1, 1, 1, 0]
