"""Unit tests of the rules, the divergence and the config against hand-derived values."""
from __future__ import annotations

import math

import pytest
import torch

from tram_dist import TRAM, TRAMConfig
from tram_dist import divergence, rules


def _e(geometry, thetas, grads, r, eta=0.0, eta_f=0.1, eps=1e-12):
    sums = rules.local_sums(geometry, thetas, grads, eta, eta_f)
    factor = rules.scale_factor(r, float(sums[rules.NORMALISER]), eps)
    return [rules.ascent(geometry, t, g, factor, eta, eta_f) - t for t, g in zip(thetas, grads)], sums


def test_sam_e_has_norm_rho_and_points_along_g():
    g = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    th = [torch.tensor([1.0, 2.0]), torch.tensor([[5.0]])]
    es, sums = _e("sam", th, g, r=0.05)
    # ||g|| = 5, so e = 0.05 * g / 5 = 0.01 * g
    assert torch.allclose(es[0], torch.tensor([0.03, 0.0]), atol=1e-9)
    assert torch.allclose(es[1], torch.tensor([[0.04]]), atol=1e-9)
    assert rules.e_norm(0.05, sums, 1e-12) == pytest.approx(0.05, rel=1e-9)
    assert math.sqrt(float(sums[rules.GRAD_SQ])) == pytest.approx(5.0)


def test_asam_by_hand():
    th, g = [torch.tensor([2.0, -1.0])], [torch.tensor([1.0, 3.0])]
    eta, r = 0.5, 0.1
    es, _ = _e("asam", th, g, r=r, eta=eta)
    t = torch.tensor([2.5, 1.5])  # |theta| + eta
    tg = t * torch.tensor([1.0, 3.0])  # [2.5, 4.5]
    want = r * t * t * torch.tensor([1.0, 3.0]) / math.sqrt(2.5 ** 2 + 4.5 ** 2)
    assert torch.allclose(es[0], want, atol=1e-7)
    assert tg.norm().item() == pytest.approx(math.sqrt(2.5 ** 2 + 4.5 ** 2))


def test_fisher_by_hand():
    g = torch.tensor([1.0, 2.0])
    es, _ = _e("fisher", [torch.zeros(2)], [g], r=0.1, eta_f=0.5)
    f = torch.tensor([1.5, 3.0])  # 1 + 0.5 g^2
    want = 0.1 * (g / f) / math.sqrt(1 / 1.5 + 4 / 3.0)
    assert torch.allclose(es[0], want, atol=1e-7)


def test_missing_or_empty_grad_gives_zero_e():
    th = [torch.tensor([1.0]), torch.zeros(0), torch.tensor([2.0])]
    g = [torch.tensor([2.0]), torch.zeros(0), None]
    es, sums = _e("sam", th, g, r=1.0)
    assert es[0].item() == pytest.approx(1.0) and es[1].numel() == 0 and es[2].item() == 0.0
    assert float(sums[rules.GRAD_SQ]) == 4.0


def test_zero_gradient_is_guarded():
    es, _ = _e("sam", [torch.ones(3)], [torch.zeros(3)], r=0.05)
    assert torch.equal(es[0], torch.zeros(3))


@pytest.mark.parametrize("geometry", ["sam", "asam", "fisher"])
def test_blocked_sums_and_ascent_equal_the_whole_piece_in_float64(monkeypatch, geometry):
    """Pieces of several blocks (and a tail that is no whole row) give the float64 sums of the whole
    piece, and theta + e written in place into theta itself, or into a bf16 target, is the float64
    value (rounded once to bf16)."""
    monkeypatch.setattr(rules, "CPU_BLOCK", 2 * rules._ROW)
    g = torch.Generator().manual_seed(0)
    n = 7 * rules._ROW + 123  # 3.5 blocks, then a partial row
    thetas = [torch.randn(n, generator=g), torch.randn(40, 50, generator=g)]
    grads = [torch.randn(n, generator=g), torch.randn(40, 50, generator=g)]
    eta, eta_f, r = 0.01, 0.3, 0.2
    sums = rules.local_sums(geometry, thetas, grads, eta, eta_f)
    th64, g64 = [t.double().flatten() for t in thetas], [x.double().flatten() for x in grads]
    th, gr = torch.cat(th64), torch.cat(g64)
    if geometry == "sam":
        u, n_sum = gr, (gr ** 2).sum()
    elif geometry == "asam":
        t = th.abs() + eta
        u, n_sum = t * t * gr, ((t * gr) ** 2).sum()
    else:
        f = 1 + eta_f * gr ** 2
        u, n_sum = gr / f, (gr ** 2 / f).sum()
    want = torch.stack((n_sum, (gr ** 2).sum(), (u ** 2).sum()))
    assert torch.allclose(sums, want, rtol=1e-6, atol=0)
    factor = rules.scale_factor(r, float(sums[rules.NORMALISER]), 1e-12)
    new64 = th + factor * u
    in_place = [t.clone() for t in thetas]
    for piece, grad in zip(in_place, grads):
        assert rules.ascent(geometry, piece, grad, factor, eta, eta_f, out=piece) is piece
    assert torch.allclose(torch.cat([t.double().flatten() for t in in_place]), new64, rtol=0, atol=1e-6)
    bf16 = [torch.zeros(t.numel(), dtype=torch.bfloat16) for t in thetas]
    for piece, grad, out in zip(thetas, grads, bf16):
        rules.ascent(geometry, piece, grad, factor, eta, eta_f, out=out)
    assert torch.equal(torch.cat(bf16), torch.cat([v.flatten() for v in in_place]).bfloat16())
    transposed = thetas[1].t()  # not contiguous: one whole block
    out = rules.ascent(geometry, transposed, grads[1].t(), factor, eta, eta_f)
    assert torch.allclose(out.t().double().flatten(), new64[n:], rtol=0, atol=1e-6)


def test_kl_of_known_distributions():
    # p_current = (1/2, 1/2), p_target = (3/4, 1/4)
    cur = torch.log(torch.tensor([[0.5, 0.5]]))
    tgt = torch.log(torch.tensor([[0.75, 0.25]]))
    fwd = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    rev = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    for direction, want in (("forward", fwd), ("reverse", rev), ("symmetric", (fwd + rev) / 2)):
        s, n = divergence.kl_sum_count(cur, tgt, direction)
        assert float(s) == pytest.approx(want, rel=1e-6) and float(n) == 1.0


def test_kl_mean_per_valid_token():
    cur = torch.zeros(1, 3, 2)  # uniform everywhere
    tgt = torch.log(torch.tensor([0.75, 0.25])).expand(1, 3, 2)
    mask = torch.tensor([[True, False, True]])
    s, n = divergence.kl_sum_count(cur, tgt, "forward", mask)
    one = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(n) == 2.0 and float(s) == pytest.approx(2 * one, rel=1e-6)
    assert divergence.radius(float(s), float(n), scale=2.0, rho_max=None) == pytest.approx(2 * one)
    assert divergence.radius(float(s), float(n), scale=2.0, rho_max=0.01) == 0.01
    assert divergence.radius(0.0, 0.0, scale=1.0, rho_max=None) == 0.0


def test_kl_zero_for_identical_logits():
    x = torch.randn(4, 7)
    s, _ = divergence.kl_sum_count(x, x.clone(), "symmetric")
    assert abs(float(s)) < 1e-6


class _Toy(torch.nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(4, 3)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, labels):
        logits = self.head(self.drop(self.embed(input_ids)).mean(1))
        return torch.nn.functional.cross_entropy(logits, labels), logits


def _batch():
    g = torch.Generator().manual_seed(0)
    return dict(input_ids=torch.randint(0, 10, (6, 5), generator=g), labels=torch.randint(0, 3, (6,), generator=g))


def test_sigma_zero_without_dropout_gives_zero_radius_and_inputs_untouched():
    torch.manual_seed(0)
    model = _Toy()
    tram = TRAM(model, torch.optim.SGD(model.parameters(), lr=0.1), TRAMConfig(target="noised_input", sigma=0.0))
    batch = _batch()
    ids = batch["input_ids"].clone()
    m = tram.step(batch)
    assert m["d"] == 0.0 and m["e_norm"] == 0.0
    assert torch.equal(batch["input_ids"], ids)


def test_noise_changes_target_only_inside_the_target_forward():
    torch.manual_seed(0)
    model = _Toy()
    tram = TRAM(model, torch.optim.SGD(model.parameters(), lr=0.0), TRAMConfig(target="noised_input", sigma=0.3))
    batch = _batch()
    before = model(**batch)[1].detach()
    m = tram.step(batch)
    after = model(**batch)[1].detach()
    assert m["d"] > 1e-4  # the noised target differs from the clean output
    assert torch.equal(before, after)  # lr 0: theta restored exactly, and no noise outside


def test_plain_step_leaves_theta_exactly_when_lr_zero():
    torch.manual_seed(0)
    model = _Toy()
    theta = [p.detach().clone() for p in model.parameters()]
    for target in (None, "previous", "initial", "ema"):
        tram = TRAM(model, torch.optim.SGD(model.parameters(), lr=0.0), TRAMConfig(geometry="sam", target=target, rho=0.5))
        for _ in range(2):
            tram.step(_batch())
        assert all(torch.equal(a, b) for a, b in zip(theta, model.parameters())), target


@pytest.mark.parametrize("field,value,allowed", [
    ("geometry", "adam", "sam"), ("target", "prev", "previous"), ("divergence", "js", "symmetric"),
    ("noise", "gauss", "uniform"), ("rho", -1.0, ">= 0"), ("sigma", float("nan"), ">= 0"),
    ("ema_decay", 1.0, "(0.0, 1.0)"), ("rho_max", -0.1, ">= 0"), ("mode", "batch", "micro"), ("scope", "node", "rank"),
    ("scale", "automatic", ">= 0"), ("auto_steps", 0, ">= 1"),
])
def test_config_errors_name_the_field_and_the_allowed_values(field, value, allowed):
    with pytest.raises(ValueError) as err:
        TRAMConfig(**{field: value})
    assert f"TRAMConfig.{field}" in str(err.value) and allowed in str(err.value)


def test_tram_fisher_needs_the_fisher_geometry_and_the_noised_target():
    with pytest.raises(ValueError, match="noised_pass"):
        TRAMConfig(geometry="asam", target="noised_input", noised_pass=True)
    with pytest.raises(ValueError, match="noised_pass"):
        TRAMConfig(geometry="fisher", target="previous", noised_pass=True)
    TRAMConfig(geometry="fisher", target="noised_input", noised_pass=True)


def test_auto_scale_needs_a_target():
    with pytest.raises(ValueError, match=r"TRAMConfig\.scale='auto' .* needs a target .* got target=None"):
        TRAMConfig(target=None, scale="auto")
    assert TRAMConfig(scale="auto").scale == "auto"


def test_config_round_trips_and_rejects_unknown_keys():
    cfg = TRAMConfig(geometry="sam", target="ema", rho_max=0.2)
    assert TRAMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown TRAMConfig field"):
        TRAMConfig.from_dict({"rhoo": 1.0})


def test_noised_input_without_embedding_layer_is_a_clear_error():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="get_input_embeddings"):
        TRAM(model, torch.optim.SGD(model.parameters(), lr=0.1), TRAMConfig(target="noised_input"))


def test_missing_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="optimizer"):
        TRAM(_Toy(), None, TRAMConfig())


def test_uniform_noise_is_bounded_by_sigma_and_seeded_per_rank():
    from tram_dist.targets import NoisedInput

    emb = torch.nn.Embedding(10, 4)
    ids = torch.arange(10).view(2, 5)
    clean = emb(ids).detach()
    outs = []
    for rank in (0, 0, 1):
        noised = NoisedInput(emb, sigma=0.2, noise="uniform", seed=5, rank=rank)
        with noised.active():
            outs.append(emb(ids).detach() - clean)
        assert torch.equal(emb(ids).detach(), clean)  # off outside the context
        noised.remove()
    assert outs[0].abs().max() <= 0.2 and outs[0].abs().max() > 0.1
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
