"""Property-based tests (hypothesis) of the operator contracts: 2 to 6 modalities, any dict order, batch 1,
a missing modality, vectors and tokens. Each operator is compared with its formula written out by hand from
its parameters, so a wrong reduction axis, a skipped modality or a swapped operand fails, not only a crash.

Kept fast: few examples per property, no deadline (the machine may be loaded), derandomized so a failure
reproduces.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fuselab
from fuselab.layers import TransformerBlock

# Under mutation testing (mutmut sets MUTANT_UNDER_TEST) a failure needs no shrinking: report it at once.
_PHASES = (Phase.explicit, Phase.reuse, Phase.generate) if "MUTANT_UNDER_TEST" in os.environ else tuple(Phase)
FAST = settings(max_examples=10, deadline=None, derandomize=True, database=None, phases=_PHASES,
                suppress_health_check=list(HealthCheck))
NAMES = ["audio", "video", "depth", "text", "imu", "gaze"]


@st.composite
def cases(draw, *, min_m: int = 2, max_m: int = 6, max_width: int = 6, forms=("vector", "tokens")):
    """Modalities with their widths, a batch size (1 included), a form, a dict order and a seed."""
    n = draw(st.integers(min_m, max_m))
    widths = draw(st.lists(st.integers(1, max_width), min_size=n, max_size=n))
    return dict(
        dims={NAMES[i]: w for i, w in enumerate(widths)},
        batch=draw(st.integers(1, 3)),
        form=draw(st.sampled_from(forms)),
        order=draw(st.permutations(NAMES[:n])),
        seed=draw(st.integers(0, 2**16)),
    )


def _inputs(case, dims=None, tokens: int = 2) -> dict[str, torch.Tensor]:
    """Random inputs in the case's dict order (not sorted): a result must not depend on it."""
    dims = dims or case["dims"]
    g = torch.Generator().manual_seed(case["seed"])
    shape = (tokens,) if case["form"] == "tokens" else ()
    return {m: torch.randn(case["batch"], *shape, dims[m], generator=g) for m in case["order"] if m in dims}


def _build(name: str, dims, seed: int, **options):
    torch.manual_seed(seed)
    f = fuselab.create_fusion(name, dims=dims, **options).eval()
    with torch.no_grad():  # no parameter left at a special value (zero scores, zero biases)
        for p in f.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return f


def _lin(layer, x):
    """A Linear (or Identity) applied by hand on the last axis."""
    if isinstance(layer, torch.nn.Identity):
        return x
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def _one(x):
    return torch.cat([x, torch.ones_like(x[..., :1])], -1)


# --- the vector / token merges, by hand ----------------------------------------------------------------

def _concat(f, xs):
    return _lin(f.proj, torch.cat([xs[m] for m in sorted(xs)], -1))


def _elementwise(reduce):
    return lambda f, xs: reduce(torch.stack([_lin(f.proj[m], xs[m]) for m in sorted(xs)]))


def _late(f, xs):
    logits = [_lin(f.heads[m], xs[m]) for m in sorted(xs)]
    if f.alpha is None:
        return sum(logits) / len(logits)
    idx = [f.modalities.index(m) for m in sorted(xs)]
    w = torch.softmax(f.alpha[idx], 0)
    return sum(w[i] * logit for i, logit in enumerate(logits))


def _attention(f, xs):
    ms = sorted(xs)
    w = torch.softmax(_lin(f.score, torch.cat([xs[m] for m in ms], -1)), -1)
    return sum(w[..., i : i + 1] * _lin(f.proj[m], xs[m]) for i, m in enumerate(ms))


def _gated(f, xs):
    ms = sorted(xs)
    gates = _lin(f.gate, torch.cat([xs[m] for m in ms], -1)).unflatten(-1, (len(ms), f.out_dim))
    g = torch.softmax(gates, -2)  # over the modalities, per feature
    return sum(g[..., i, :] * torch.tanh(_lin(f.hidden[m], xs[m])) for i, m in enumerate(ms))


def _film(f, xs):
    ms = sorted(xs)
    target, context = ms[0], ms[1:]
    dgamma, beta = _lin(f.film, torch.cat([xs[m] for m in context], -1)).chunk(2, -1)
    return _lin(f.proj, (1 + dgamma) * xs[target] + beta)


def _tfn(f, xs):
    z = None
    for m in sorted(xs):
        v = _one(_lin(f.proj[m], xs[m]))
        z = v if z is None else (z[..., :, None] * v[..., None, :]).flatten(-2)
    return _lin(f.out, z)


def _lmf(f, xs):
    out = f.bias
    for r in range(f.rank):
        prod = 1
        for m in sorted(xs):
            prod = prod * (_one(xs[m]) @ f.factors[m][r])
        out = out + f.mix[r] * prod
    return out


def _mlb(f, xs):
    return _lin(f.out, math.prod(torch.tanh(_lin(f.proj[m], xs[m])) for m in sorted(xs)))


def _mfb(f, xs):
    z = math.prod(_lin(f.proj[m], xs[m]) for m in sorted(xs))
    z = z.unflatten(-1, (f.mm_dim, f.factor)).sum(-1)
    z = torch.sign(z) * torch.sqrt(z.abs() + 1e-8)
    return _lin(f.out, z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def _mi(f, xs):
    ms = sorted(xs)
    c = torch.cat([_lin(f.ctx_proj[m], xs[m]) for m in ms[1:]], -1)
    x = _lin(f.in_proj, xs[ms[0]])
    w = _lin(f.weight_gen, c).unflatten(-1, (f.proj_dim, f.out_dim))  # (..., P, O)
    return (x[..., None, :] @ w)[..., 0, :] + _lin(f.bias_gen, c)


BY_HAND = {
    "concat": _concat,
    "sum": _elementwise(lambda s: s.sum(0)),
    "mean": _elementwise(lambda s: s.mean(0)),
    "max": _elementwise(lambda s: s.max(0).values),
    "product": _elementwise(lambda s: s.prod(0)),
    "late": _late,
    "attention": _attention,
    "gated": _gated,
    "film": _film,
    "tfn": _tfn,
    "lmf": _lmf,
    "mlb": _mlb,
    "mfb": _mfb,
    "mi": _mi,
}
OPTIONS = {"late": [{}, {"weights": "learned"}], "mfb": [{"mm_dim": 6, "factor": 3}], "mlb": [{"mm_dim": 7}],
           "lmf": [{"rank": 3}], "mi": [{"proj_dim": 3}]}
MERGE_CASES = [(name, opts) for name in BY_HAND for opts in OPTIONS.get(name, [{}])]


def test_every_vector_merge_has_a_hand_formula_here():
    built_in = [n for n in fuselab.list_fusions()  # plugins registered by other tests are not ours to cover
                if fuselab.FUSIONS.get(n).__module__.startswith("fuselab.")]
    vector_merges = {n for n in built_in
                     if fuselab.fusion_info(n).contract == "merge" and "vector" in fuselab.fusion_info(n).forms}
    assert vector_merges - {"cross-attention-pool"} == set(BY_HAND)  # the pooling merge is checked below


@pytest.mark.parametrize("name,options", MERGE_CASES, ids=[f"{n}{'-' + '-'.join(map(str, o.values())) if o else ''}" for n, o in MERGE_CASES])
@FAST
@given(case=cases())
def test_merge_equals_its_formula_in_any_dict_order(name, options, case):
    out_dim = None if name in ("concat", "film") and case["seed"] % 2 else 5  # natural width too
    f = _build(name, case["dims"], case["seed"], out_dim=out_dim, **options)
    xs = _inputs(case)
    with torch.no_grad():
        z, hand = f(xs), BY_HAND[name](f, xs)
    lead = (case["batch"], 2) if case["form"] == "tokens" else (case["batch"],)
    assert z.shape == (*lead, f.out_dim)
    assert torch.allclose(z, hand, atol=1e-5, rtol=1e-4), (z - hand).abs().max()


@pytest.mark.parametrize("name", ["sum", "mean", "max", "product", "late"])
@FAST
@given(case=cases(min_m=3), data=st.data())
def test_a_missing_modality_is_left_out_of_the_formula(name, case, data):
    options = {"weights": "learned"} if name == "late" else {}
    f = _build(name, case["dims"], case["seed"], out_dim=5, **options)
    xs = _inputs(case)
    kept = data.draw(st.sets(st.sampled_from(sorted(xs)), min_size=1, max_size=len(xs) - 1))
    part = {m: x for m, x in xs.items() if m in kept}
    with torch.no_grad():
        assert torch.allclose(f(part), BY_HAND[name](f, part), atol=1e-5, rtol=1e-4)


TOKEN_MERGES = ["concat", "sum", "attention", "gated", "lmf", "cross-attention-pool"]


@pytest.mark.parametrize("name", sorted(BY_HAND) + ["cross-attention-pool"])
@FAST
@given(case=cases(max_m=4))
def test_batch_of_one_gives_the_same_rows(name, case):
    case = {**case, "batch": 3}
    options = {"heads": 1} if name == "cross-attention-pool" else {}
    f = _build(name, case["dims"], case["seed"], out_dim=5, **options)
    xs = _inputs(case)
    with torch.no_grad():
        whole = f(xs)
        for i in range(3):
            assert torch.allclose(f({m: x[i : i + 1] for m, x in xs.items()}), whole[i : i + 1], atol=1e-5)


@FAST
@given(case=cases(max_m=5))
def test_cross_attention_pool_ignores_dict_order_and_sees_every_modality(case):
    case = {**case, "dims": {m: w + 2 for m, w in case["dims"].items()}}  # LayerNorm of 1 or 2 features: 0 or ±1
    f = _build("cross-attention-pool", case["dims"], case["seed"], heads=1)
    xs = _inputs(case)
    with torch.no_grad():
        z = f(xs)
        assert torch.allclose(z, f(dict(sorted(xs.items()))), atol=1e-5)
        for m in xs:  # every modality's tokens are keys of every query
            changed = f({k: (x + torch.randn_like(x) if k == m else x) for k, x in xs.items()})
            assert not torch.allclose(z, changed, atol=1e-4), m


# --- token exchanges ---------------------------------------------------------------------------------


def _blocks(dims, depth, seed, width=4):
    torch.manual_seed(seed)
    return {m: [TransformerBlock(dim=width, heads=2, mlp_ratio=1.0).eval() for _ in range(depth)] for m in dims}


def _bottleneck_by_hand(op, layers, xs):
    z = op.bottleneck.expand(next(iter(xs.values())).shape[0], -1, -1)
    xs = dict(xs)
    for i in range(op.depth):
        copies = []
        for m in sorted(xs):
            n = xs[m].shape[1]
            y = layers[m][i](torch.cat([xs[m], z], 1))
            xs[m], copies = y[:, :n], copies + [y[:, n:]]
        z = sum(copies) / len(copies)
    return xs


def _joint_by_hand(op, layers, xs):
    xs = dict(xs)
    for i in range(op.depth):
        qkv = {m: layers[m][i].project(xs[m]) for m in sorted(xs)}
        k = torch.cat([qkv[m][1] for m in sorted(xs)], 2)
        v = torch.cat([qkv[m][2] for m in sorted(xs)], 2)
        xs = {m: layers[m][i].finish(xs[m], qkv[m][0], k, v) for m in xs}
    return xs


@pytest.mark.parametrize("name,by_hand", [("bottleneck", _bottleneck_by_hand), ("joint-attention", _joint_by_hand)])
@FAST
@given(n=st.integers(2, 4), counts=st.lists(st.integers(1, 4), min_size=4, max_size=4),
       batch=st.integers(1, 2), seed=st.integers(0, 2**16), data=st.data())
def test_wrapping_exchange_equals_its_formula_with_any_modalities_present(name, by_hand, n, counts, batch, seed, data):
    names = NAMES[:n]
    layers = _blocks(names, depth=2, seed=seed)
    op = fuselab.create_fusion(name, layers=layers).eval()
    if name == "bottleneck":
        with torch.no_grad():
            op.bottleneck.normal_()
    g = torch.Generator().manual_seed(seed)
    order = data.draw(st.permutations(names))
    present = data.draw(st.sets(st.sampled_from(names), min_size=1, max_size=n)) if n > 2 else set(names)
    xs = {m: torch.randn(batch, counts[i], 4, generator=g) for i, m in enumerate(order) if m in present}
    with torch.no_grad():
        out, hand = op(xs), by_hand(op, layers, xs)
    assert set(out) == set(xs)
    for m in xs:
        assert out[m].shape == xs[m].shape
        assert torch.allclose(out[m], hand[m], atol=1e-5), m


@FAST
@given(case=cases(max_m=4, forms=("tokens",)))
def test_cross_attention_equals_its_formula(case):
    op = _build("cross-attention", {m: 4 for m in case["dims"]}, case["seed"], heads=2)
    xs = _inputs({**case, "dims": {m: 4 for m in case["dims"]}}, tokens=3)
    with torch.no_grad():
        out = op(xs)
        for m in xs:
            ctx = torch.cat([op.proj[f"{s}_to_{m}"](xs[s]) for s in sorted(xs) if s != m], 1)
            hand = xs[m] + op.attn[m](op.norm[m](xs[m]), ctx, ctx)
            assert torch.allclose(out[m], hand, atol=1e-5), m


@FAST
@given(case=cases(max_m=6, forms=("tokens",)), threshold=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.999]))
def test_token_exchange_replaces_exactly_the_low_score_tokens_by_the_mean_of_the_others(case, threshold):
    dims = {m: 4 for m in case["dims"]}
    op = _build("token-exchange", dims, case["seed"], threshold=threshold)
    xs = _inputs({**case, "dims": dims}, tokens=5)
    with torch.no_grad():
        out = op(xs)
        for m in xs:
            s = op.score[m](xs[m])  # (B, N)
            others = sum(xs[k] for k in xs if k != m) / (len(xs) - 1)
            hand = torch.where((s >= threshold)[..., None], xs[m], others)
            assert torch.allclose(out[m], hand, atol=1e-6), m
        aux = op.aux_losses()["l1"]
        assert torch.allclose(aux, torch.stack([op.score[m](xs[m]).abs().mean() for m in sorted(xs)]).mean())
