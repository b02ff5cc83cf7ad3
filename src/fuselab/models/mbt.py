"""``mbt``: the Multimodal Bottleneck Transformer (Nagrani et al., NeurIPS 2021) as a configuration of the
generic MultiStream.

Legend: b batch, m modality, n tokens, d width, l layer, k classes.

Per modality: a tokenizer (feature tokens for vectors, image patches, AST spectrogram patches), a class token
(``classifier="token"``) and learned position embeddings, then ``layers`` pre-norm transformer blocks. The
first ``fusion_layer`` blocks are the modality's encoder; the remaining blocks are wrapped by the exchange
(``bottleneck`` by default, or ``joint-attention``; a standalone token exchange such as ``cross-attention``
runs before each of the remaining blocks instead). ``fusion_layer = 0`` fuses from the first block,
``fusion_layer = layers`` never exchanges (late fusion). Each stream ends in a LayerNorm and is pooled to a
vector (its class token, or the mean of its tokens), then the ``fusion`` merge: ``late`` averages
per-modality logits as the reference does; any vector merge with a linear head also works.

Reference: google-research/scenic ``projects/mbt/model.py``. Deliberate differences (besides those of the
operators, see ``fuselab.fusion.bottleneck``):
- scenic's final LayerNorm and output projection are shared by all modalities; here each stream has its own
  LayerNorm (one shared LayerNorm with ``shared_weights``) and ``late`` has its own head per modality;
- ``classifier="gap"`` averages each modality's tokens separately (scenic averages all tokens of all
  modalities into one vector), so the late merge still sees one vector per modality;
- the output projection is not zero-initialised;
- scenic trains on the mean of the per-modality cross-entropies and averages logits only at evaluation; here
  the loss sees the averaged logits (add the ``aux-unimodal`` loss term for per-modality losses);
- scenic's ``test_with_bottlenecks=False`` (dropping the exchange at test time) is not offered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

import fuselab.api as api
from fuselab.layers.tokenizers import (
    ClassTokenPool,
    FeatureTokenizer,
    MeanPool,
    PatchTokenizer,
    SpectrogramTokenizer,
    TokenStem,
)
from fuselab.layers.transformer import transformer_blocks
from fuselab.models.merging import merge_and_head
from fuselab.models.multistream import MultiStream, PerModality, StreamSequence
from fuselab.registry import FUSIONS, MODELS

TOKENIZERS = ("feature", "patch", "spectrogram", "auto")
CLASSIFIERS = ("token", "gap")


def make_tokenizer(
    kind: str, shape: int | Sequence[int], *, width: int, features_per_token: int, patch_size: int, patch_stride: int
) -> nn.Module:
    """A tokenizer for one modality of input shape ``shape`` (F; (C, H, W); or (T, F))."""
    if kind == "feature":
        if not isinstance(shape, int):
            raise ValueError(f"model.tokenizer=feature needs vector inputs (an integer width), got shape {shape}")
        return FeatureTokenizer(in_features=shape, dim=width, features_per_token=features_per_token)
    if kind == "patch":
        if isinstance(shape, int) or len(shape) != 3:
            raise ValueError(f"model.tokenizer=patch needs image inputs (C, H, W), got shape {shape}")
        c, h, w = shape
        return PatchTokenizer(in_channels=c, dim=width, image_size=(h, w), patch_size=patch_size)
    if isinstance(shape, int) or len(shape) != 2:
        raise ValueError(f"model.tokenizer=spectrogram needs (frames, bins) inputs, got shape {shape}")
    frames, bins = shape
    return SpectrogramTokenizer(dim=width, frames=frames, bins=bins, patch_size=patch_size, stride=patch_stride)


def per_modality(value: Any, modalities: Sequence[str], default: Any) -> dict[str, Any]:
    """A model option given once for all modalities, or as ``{modality: value}``: a modality it does not name
    takes ``default``, and names of modalities the data does not have are ignored (one config serves
    unimodal and fused runs)."""
    if not isinstance(value, Mapping):
        return {m: value for m in modalities}
    return {m: value.get(m, default) for m in modalities}


def auto_tokenizer(shape: int | Sequence[int]) -> str:
    """``feature`` for a vector width, ``patch`` for (C, H, W), ``spectrogram`` for (T, F)."""
    if isinstance(shape, int):
        return "feature"
    return "patch" if len(shape) == 3 else "spectrogram"


def check_fusion_layer(fusion_layer: int, layers: int) -> None:
    if isinstance(fusion_layer, bool) or not isinstance(fusion_layer, int) or not 0 <= fusion_layer <= layers:
        raise ValueError(
            f"model.fusion_layer must be in 0..{layers} (0 = fuse from the first layer, {layers} = no exchange), "
            f"got {fusion_layer!r}"
        )


def fusion_problem(model: Mapping[str, Any], exchange: Mapping[str, Any]) -> str | None:
    """One line when an ``mbt`` config cannot carry information between modalities (None when it can).

    A bottleneck that spans only the last block is read by no later block: the modality tokens of that block
    attend to the learned initial bottleneck tokens, and the updated copies (the only place where the
    modalities meet) are dropped. The network is then late fusion plus a few learned tokens.
    """
    layers = model.get("layers", 4)
    fusion_layer = model.get("fusion_layer", 2)
    name = (exchange or {}).get("name", "bottleneck")
    # fusion_layer = layers is mbt's documented late-fusion setting (its default bottleneck acts in no block);
    # naming another exchange beside it asks for an exchange that never runs
    if name != "bottleneck" and isinstance(layers, int) and fusion_layer == layers:
        return (f"exchange.name={name} with model.fusion_layer={fusion_layer} = model.layers: the exchange acts in "
                "no block, so the network is late fusion under the exchange's name; use model.fusion_layer < "
                f"{layers}, or drop the exchange section for late fusion")
    if name == "bottleneck" and isinstance(layers, int) and isinstance(fusion_layer, int) \
            and layers - fusion_layer == 1:
        return (f"model.fusion_layer={fusion_layer} with model.layers={layers}: the bottleneck then spans only the "
                "last block, whose bottleneck update no block reads, so nothing passes between modalities (late "
                f"fusion plus learned tokens); use model.fusion_layer <= {layers - 2}, or model.fusion_layer="
                f"{layers} for late fusion")
    return None


def _check_options(dims: Mapping[str, Any], *, layers: int, heads: int, width: int, fusion_layer: int,
                   classifier: str) -> None:
    """The shape options of ``mbt``: positive layers, heads dividing the width, the fusion layer, the classifier."""
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"model.layers must be a positive integer, got {layers!r}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or width % heads:
        raise ValueError(f"model.heads={heads} must be a positive divisor of model.width={width}")
    check_fusion_layer(fusion_layer, layers)
    if classifier not in CLASSIFIERS:
        raise ValueError(f"model.classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
    if len(dims) < 1:
        raise ValueError("mbt needs at least 1 modality, got none")


def _tokenizer_kinds(tokenizer: str | Mapping[str, str], dims: Mapping[str, Any]) -> dict[str, str]:
    """The tokenizer of each modality (``auto`` resolved by its input shape)."""
    kinds = per_modality(tokenizer, sorted(dims), "feature")
    for m, kind in kinds.items():
        if kind not in TOKENIZERS:
            raise ValueError(f"model.tokenizer must be one of {', '.join(TOKENIZERS)}, got {kind!r}")
        kinds[m] = auto_tokenizer(dims[m]) if kind == "auto" else kind
    return kinds


def _token_exchange(exchange: Mapping[str, Any] | None, n_bottlenecks: int) -> tuple[str, dict[str, Any]]:
    """The exchange operator's name and options (default ``bottleneck`` with ``n_bottlenecks`` tokens),
    checked to be a token exchange."""
    options = dict(exchange or {"name": "bottleneck"})
    name = options.pop("name")
    info = api.fusion_info(name)
    if info.contract != "exchange" or "tokens" not in info.forms:
        raise ValueError(f"exchange '{name}' is not a token exchange; use bottleneck, joint-attention, "
                         "cross-attention or token-exchange")
    if name == "bottleneck":
        options.setdefault("n_bottlenecks", n_bottlenecks)
    return name, options


def _exchange_part(name: str, options: Mapping[str, Any], rest: Mapping[str, Sequence[nn.Module]], width: int) -> nn.Module:
    """The blocks from the fusion layer on, with the exchange: a wrapping exchange around them, or a standalone
    exchange before each of them."""
    modalities = sorted(rest)
    if api.fusion_info(name).kind == "wrapping":
        return api.create_fusion(name, layers=rest, **options)
    steps: list[nn.Module] = []
    for i in range(len(rest[modalities[0]])):
        steps.append(api.create_fusion(name, dims={m: width for m in modalities}, **options))
        steps.append(PerModality({m: rest[m][i] for m in modalities}))
    return StreamSequence(steps)


@MODELS.register("mbt")
def mbt(
    *,
    dims: Mapping[str, Any],
    num_classes: int,
    fusion: Mapping[str, Any],
    exchange: Mapping[str, Any] | None = None,
    layers: int = 4,
    width: int = 64,
    heads: int = 4,
    mlp_ratio: float = 4.0,
    fusion_layer: int = 2,
    n_bottlenecks: int = 4,
    classifier: str = "token",
    shared_weights: bool = False,
    tokenizer: str | dict[str, str] = "feature",
    features_per_token: int = 1,
    patch_size: int | dict[str, int] = 16,
    patch_stride: int | dict[str, int] = 10,
    dropout: float = 0.0,
    attn_dropout: float = 0.0,
    drop_path: float = 0.0,
    modality_heads: bool = False,
) -> MultiStream:
    """MBT in the generic MultiStream.

    Args:
        dims: per modality the input shape: a width for ``feature``, (C, H, W) for ``patch``, (T, F) for
            ``spectrogram``.
        num_classes: number of classes.
        fusion: the merge of the pooled streams (``{"name": "late"}`` is MBT's averaged logits).
        exchange: the exchange operator and its options; None is ``bottleneck``.
        layers: transformer blocks per modality.
        width: token width d.
        heads: attention heads (must divide ``width``); the parameter count does not depend on it.
        mlp_ratio: MLP hidden width as a multiple of ``width``.
        fusion_layer: first block the exchange acts in (0..layers; ``layers`` = no exchange).
        n_bottlenecks: bottleneck tokens (for ``bottleneck``; ignored by other exchanges).
        classifier: ``token`` (per-modality class token) or ``gap`` (mean over the modality's tokens).
        shared_weights: one set of transformer blocks for all modalities (scenic's ``share_encoder``); the
            tokenizers stay per modality.
        tokenizer: ``feature`` (FT-Transformer, vectors), ``patch`` (ViT, images), ``spectrogram`` (AST),
            ``auto`` (by input shape: a width, (C, H, W) or (T, F)), or ``{modality: kind}`` (per-modality
            options default to the single-value default for a modality they do not name).
        features_per_token: features grouped into one token by the feature tokenizer (1 = FT-Transformer).
        patch_size: patch side of the patch / spectrogram tokenizers (one value, or ``{modality: size}``).
        patch_stride: patch step of the spectrogram tokenizer (AST: 10; one value, or ``{modality: step}``).
        dropout: dropout on embeddings, attention outputs and MLPs.
        attn_dropout: dropout on attention probabilities.
        drop_path: stochastic depth, growing linearly over the blocks to this rate.
        modality_heads: a linear head per stream on its pooled vector (for the ``aux-unimodal`` loss term).

    With one modality (``data.modalities: [image]``) the model is that stream alone, a unimodal baseline:
    no exchange and no merge (the ``fusion`` and ``exchange`` sections are ignored), a linear head on the
    pooled stream.
    """
    _check_options(dims, layers=layers, heads=heads, width=width, fusion_layer=fusion_layer, classifier=classifier)
    modalities = sorted(dims)
    tokenizers = _tokenizer_kinds(tokenizer, dims)
    patch_sizes = per_modality(patch_size, modalities, 16)
    patch_strides = per_modality(patch_stride, modalities, 10)
    unimodal = len(modalities) == 1
    if unimodal:
        fusion_layer = layers  # every block is the stream's own; nothing to exchange with
    exchange_name, exchange = _token_exchange(exchange, n_bottlenecks)

    block_options = dict(dim=width, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout, attn_dropout=attn_dropout,
                         drop_path=drop_path)
    shared = transformer_blocks(depth=layers, **block_options) if shared_weights else None
    blocks = {m: shared if shared_weights else transformer_blocks(depth=layers, **block_options) for m in modalities}
    encoders = {}
    for m in modalities:
        tok = make_tokenizer(tokenizers[m], dims[m], width=width, features_per_token=features_per_token,
                             patch_size=patch_sizes[m], patch_stride=patch_strides[m])
        stem = TokenStem(tok, dim=width, class_token=classifier == "token", dropout=dropout)
        encoders[m] = nn.Sequential(stem, *blocks[m][:fusion_layer])

    exchange_module = None
    if fusion_layer < layers:
        exchange_module = _exchange_part(exchange_name, exchange, {m: blocks[m][fusion_layer:] for m in modalities}, width)

    counts = {m: encoders[m][0].num_tokens for m in modalities}
    if fusion_layer < layers and FUSIONS.get(exchange_name).same_size and len(set(counts.values())) != 1:
        raise ValueError(f"exchange '{exchange_name}' needs aligned tokens (the same count per modality), got {counts}")

    final_norm = nn.LayerNorm(width) if shared_weights else None
    pooling = ClassTokenPool if classifier == "token" else MeanPool
    pool = {m: nn.Sequential(final_norm or nn.LayerNorm(width), pooling()) for m in modalities}

    point = merge_and_head(fusion, num_classes=num_classes, unimodal=unimodal)
    merge = point.merge({m: width for m in modalities})
    head = point.head(merge.out_dim, dropout=dropout)
    heads_per_modality = {m: nn.Linear(width, num_classes) for m in modalities} if modality_heads else None
    return MultiStream(encoders=encoders, exchange=exchange_module, pool=pool, merge=merge, head=head,
                       modality_heads=heads_per_modality)


mbt.fusion_problem = fusion_problem  # type: ignore[attr-defined]  # read by the config check
