"""Sampling on the device (axiom/infer/sampling.py): draws follow softmax(logits / T) after top-k and top-p, a row's
draws depend on its own seed and position only (alone or beside rows of any other parameters), greedy rows take
the exact argmax, and the noise is standard Gumbel noise."""

import math

import pytest
import torch

from axiom.infer.engine import SamplingParams
from axiom.infer.sampling import TOP_CANDIDATES, Cut, RowSampling, gumbel_noise, gumbel_of, pick

# Parameters of every kind in one batch: greedy, temperature only, top-k (within TOP_CANDIDATES and beyond), top-p
# alone, and both.
MIXED = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=1.0, top_k=40),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.2, top_k=TOP_CANDIDATES + 44),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.5),
]


def draws(logits, params, seeds, positions):
    """pick() over rows of `logits` (one row repeated, or one per row)."""
    rows = RowSampling.of(params, seeds, len(params), logits.device)
    return pick(logits, rows, torch.as_tensor(positions, device=logits.device)).tolist()


def filtered_softmax(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution sampling should follow, written out plainly: softmax(logits / T), the top_k most likely
    kept, then the smallest prefix of the most likely whose mass reaches top_p, renormalised (distinct logits)."""
    probs = torch.softmax(logits.double() / p.temperature, dim=-1)
    order = probs.argsort(descending=True).tolist()
    kept = order[: p.top_k] if p.top_k else order
    mass = probs[kept].sum()
    if p.top_p is not None:
        total, prefix = 0.0, []
        for i in kept:
            if total >= p.top_p * mass:
                break
            prefix.append(i)
            total += probs[i].item()
        kept = prefix
    out = torch.zeros_like(probs)
    out[kept] = probs[kept] / probs[kept].sum()
    return out


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at the normal quantile z (3.09: 0.999), by Wilson and Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.7),
        SamplingParams(temperature=0.8, top_k=8, top_p=0.9),
    ],
    ids=["temperature", "top_k", "top_p", "top_k_and_top_p"],
)
@pytest.mark.parametrize("varying", ["position", "seed"])
def test_draws_follow_the_filtered_softmax(params, varying, device):
    torch.manual_seed(0)
    logits = torch.randn(12, device=device) * 1.5
    want = filtered_softmax(logits.cpu(), params)
    n = 40_000
    seeds, positions = ([7] * n, range(n)) if varying == "position" else (range(n), [5] * n)
    got = draws(logits.expand(n, -1), [params] * n, list(seeds), list(positions))
    counts = torch.bincount(torch.tensor(got), minlength=12).double()
    assert counts[want == 0].sum() == 0  # filtered tokens never come
    support = want > 0
    expected = want[support] * n
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    assert chi2 < chi2_critical(int(support.sum()) - 1), (chi2, counts, expected)


def test_a_row_draws_alike_alone_and_beside_rows_of_other_parameters(device):
    torch.manual_seed(1)
    logits = torch.randn(len(MIXED), 1000, device=device) * 2
    seeds = [11, 12, 13, 14, 15, 16]
    assert RowSampling.of(MIXED, seeds, len(MIXED), device).cut is Cut.ALL  # the large top-k: the whole vocabulary
    assert RowSampling.of(MIXED[2:4:2], seeds[:1], 1, device).cut is Cut.TOP
    flip = list(reversed(range(len(MIXED))))
    for position in range(40):
        batch = draws(logits, MIXED, seeds, [position] * len(MIXED))
        alone = [
            draws(logits[i : i + 1], [p], [s], [position])[0] for i, (p, s) in enumerate(zip(MIXED, seeds, strict=True))
        ]
        reordered = draws(logits[flip], [MIXED[i] for i in flip], [seeds[i] for i in flip], [position] * len(MIXED))
        assert batch == alone == reordered[::-1]
        # padded with greedy rows to a fixed batch (the compiled step's shape): the same draws
        padded = RowSampling.of(MIXED, seeds, 9, device)
        positions = torch.tensor([position] * 9, device=device)
        wide = torch.cat([logits, torch.randn(3, 1000, device=device)])
        assert pick(wide, padded, positions).tolist()[: len(MIXED)] == batch


def test_a_seed_fixes_the_draws_and_another_seed_changes_them(device):
    torch.manual_seed(2)
    logits = torch.randn(1, 1000, device=device).expand(300, -1)
    params = [SamplingParams(temperature=1.0)] * 300
    one = draws(logits, params, [3] * 300, range(300))
    assert one == draws(logits, params, [3] * 300, range(300))
    other = draws(logits, params, [4] * 300, range(300))
    assert sum(a != b for a, b in zip(one, other, strict=True)) > 250  # independent draws rarely agree here
    assert len(set(one)) > 100  # and the positions draw afresh
    huge = draws(logits[:2], params[:2], [2**64 - 1, -1], [0, 0])  # seeds wrap modulo 2**64, as torch's did
    assert huge[0] == huge[1]


def test_top_k_1_and_temperature_0_are_greedy(device):
    torch.manual_seed(3)
    logits = torch.randn(64, 1000, device=device)
    logits[0, 5] = logits[0, 9] = logits[0].max() + 1  # a tie: the first maximum, as argmax
    params = [SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=0.0)]
    for p in params:
        got = draws(logits, [p] * 64, range(64), range(64))
        assert got[1:] == logits[1:].argmax(dim=-1).tolist()
    assert draws(logits[:1], params[1:], [0], [0]) == [5]


@pytest.mark.parametrize("top_p, kept", [(0.4, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept, device):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05], device=device).log()
    n = 3000
    got = draws(logits.expand(n, -1), [SamplingParams(temperature=1.0, top_p=top_p)] * n, [1] * n, range(n))
    assert set(got) == kept


def test_the_noise_is_standard_gumbel_and_each_rows_own(device):
    seeds = torch.tensor([0, 1, -5, 2**62], device=device)
    positions = torch.tensor([0, 0, 7, 123456], device=device)
    g = gumbel_noise(seeds, positions, 50_000)
    assert g.shape == (4, 50_000) and g.dtype == torch.float32 and torch.isfinite(g).all()
    for row in g.double():
        assert abs(row.mean().item() - 0.5772) < 0.03 and abs(row.var().item() - math.pi**2 / 6) < 0.06
    for i in range(4):
        assert torch.equal(gumbel_noise(seeds[i : i + 1], positions[i : i + 1], 50_000), g[i : i + 1])
    assert not torch.equal(g[0], g[1])


@pytest.mark.parametrize("t", [10.0, 14.0, 18.0, 20.0, 21.5])
def test_the_noise_reaches_far_into_the_gumbel_tail(t):
    """P(g > t) over the 2**31 equally likely bits is the Gumbel's own to within one of them: a tail token t nats
    below the top is drawn at its rate (a 23-bit uniform capped g at 16.6: never above 18)."""
    exact = -math.expm1(-math.exp(-t)) * 2**31  # how many of the 2**31 values should give g > t
    n = max(math.ceil(exact - 0.5), 1)  # g falls as the bits grow: the n smallest lie above t
    g = gumbel_of(torch.tensor([n - 1, n], dtype=torch.int32)).double()
    assert g[0] > t >= g[1] or (exact < 0.5 and g[0] <= t)
    assert abs(n - exact) <= 1
    assert torch.isfinite(gumbel_of(torch.tensor([0, 2**31 - 1], dtype=torch.int32))).all()


def test_top_k_0_and_minus_1_are_none(device):
    logits = torch.randn(64, 500, device=device)
    none = draws(logits, [SamplingParams(temperature=1.0)] * 64, range(64), range(64))
    for k in (0, -1):
        assert SamplingParams(top_k=k).top_k is None
        assert draws(logits, [SamplingParams(temperature=1.0, top_k=k)] * 64, range(64), range(64)) == none
    assert SamplingParams(top_k=-2).problem() == ("top_k", "must be at least 1, or 0 or -1 for none")


def test_top_p_keeps_the_tokens_tied_with_its_last(device):
    """Values, not sort order, decide: of four equal tokens top_p 0.5 keeps all four (transformers keeps two of
    them, which two depending on its sort)."""
    n = 400
    got = draws(torch.zeros(n, 4, device=device), [SamplingParams(temperature=1.0, top_p=0.5)] * n, [1] * n, range(n))
    assert set(got) == {0, 1, 2, 3}


@pytest.mark.slow
def test_compiled_pick_draws_as_eager(device):
    """Inside a compiled step the integer hash wraps around as in eager (inductor's C++ on CPU, Triton on a GPU)."""
    pytest.importorskip("torch._inductor")
    torch.manual_seed(4)
    logits = torch.randn(len(MIXED), 1000, device=device)
    rows = RowSampling.of(MIXED, [21, 22, 23, 24, 25, 26], len(MIXED), device)
    compiled = torch.compile(pick, fullgraph=True)
    for position in (0, 1, 2**40):
        positions = torch.full((len(MIXED),), position, device=device)
        assert torch.equal(compiled(logits, rows, positions), pick(logits, rows, positions))
