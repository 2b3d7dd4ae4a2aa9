"""LLM shapes on one process: the chunked divergence, the LM-head tap, host reads and peak memory.

Memory is the allocator's view on CPU (torch.profiler's memory events: bytes allocated minus
bytes freed, in order), so a figure is exact and repeatable, not an RSS reading. The unit is L,
one fp32 logits tensor of the micro-batch (B x T x V x 4 bytes).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from allocator import Allocations
from host_reads import HostReads
from tram_dist import TRAM, TRAMConfig, divergence
from tram_dist.forward import causal_lm_forward

VOCAB = 151_936


def _kl64(current, target, direction, mask=None):
    """Unchunked float64 KL per position, written out from the definition."""
    p_c, p_t = F.softmax(current.double(), -1), F.softmax(target.double(), -1)
    fwd = (p_t * (p_t.log() - p_c.log())).sum(-1)
    rev = (p_c * (p_c.log() - p_t.log())).sum(-1)
    kl = {"forward": fwd, "reverse": rev, "symmetric": (fwd + rev) / 2}[direction]
    return kl[mask].sum() if mask is not None else kl.sum()


@pytest.mark.parametrize("direction", ["forward", "reverse", "symmetric"])
def test_chunked_kl_equals_unchunked_float64_at_152k_vocabulary(direction, monkeypatch):
    g = torch.Generator().manual_seed(0)
    current = torch.randn(2, 24, VOCAB, generator=g) * 2
    target = current + 0.05 * torch.randn(current.shape, generator=g)  # near-identical, as TRAM's are
    mask = torch.rand(2, 24, generator=g) > 0.3
    want = _kl64(current, target, direction, mask)
    # The CPU's own cap (one position per chunk here), then none: chunks as a GPU takes them.
    for cpu_chunk in (divergence.CPU_CHUNK, 1 << 40):
        monkeypatch.setattr(divergence, "CPU_CHUNK", cpu_chunk)
        for chunk in (VOCAB * 5, 1 << 21, 1):  # 5 positions, 13 positions, 1 position per chunk
            got, count = divergence.kl_sum_count(current, target, direction, mask, chunk=chunk)
            assert got.dtype == torch.float64 and count.item() == mask.sum().item()
            assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item()), (chunk, got.item(), want.item())


def tiny_lm(vocab=512, layers=2, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64, num_hidden_layers=layers, tie_word_embeddings=True,
                                        max_position_embeddings=64, attention_dropout=0.0))


def lm_batch(vocab=512, seq=40, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that does not count
    attention = torch.ones_like(ids)
    attention[1, -7:] = 0  # right padding
    labels[1, -7:] = -100
    return dict(input_ids=ids, labels=labels, attention_mask=attention)


TARGETS = {
    "noised_input": dict(target="noised_input", sigma=0.5, scale=100.0, rho_max=1.0),
    "previous": dict(target="previous", scale=100.0, rho_max=1.0, radius_at_start=0.1),
    "ema": dict(target="ema", scale=100.0, ema_decay=0.5, divergence="symmetric"),
}


def _train(settings, head_chunks, steps=3, model=None, kl_chunk=1 << 21):
    model = model or tiny_lm()
    # SGD: AdamW would turn rounding noise in gradients that are zero in exact arithmetic (k_proj's
    # bias: softmax ignores it) into lr-sized steps, and the comparison would measure that noise.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tram = TRAM(model, opt, TRAMConfig(**settings, head_chunks=head_chunks, kl_chunk=kl_chunk),
                forward_fn=causal_lm_forward)
    metrics = [tram.step(lm_batch(seed=s)) for s in range(steps)]
    return model, tram, metrics


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_head_tap_measures_the_same_kl_as_full_target_logits(target):
    """The target's logits a few positions at a time through the LM head (kl_chunk small: blocks
    of 3 positions, many per row) give the KL, d and weights of the full-logits path. (Not to the
    bit: the head's float32 matmul over a block of rows rounds its logits apart by ~1e-7.)"""
    full, _, m_full = _train(TARGETS[target], head_chunks=False)
    tapped, tram, m_tap = _train(TARGETS[target], head_chunks=True, kl_chunk=100)
    assert tram.tap is not None and tram.tap.verified and not tram.tap.disabled
    for a, b in zip(m_full, m_tap):
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-6) and b["d"] == pytest.approx(a["d"], rel=1e-6)
    assert m_tap[-1]["kl"] > 0
    for (name, p), q in zip(full.named_parameters(), tapped.parameters()):
        assert (p - q).abs().max().item() <= 1e-6, name


def test_head_tap_turns_itself_off_for_a_model_that_changes_its_logits():
    """Soft-capped logits (as Gemma-2 makes them) are not the head's output: the first step warns,
    takes the full target logits, and its KL is the full path's."""
    from transformers.modeling_outputs import CausalLMOutput

    class SoftCapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = tiny_lm()

        def get_input_embeddings(self):
            return self.lm.get_input_embeddings()

        def get_output_embeddings(self):
            return self.lm.get_output_embeddings()

        def forward(self, **batch):
            out = self.lm(**{k: v for k, v in batch.items() if k != "labels"})
            logits = torch.tanh(out.logits / 3.0) * 3.0
            labels = batch.get("labels")
            loss = None if labels is None else F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            return CausalLMOutput(loss=loss, logits=logits)

    settings = TARGETS["noised_input"]
    _, _, m_full = _train(settings, head_chunks=False, model=SoftCapped())
    with pytest.warns(UserWarning, match="changes its output layer's logits"):
        _, tram, m_tap = _train(settings, head_chunks=True, model=SoftCapped())
    assert tram.tap.disabled
    # The first step's failed tap drew one noise sample more; from step 2 on the streams differ,
    # so compare the first step only (its KL is taken from the full logits, drawn a second time).
    assert m_tap[0]["kl"] > 0 and m_full[0]["kl"] > 0


@pytest.mark.parametrize("target", ["noised_input", "previous", None, "fisher"])
def test_a_step_reads_the_host_once(target):
    """Losses, KL sums and counts stay on the device: a TRAM step reads one packed vector back.
    (SGD without momentum: the base optimizer reads nothing itself.)"""
    settings = {None: dict(geometry="sam", target=None),
                "fisher": dict(geometry="fisher", target="noised_input", noised_pass=True, scale=10.0)}.get(
        target, TARGETS.get(target))
    model = tiny_lm()
    tram = TRAM(model, torch.optim.SGD(model.parameters(), lr=1e-2), TRAMConfig(**settings),
                forward_fn=causal_lm_forward)
    tram.step(lm_batch(seed=0))
    tram.step(lm_batch(seed=1))  # the first steps have no history / verify the head once
    with HostReads() as reads:
        metrics = tram.step([lm_batch(seed=2), lm_batch(seed=3)])
    assert len(reads.calls) == 1 and reads.calls[0].startswith("tolist at optimizer.py"), reads.calls
    assert torch.is_tensor(metrics["loss_perturbed"]) and float(metrics["loss_perturbed"]) > 0


# Method -> (TRAMConfig, bound on the step's peak over AdamW's, in L). TRAM-Fisher keeps pass 1's
# logits until pass 2 by design (1 L); everything else must stay within a fraction of L.
BOUNDS = {
    "sam": (dict(geometry="sam", target=None), 0.10),
    "tram_x": (TARGETS["noised_input"], 0.25),
    "tram_previous": (TARGETS["previous"], 0.25),
    "tram_fisher": (dict(geometry="fisher", target="noised_input", noised_pass=True, scale=10.0), 1.10),
}


@pytest.mark.parametrize("method", sorted(BOUNDS))
def test_step_peak_memory_over_adamw_in_logits(method):
    """A causal LM whose logits dominate (vocabulary 32,000, hidden 32, 256 tokens: L = 32.8 MB,
    the weights 4.2 MB): the step's allocator peak over an AdamW step's, less TRAM's copy of
    theta (the local backend's one shard-sized copy while theta + e is loaded), in units of L.
    kl_chunk is scaled with L as the default is at the benchmark's shape (2^21 entries against
    L = 311 MB there; 2^16 against 32.8 MB here): the divergence's temporaries (3 x 8 x kl_chunk
    bytes) and the head's block (16 x 4 x kl_chunk) then fit under the pass's own peak."""
    vocab, seq = 32_000, 256
    model = tiny_lm(vocab=vocab, layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    batch = dict(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids))

    def adamw_step():
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    adamw_step()
    settings, bound = BOUNDS[method]
    tram = TRAM(model, opt, TRAMConfig(**settings, kl_chunk=1 << 16), forward_fn=causal_lm_forward)
    tram.step(batch)  # "previous" has history from here on
    with Allocations() as mem:
        mem.mark("adamw")
        adamw_step()
        mem.mark("tram")
        tram.step(batch)
    peaks = mem.peaks()
    base, peak = peaks["adamw"], peaks["tram"]
    logits = seq * vocab * 4
    theta_copy = sum(p.numel() * p.element_size() for p in model.parameters())
    extra = (peak - base - theta_copy) / logits
    assert extra <= bound, f"{method}: peak {peak / 1e6:.1f} MB over AdamW's {base / 1e6:.1f} MB: {extra:.2f} L"
