"""TRAM on one process: a tiny BERT classifier on random tokens.

    python examples/local.py
"""
import torch
from transformers import BertConfig, BertForSequenceClassification

from tram_dist import TRAM, TRAMConfig

STEPS, BATCH, SEQ, VOCAB, CLASSES = 3, 8, 16, 100, 3


def tiny_bert() -> BertForSequenceClassification:
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=CLASSES, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def random_batch(g: torch.Generator, device) -> dict:
    return dict(input_ids=torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(device),
                attention_mask=torch.ones(BATCH, SEQ, dtype=torch.long).to(device),
                labels=torch.randint(0, CLASSES, (BATCH,), generator=g).to(device))


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = tiny_bert().to(device)
    # The radius is scale * KL(p(noised input) || p(input)), clamped at rho_max.
    tram = TRAM(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                TRAMConfig(target="noised_input", sigma=0.1, scale=100.0, rho_max=1.0))
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        m = tram.step(random_batch(g, device))  # pass 1 + target forward, ascent, pass 2, update
        print(f"step {step} d={m['d']:.4g} grad_norm={m['grad_norm']:.4g} "
              f"e_norm={m['e_norm']:.4g} loss={m['loss']:.4f}")


if __name__ == "__main__":
    main()
