"""Multiplicative merges: tensor fusion, low-rank fusion, multiplicative interactions, MLB and MFB.

Legend: b batch, m modality, d width, p projection width, r rank, o / k MFB output and factor.

Products of many factors drift towards zero or infinity with six modalities; every operator here
initialises its factors so that each factor has unit scale, which keeps the products well scaled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from fuselab.fusion.base import Merge, resolve_order
from fuselab.registry import FUSIONS


def _with_one(x: Tensor) -> Tensor:
    """Append a constant 1 on the last axis: [x; 1]."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


@FUSIONS.register("tfn")
class TensorFusion(Merge):
    """Tensor Fusion Network: the outer product of every ``[x_m; 1]``, flattened, then a Linear.

    Paper: Zadeh et al., "Tensor Fusion Network for Multimodal Sentiment Analysis", EMNLP 2017.
    Reference: Justin1904/TensorFusionNetworks. Rule for M modalities: each modality is first projected
    to ``proj_dim`` (default: the largest p with (p + 1)^M <= 4096, at most the largest input width) so
    the flattened product has (p + 1)^M entries; the paper's three modalities had sub-network outputs
    of 32 and no projection.
    """

    forms = ("vector", "tokens")
    multimodal_rule = "each modality projected to proj_dim, then the M-way outer product of [x_m; 1]"
    natural_out_dim = "the largest input width"
    paper = "Zadeh et al., Tensor Fusion Network for Multimodal Sentiment Analysis, EMNLP 2017"
    reference = "Justin1904/TensorFusionNetworks"
    formula = "z = W vec([P_1 x_1; 1] (x) ... (x) [P_M x_M; 1])"

    max_entries = 4096

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None, *, proj_dim: int | None = None) -> None:
        super().__init__(dims, out_dim)
        n = len(self.dims)
        if proj_dim is None:
            proj_dim = max(1, min(max(self.dims.values()), int(round(self.max_entries ** (1 / n))) - 1))
            while (proj_dim + 1) ** n > self.max_entries and proj_dim > 1:
                proj_dim -= 1
        if proj_dim < 1:
            raise ValueError(f"tfn: proj_dim must be positive, got {proj_dim}")
        self.proj_dim = proj_dim
        self.proj = nn.ModuleDict({m: nn.Linear(d, proj_dim) for m, d in self.dims.items()})
        self.out_dim = out_dim or max(self.dims.values())
        self.out = nn.Linear((proj_dim + 1) ** n, self.out_dim)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        z = None
        for m, x in xs.items():
            f = _with_one(self.proj[m](x))  # (..., p + 1)
            z = f if z is None else torch.einsum("...i,...j->...ij", z, f).flatten(-2)
        return self.out(z)


@FUSIONS.register("lmf")
class LowRankFusion(Merge):
    """Low-rank Multimodal Fusion: ``sum_r w_r prod_m (W_m^r [x_m; 1]) + b``.

    Paper: Liu et al., "Efficient Low-rank Multimodal Fusion with Modality-Specific Factors", ACL 2018.
    Reference: Justin1904/Low-rank-Multimodal-Fusion. Unlike MultiBench's port (factors kept in a Python
    list, hence never registered or trained), every factor here is a registered parameter. Factors are
    initialised so that each ``W_m^r [x_m; 1]`` has unit scale for unit-scale inputs (the reference uses
    Xavier), which keeps the M-way product well scaled with six modalities.
    """

    forms = ("vector", "tokens")
    multimodal_rule = "one rank-r factor per modality; the product runs over all M modalities"
    natural_out_dim = "the largest input width"
    paper = "Liu et al., Efficient Low-rank Multimodal Fusion with Modality-Specific Factors, ACL 2018"
    reference = "Justin1904/Low-rank-Multimodal-Fusion"
    formula = "z = sum_r w_r prod_m (W_m^r [x_m; 1]) + b"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None, *, rank: int = 16) -> None:
        super().__init__(dims, out_dim)
        if rank < 1:
            raise ValueError(f"lmf: rank must be positive, got {rank}")
        self.rank = rank
        self.out_dim = out_dim or max(self.dims.values())
        self.factors = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(rank, d + 1, self.out_dim) / math.sqrt(d + 1)) for m, d in self.dims.items()}
        )
        self.mix = nn.Parameter(torch.randn(rank) / math.sqrt(rank))
        self.bias = nn.Parameter(torch.zeros(self.out_dim))

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        z = None
        for m, x in xs.items():
            f = torch.einsum("...i,rid->...rd", _with_one(x), self.factors[m])  # (..., R, D)
            z = f if z is None else z * f
        return torch.einsum("...rd,r->...d", z, self.mix) + self.bias


@FUSIONS.register("mi")
class MultiplicativeInteraction(Merge):
    """Multiplicative interactions: a context modulates the weights applied to an input.

    Paper: Jayakumar et al., "Multiplicative Interactions and Where to Find Them", ICLR 2020.
    Reference: MultiBench ``fusions/common_fusions.py`` MultiplicativeInteractions2Modal.
    Rule for M modalities: the input is the first modality of ``order`` (sorted names by default), the
    context is the concatenation of the others, each projected to ``proj_dim``. ``variant``:
    ``matrix`` ``z = (W c + U) x + V c + b`` (a context-generated weight matrix), ``vector``
    ``z = (W c + u) * A x + V c + b`` (diagonal), ``scalar`` ``z = (w . c + u) A x + V c + b``.
    """

    forms = ("vector", "tokens")
    asymmetric = True
    multimodal_rule = "input = first modality of order; context = all others, each projected to proj_dim"
    natural_out_dim = "the largest input width"
    paper = "Jayakumar et al., Multiplicative Interactions and Where to Find Them, ICLR 2020"
    reference = "MultiBench fusions/common_fusions.py MultiplicativeInteractions2Modal"
    formula = "z = (W c + U) x + V c + b (matrix); diagonal and scalar variants"

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int | None = None,
        *,
        variant: str = "matrix",
        proj_dim: int = 32,
        order: Sequence[str] | None = None,
    ) -> None:
        super().__init__(dims, out_dim)
        if variant not in ("matrix", "vector", "scalar"):
            raise ValueError(f"mi: variant must be 'matrix', 'vector' or 'scalar', got {variant!r}")
        order = resolve_order(list(self.dims), order, "mi")
        self.input, self.context = order[0], order[1:]
        self.variant, self.proj_dim = variant, proj_dim
        self.out_dim = o = out_dim or max(self.dims.values())
        self.ctx_proj = nn.ModuleDict({m: nn.Linear(self.dims[m], proj_dim) for m in self.context})
        c = proj_dim * len(self.context)
        x_width = proj_dim if variant == "matrix" else o
        self.in_proj = nn.Linear(self.dims[self.input], x_width)
        gen = {"matrix": proj_dim * o, "vector": o, "scalar": 1}[variant]
        self.weight_gen = nn.Linear(c, gen)  # W c + U (U is the bias)
        self.bias_gen = nn.Linear(c, o)  # V c + b
        with torch.no_grad():  # the generated weights start at the scale of a default Linear
            self.weight_gen.weight.mul_(1 / math.sqrt(x_width) if variant == "matrix" else 1.0)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        c = torch.cat([self.ctx_proj[m](xs[m]) for m in self.context], dim=-1)
        x = self.in_proj(xs[self.input])
        w = self.weight_gen(c)
        if self.variant == "matrix":
            w = rearrange(w, "... (p o) -> ... p o", p=self.proj_dim)
            z = torch.einsum("...p,...po->...o", x, w)
        else:
            z = w * x
        return z + self.bias_gen(c)


@FUSIONS.register("mlb")
class MLB(Merge):
    """Multimodal low-rank bilinear pooling: ``P^T (tanh(U_1 x_1) * ... * tanh(U_M x_M))``.

    Paper: Kim et al., "Hadamard Product for Low-rank Bilinear Pooling", ICLR 2017.
    Reference: Cadene/block.bootstrap.pytorch ``fusions/fusions.py`` (MLB). Rule for M modalities: the
    Hadamard product runs over all M projections. ``mm_dim`` defaults to 256 (block uses 1200).
    """

    forms = ("vector", "tokens")
    multimodal_rule = "Hadamard product of all M projections"
    natural_out_dim = "the largest input width"
    paper = "Kim et al., Hadamard Product for Low-rank Bilinear Pooling, ICLR 2017"
    reference = "Cadene/block.bootstrap.pytorch fusions/fusions.py MLB"
    formula = "z = P^T (prod_m tanh(U_m x_m))"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None, *, mm_dim: int = 256) -> None:
        super().__init__(dims, out_dim)
        self.out_dim = out_dim or max(self.dims.values())
        self.proj = nn.ModuleDict({m: nn.Linear(d, mm_dim) for m, d in self.dims.items()})
        self.out = nn.Linear(mm_dim, self.out_dim)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        z = torch.stack([torch.tanh(self.proj[m](x)) for m, x in xs.items()], dim=0).prod(0)
        return self.out(z)


@FUSIONS.register("mfb")
class MFB(Merge):
    """Multimodal factorised bilinear pooling: product of projections to ``mm_dim * factor``, sum-pooled
    over each group of ``factor``, signed square root, L2 normalisation, then a Linear.

    Paper: Yu et al., "Multi-modal Factorized Bilinear Pooling with Co-Attention Learning for VQA",
    ICCV 2017. Reference: Cadene/block.bootstrap.pytorch ``fusions/fusions.py`` (MFB). Rule for M
    modalities: the product runs over all M projections. Defaults ``mm_dim=256``, ``factor=5`` (the
    paper's k; block uses 1200 and 2).
    """

    forms = ("vector", "tokens")
    multimodal_rule = "Hadamard product of all M projections, then sum-pooling by factor"
    natural_out_dim = "the largest input width"
    paper = "Yu et al., Multi-modal Factorized Bilinear Pooling, ICCV 2017"
    reference = "Cadene/block.bootstrap.pytorch fusions/fusions.py MFB"
    formula = "z = W norm(ssqrt(sumpool_k(prod_m U_m x_m)))"

    def __init__(
        self, dims: Mapping[str, int], out_dim: int | None = None, *, mm_dim: int = 256, factor: int = 5
    ) -> None:
        super().__init__(dims, out_dim)
        self.mm_dim, self.factor = mm_dim, factor
        self.out_dim = out_dim or max(self.dims.values())
        self.proj = nn.ModuleDict({m: nn.Linear(d, mm_dim * factor) for m, d in self.dims.items()})
        self.out = nn.Linear(mm_dim, self.out_dim)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        z = torch.stack([self.proj[m](x) for m, x in xs.items()], dim=0).prod(0)
        z = rearrange(z, "... (o k) -> ... o k", k=self.factor).sum(-1)
        z = torch.sign(z) * torch.sqrt(z.abs() + 1e-8)  # signed square root, finite gradient at 0
        return self.out(F.normalize(z, dim=-1))
