"""MS-CLIP in one file: Modality-Shared Contrastive Language-Image Pre-training.

You, Zhou, Xiao, Codella, Cheng, Xu, Chang, Yuan, "Learning Visual Representation from
Modality-Shared Contrastive Language-Image Pre-training", ECCV 2022.

One transformer serves both modalities: image tokens and text tokens run through the same
attention and MLP weights, and only the LayerNorms (and the input / output layers) are specific to
a modality (Sec. 3.1). MS-CLIP-S adds two small modality-specific modules: Early Specialization,
a convolutional stem for images and a text-only first layer (Sec. 3.2), and the Efficient Parallel
Branch, a light CNN beside the image tower whose features enter the token stream through
adapters (Sec. 3.3). The released MS-CLIP-S checkpoints load with `load_checkpoint`.

    import msclip
    model = msclip.create_model("msclip-s-b32")          # or msclip.load_checkpoint(path)
    images = msclip.ImageTransform(224).batch([pil_image])
    tokens = msclip.tokenize(["a photo of a cat."])
    image_features, text_features, logit_scale = model(images, tokens)

Numerics follow the official code (docs/ARCHITECTURE.md, cited as §N below): LayerNorm eps 1e-12
with fp32 statistics, QuickGELU, BatchNorm eps 1e-6 in the branch bottlenecks, ImageNet
normalisation. Dependencies: torch, numpy, pillow, ftfy, regex.
"""
import functools
import gzip
import html
import math
import os
import random
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint

# The BPE merges and prompt lists live next to this file; a copy of msclip.py elsewhere can point
# MSCLIP_ASSETS (or the `bpe_path` argument) at them.
ASSETS = Path(os.environ.get("MSCLIP_ASSETS", Path(__file__).resolve().parent / "assets"))


# ----------------------------------------------------------------------------------------------
# Configuration: one dataclass, the paper's models and ablations as presets
# ----------------------------------------------------------------------------------------------

@dataclass
class MSCLIPConfig:
    embed_dim: int = 512              # joint image-text embedding size
    image_size: int = 224
    patch_size: int = 32              # total stride from pixels to the token grid (32 or 16)
    vision_width: int = 768
    vision_heads: int = 12
    text_width: int = 768
    text_heads: int = 12
    layers: int = 12                  # depth of each tower; Early Specialization takes layer 0
    vocab_size: int = 49408
    context_length: int = 77
    share_attention: bool = True      # Sec. 3.1 and supplement Table 5
    share_mlp: bool = True
    share_layernorms: bool = False    # Table 5: the released models keep LayerNorms per modality
    early_specialization: bool = False  # Sec. 3.2: conv stem + text-only first layer
    parallel_branch: bool = False       # Sec. 3.3: CNN branch fused by five adapters
    adapter_depthwise: bool = True      # supplement Table 6: False = average pooling instead
    fusion_layers: tuple = (2, 4, 6, 8, 10)  # an adapter runs at the input of these layers

    def __post_init__(self):
        self.fusion_layers = tuple(self.fusion_layers)
        shares = self.share_attention or self.share_mlp or self.share_layernorms
        if shares and (self.vision_width, self.vision_heads) != (self.text_width, self.text_heads):
            raise ValueError("shared modules need vision_width/heads == text_width/heads, got "
                             f"{self.vision_width}/{self.vision_heads} and {self.text_width}/{self.text_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if (self.early_specialization or self.parallel_branch) and self.patch_size not in (16, 32):
            raise ValueError("the conv stem and parallel branch are defined for patch_size 16 or 32")
        if self.parallel_branch:
            first = 2 if self.early_specialization else 1
            if len(self.fusion_layers) != 5 or list(self.fusion_layers) != sorted(set(self.fusion_layers)) \
                    or self.fusion_layers[0] < first or self.fusion_layers[-1] >= self.layers:
                raise ValueError(f"fusion_layers must be 5 increasing layers in [{first}, {self.layers - 1}], "
                                 f"got {self.fusion_layers}")

    @property
    def grid(self):
        return self.image_size // self.patch_size


_CLIP = dict(text_width=512, text_heads=8, share_attention=False, share_mlp=False)
_S = dict(early_specialization=True, parallel_branch=True)
_TINY = dict(image_size=64, vision_width=128, vision_heads=2, text_width=128, text_heads=2, embed_dim=128)
PRESETS = {
    "clip-b32": _CLIP,                                   # the paper's baseline: separate towers
    "clip-b16": {**_CLIP, "patch_size": 16},
    "msclip-b32": {},                                    # attention + MLP shared in all layers
    "msclip-b16": {"patch_size": 16},
    "msclip-s-b32": _S,                                  # + Early Specialization + Parallel Branch
    "msclip-s-b16": {**_S, "patch_size": 16},
    "clip-tiny": {**_TINY, **_CLIP, "text_width": 128, "text_heads": 2},
    "msclip-tiny": _TINY,
    "msclip-s-tiny": {**_TINY, **_S},
    "msclip-s-tiny-b16": {**_TINY, **_S, "patch_size": 16},
    "clip-tiny-b16": {**_TINY, **_CLIP, "text_width": 128, "text_heads": 2, "patch_size": 16},
    "msclip-tiny-b16": {**_TINY, "patch_size": 16},
}
# The paper's ablations as presets "<ablation>-<size>", so that train_ds.py (--preset) and ablate.py
# can run each at every size: one modality-specific module added to MS-CLIP (main paper Sec. 4.3),
# attention or FFN shared alone (supplement Table 5), adapters without depthwise convs (Table 6).
_ABLATIONS = {"msclip-es": {"early_specialization": True}, "msclip-pb": {"parallel_branch": True},
              "msclip-attn": {"share_mlp": False}, "msclip-ffn": {"share_attention": False},
              "msclip-s-avgpool": {**_S, "adapter_depthwise": False}}
_SIZES = {"b32": {}, "b16": {"patch_size": 16}, "tiny-b16": {**_TINY, "patch_size": 16}}
PRESETS.update({f"{name}-{size}": {**base, **switches} for name, switches in _ABLATIONS.items()
                for size, base in _SIZES.items()})


def preset_config(name, **overrides):
    """The MSCLIPConfig of a preset name; any field may be overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return MSCLIPConfig(**{**PRESETS[name], **overrides})


def create_model(name, **overrides):
    """Build a randomly initialised model from a preset name; any MSCLIPConfig field may be overridden."""
    return MSCLIP(preset_config(name, **overrides))


# ----------------------------------------------------------------------------------------------
# Building blocks with the official numerics (ARCHITECTURE §2)
# ----------------------------------------------------------------------------------------------

class LayerNorm(nn.LayerNorm):
    """The official LayerNorm: eps 1e-12 and fp32 statistics, also under autocast."""

    def __init__(self, width):
        super().__init__(width, eps=1e-12)

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention: one packed q|k|v projection (the official in_proj layout), SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x, causal=False):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out(x.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Sequential):
    def __init__(self, width):
        super().__init__(OrderedDict(expand=nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                     project=nn.Linear(4 * width, width)))


def residual_attention(x, ln_1, attn, ln_2, mlp, causal):
    """A pre-LN transformer layer; the causal mask is what makes padding after EOT irrelevant."""
    x = x + attn(ln_1(x), causal=causal)
    return x + mlp(ln_2(x))


class ResidualAttentionBlock(nn.Module):
    """A transformer layer owned by one modality (the text-only first layer of Sec. 3.2)."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn, self.ln_1, self.mlp, self.ln_2 = Attention(width, heads), LayerNorm(width), MLP(width), LayerNorm(width)

    def forward(self, x, causal=False):
        return residual_attention(x, self.ln_1, self.attn, self.ln_2, self.mlp, causal)


class ConvBN(nn.Sequential):
    """Bias-free convolution + BatchNorm, the unit of every convolutional module in MS-CLIP-S."""

    def __init__(self, cin, cout, kernel, stride=1, padding=None, groups=1, eps=1e-5):
        padding = kernel // 2 if padding is None else padding
        super().__init__(OrderedDict(conv=nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                                     bn=nn.BatchNorm2d(cout, eps=eps)))


# ----------------------------------------------------------------------------------------------
# Sec. 3.1: the modality-shared transformer layer
# ----------------------------------------------------------------------------------------------

class ModalitySharedLayer(nn.Module):
    """One layer of the transformer that images and text both run through (Sec. 3.1, supp. Table 5).

    `shared` holds the sub-modules both modalities use: one tensor each, trained by gradients from
    images and text. `image` and `text` hold what each modality owns. MS-CLIP shares attention and
    MLP and keeps ln_1/ln_2 per modality; the CLIP baseline shares nothing (and its text is narrower).
    """

    def __init__(self, config):
        super().__init__()
        c = config
        is_shared = {"attn": c.share_attention, "ln_1": c.share_layernorms, "mlp": c.share_mlp,
                     "ln_2": c.share_layernorms}

        def parts(names, width, heads):
            build = {"attn": lambda: Attention(width, heads), "mlp": lambda: MLP(width), "ln_1": lambda: LayerNorm(width),
                     "ln_2": lambda: LayerNorm(width)}
            return nn.ModuleDict({name: build[name]() for name in names})

        self.shared = parts([n for n in is_shared if is_shared[n]], c.vision_width, c.vision_heads)
        self.image = parts([n for n in is_shared if not is_shared[n]], c.vision_width, c.vision_heads)
        self.text = parts([n for n in is_shared if not is_shared[n]], c.text_width, c.text_heads)

    def forward(self, x, modality):
        own = self.image if modality == "image" else self.text
        ln_1, attn, ln_2, mlp = (own[n] if n in own else self.shared[n] for n in ("ln_1", "attn", "ln_2", "mlp"))
        return residual_attention(x, ln_1, attn, ln_2, mlp, causal=modality == "text")


# ----------------------------------------------------------------------------------------------
# Sec. 3.2: Early Specialization (image side: conv stem; text side: a text-only first layer)
# ----------------------------------------------------------------------------------------------

def conv_channels(width):
    """Channels of the stem and branch stages: 48, 96, 192, 384, 768 for width 768."""
    return [width // 16, width // 8, width // 4, width // 2, width]


def stage_strides(patch_size):
    """Strides of the four residual stages after the stride-2 first conv: B/32 2,2,2,2; B/16 2,2,2,1."""
    return [2, 2, 2, 2 if patch_size == 32 else 1]


class ResidualConv(nn.Module):
    """Stem stage: ReLU(BN(conv3x3(x)) + BN(conv1x1(x))), one 3x3 conv (the official 'basic_v0')."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv, self.shortcut = ConvBN(cin, cout, 3, stride), ConvBN(cin, cout, 1, stride)

    def forward(self, x):
        return F.relu(self.conv(x) + self.shortcut(x))


class ConvStem(nn.Module):
    """Early Specialization for images (Sec. 3.2, supp. Table 1): replaces the patch embedding and
    the first transformer layer with a small residual CNN ending on the token grid."""

    def __init__(self, width, patch_size):
        super().__init__()
        c = conv_channels(width)
        self.first = ConvBN(3, c[0], 3, stride=2)
        self.stages = nn.ModuleList(ResidualConv(c[i], c[i + 1], s) for i, s in enumerate(stage_strides(patch_size)))
        self.last = nn.Conv2d(width, width, 1, bias=False)

    def forward(self, images):
        x = F.relu(self.first(images))
        for stage in self.stages:
            x = stage(x)
        return self.last(x)


# ----------------------------------------------------------------------------------------------
# Sec. 3.3: Efficient Parallel Branch and its adapters (vision only)
# ----------------------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    """Branch stage 1-4: 1x1 reduce, 3x3 (strided), 1x1 expand, projection shortcut; BN eps 1e-6."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        mid = cout // 2
        self.reduce = ConvBN(cin, mid, 1, eps=1e-6)
        self.conv = ConvBN(mid, mid, 3, stride, eps=1e-6)
        self.expand = ConvBN(mid, cout, 1, eps=1e-6)
        self.shortcut = ConvBN(cin, cout, 1, stride, eps=1e-6)

    def forward(self, x):
        y = self.expand(F.relu(self.conv(F.relu(self.reduce(x)))))
        return F.relu(y + self.shortcut(x))


class ParallelBranch(nn.ModuleList):
    """The Efficient Parallel Branch (Sec. 3.3, supp. Table 2): a 5-stage CNN on the raw image.
    Stage j runs just before adapter j needs it, so the branch costs no extra memory pass."""

    def __init__(self, width, patch_size):
        c = conv_channels(width)
        super().__init__([nn.Sequential(ConvBN(3, c[0], 3, stride=2), nn.ReLU())] +
                         [Bottleneck(c[j], c[j + 1], s) for j, s in enumerate(stage_strides(patch_size))])


class Adapter(nn.Module):
    """Lateral adapter from branch stage j into the image tokens (Sec. 3.3, supp. Tables 2 and 6).

    The branch map is pooled onto the token grid by a depthwise conv whose kernel = stride, then
    projected to the width; the grid tokens get a depthwise 3x3; the sum, with the CLS token doubled
    (the official PRALLEL_T2B_USECLS), goes through a LayerNorm and *replaces* the token stream.
    With depthwise=False (Table 6 ablation) every depthwise conv + BN is average pooling of the same
    kernel, stride and padding; the 1x1 projection stays.
    """

    def __init__(self, channels, width, kernel, depthwise=True):
        super().__init__()
        self.branch_pool = (ConvBN(channels, channels, kernel, kernel, padding=0, groups=channels) if depthwise
                            else nn.AvgPool2d(kernel, kernel))
        self.branch_proj = nn.Conv2d(channels, width, 1, bias=False)
        self.token_mix = ConvBN(width, width, 3, groups=width) if depthwise else nn.AvgPool2d(3, 1, 1)
        self.norm = LayerNorm(width)

    def forward(self, tokens, branch):
        side = math.isqrt(tokens.shape[1] - 1)
        from_branch = self.branch_proj(self.branch_pool(branch)).flatten(2).transpose(1, 2)
        # The grid tokens as a [B, width, side, side] view (channels-last strides): no copy; the
        # depthwise conv reads it as it is and its output flattens back to tokens without one
        grid = tokens[:, 1:].unflatten(1, (side, side)).permute(0, 3, 1, 2)
        grid = self.token_mix(grid).flatten(2).transpose(1, 2)
        cls = tokens[:, :1]
        return self.norm(torch.cat([cls + cls, grid + from_branch], dim=1))


# ----------------------------------------------------------------------------------------------
# The model: what is image-only, what is text-only, and the layers both run through
# ----------------------------------------------------------------------------------------------

class ImageSpecific(nn.Module):
    """Everything only the image tower owns (ARCHITECTURE §3, §5)."""

    def __init__(self, c):
        super().__init__()
        width, scale = c.vision_width, c.vision_width ** -0.5
        if c.early_specialization:
            self.stem = ConvStem(width, c.patch_size)
        else:
            self.patch_embed = nn.Conv2d(3, width, c.patch_size, c.patch_size, bias=False)
        self.class_token = nn.Parameter(scale * torch.randn(width))
        self.positions = nn.Parameter(scale * torch.randn(c.grid ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        if c.parallel_branch:
            self.branch = ParallelBranch(width, c.patch_size)
            sizes = [c.image_size // 2]
            for s in stage_strides(c.patch_size):
                sizes.append(sizes[-1] // s)
            self.adapters = nn.ModuleList(Adapter(ch, width, size // c.grid, c.adapter_depthwise)
                                          for ch, size in zip(conv_channels(width), sizes))
        self.ln_post = LayerNorm(width)
        self.projection = nn.Parameter(scale * torch.randn(width, c.embed_dim))


class TextSpecific(nn.Module):
    """Everything only the text tower owns (ARCHITECTURE §4): no ln_pre, pooled at EOT."""

    def __init__(self, c):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positions = nn.Parameter(torch.empty(c.context_length, c.text_width))
        if c.early_specialization:
            self.first_layer = ResidualAttentionBlock(c.text_width, c.text_heads)
        self.ln_final = LayerNorm(c.text_width)
        self.projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))


def trim_padding(tokens):
    """Drop the padding columns after the longest caption. Exact: text attention is causal and
    pooled at the EOT (largest) id, so later positions never reach the output. Needs the length on
    the host: do it on CPU before moving a batch to an accelerator."""
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]


class MSCLIP(nn.Module):
    """CLIP, MS-CLIP and MS-CLIP-S, selected by MSCLIPConfig (the presets name the paper's models)."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.image = ImageSpecific(c)
        self.text = TextSpecific(c)
        # With Early Specialization, layer 0 of each tower is modality-specific (stem / first_layer),
        # so the layers both modalities run through are 1..layers-1.
        self.first_shared_depth = 1 if c.early_specialization else 0
        self.layers = nn.ModuleList(ModalitySharedLayer(c) for _ in range(self.first_shared_depth, c.layers))
        # Official init: temperature e, not 1/0.07. Held with shape [1] (DeepSpeed 0.19.8 cannot
        # broadcast a 0-dim parameter, and its stage-0 clipping fails on one), stored with the
        # official shape [] in state dicts (see _save_to_state_dict).
        self.logit_scale = nn.Parameter(torch.ones(1))
        self.grad_checkpointing = False
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """ARCHITECTURE §8: trunc-normal 0.02 for linears and convs, xavier for packed q|k|v."""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, Attention):
            nn.init.xavier_uniform_(module.qkv.weight)
        if isinstance(module, TextSpecific):
            nn.init.trunc_normal_(module.positions, std=0.02)
            nn.init.trunc_normal_(module.projection, std=0.02)

    def _run_layer(self, layer, x, modality):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, x, modality, use_reentrant=False)
        return layer(x, modality)

    def encode_image(self, images, normalize=True):
        im, c = self.image, self.config
        images = images.to(im.positions.dtype)
        x = im.stem(images) if c.early_specialization else im.patch_embed(images)
        x = x.flatten(2).transpose(1, 2)                                   # row-major grid tokens
        x = torch.cat([im.class_token.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1) + im.positions.to(x.dtype)
        x = im.ln_pre(x)
        branch, stage = images, 0
        for depth, layer in enumerate(self.layers, start=self.first_shared_depth):
            if c.parallel_branch and depth in c.fusion_layers:
                branch = im.branch[stage](branch)
                x = im.adapters[stage](x, branch)
                stage += 1
            x = self._run_layer(layer, x, "image")
        x = im.ln_post(x[:, 0]) @ im.projection
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize=True, trim=True):
        """Text embeddings pooled at EOT. trim=True runs only up to the longest caption (exact,
        see trim_padding); on an accelerator pass tokens already trimmed on the host."""
        tx = self.text
        if tokens.shape[1] > self.config.context_length:
            raise ValueError(f"tokens have {tokens.shape[1]} positions, the model has {self.config.context_length}")
        if trim and tokens.device.type == "cpu":
            tokens = trim_padding(tokens)
        x = tx.token_embedding(tokens) + tx.positions[: tokens.shape[1]]
        if self.config.early_specialization:
            x = tx.first_layer(x, causal=True)
        for layer in self.layers:
            x = self._run_layer(layer, x, "text")
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]   # EOT = largest id
        x = tx.ln_final(x) @ tx.projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images, tokens):
        """Normalised image and text embeddings and exp(logit_scale), as OpenCLIP returns them."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp().reshape(())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The official layout: logit_scale has shape [] (ZeRO-3 leaves an empty partition alone)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "logit_scale"
        if destination[key].numel() == 1:
            destination[key] = destination[key].reshape(())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept the official shape [] and the parameter's own [1] (DeepSpeed's fp32 consolidation)."""
        key = prefix + "logit_scale"
        if key in state_dict and state_dict[key].numel() == 1:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def configure_optimizers(self, lr, weight_decay, lr_shared=None, weight_decay_shared=None, betas=(0.9, 0.98),
                             eps=1e-6):
        """AdamW with the groups MS-CLIP trained with (ARCHITECTURE §12): no decay on norms, biases,
        embeddings, class token and logit scale; the shared weight matrices in their own group
        (lr_shared, weight_decay_shared); shared biases and norms stay without decay."""
        lr_shared = lr if lr_shared is None else lr_shared
        weight_decay_shared = weight_decay if weight_decay_shared is None else weight_decay_shared
        groups = {name: [] for name in ("decay", "no_decay", "shared_decay", "shared_no_decay")}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            decays = p.ndim >= 2 and "token_embedding" not in name and not name.endswith("positions")
            shared = ".shared." in name
            groups[("shared_" if shared else "") + ("decay" if decays else "no_decay")].append(p)
        settings = {"decay": (lr, weight_decay), "no_decay": (lr, 0.0), "shared_decay": (lr_shared, weight_decay_shared),
                    "shared_no_decay": (lr_shared, 0.0)}
        param_groups = [{"name": n, "params": ps, "lr": settings[n][0], "weight_decay": settings[n][1]}
                        for n, ps in groups.items() if ps]
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps)

    def set_grad_checkpointing(self, enable=True):
        """Recompute the transformer layers in backward. BatchNorm modules stay outside the
        checkpointed regions, so running statistics are updated once per step."""
        self.grad_checkpointing = enable


# ----------------------------------------------------------------------------------------------
# The contrastive objective, across ranks
# ----------------------------------------------------------------------------------------------

class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_features(features, with_grad=False):
    """Concatenate `features` from every rank in rank order. Without grad, the local slot keeps the
    local tensor so gradients still flow to this rank's own samples (CLIP / OpenCLIP)."""
    if with_grad:
        return _AllGatherWithGrad.apply(features)
    out = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(out, features.detach().contiguous())
    out[dist.get_rank()] = features
    return torch.cat(out)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE of CLIP over the global batch (OpenCLIP's ClipLoss options).

    gather_with_grad: gradients also flow through the other ranks' features; with the usual
    averaging of gradients over ranks this equals one process holding the whole batch.
    local_loss: each rank scores only its own rows against all columns (less memory, same mean).
    """

    def __init__(self, gather_with_grad=False, local_loss=False):
        super().__init__()
        self.gather_with_grad, self.local_loss = gather_with_grad, local_loss

    def forward(self, image_features, text_features, logit_scale):
        n = image_features.shape[0]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        labels = torch.arange(n, device=image_features.device)
        if world == 1:
            logits_per_image = logit_scale * image_features @ text_features.T
            logits_per_text = logits_per_image.T
        else:
            all_images = gather_features(image_features, self.gather_with_grad)
            all_texts = gather_features(text_features, self.gather_with_grad)
            if self.local_loss:
                logits_per_image = logit_scale * image_features @ all_texts.T
                logits_per_text = logit_scale * text_features @ all_images.T
                labels = labels + n * dist.get_rank()
            else:
                logits_per_image = logit_scale * all_images @ all_texts.T
                logits_per_text = logits_per_image.T
                labels = torch.arange(all_images.shape[0], device=image_features.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


# ----------------------------------------------------------------------------------------------
# Tokenizer: OpenAI's CLIP BPE, byte for byte
# ----------------------------------------------------------------------------------------------

SOT, EOT = 49406, 49407


def _byte_alphabet():
    """The 256 bytes as printable unicode characters: printable Latin-1 bytes stand for themselves,
    the rest are shifted past 255. The order (printable first) fixes the first 256 token ids."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def clean_text(text):
    """ftfy, HTML unescaped twice, whitespace collapsed, lowercased: the official normalisation."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class LRUCache(OrderedDict):
    """A dict that keeps its `capacity` most recently used entries (picklable, unlike functools.lru_cache)."""

    def __init__(self, capacity):
        super().__init__()
        self.capacity = capacity

    def __reduce__(self):
        return type(self), (self.capacity,), None, None, iter(self.items())

    def lookup(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def store(self, key, value):
        self[key] = value
        if len(self) > self.capacity:
            self.popitem(last=False)
        return value


class Tokenizer:
    """The CLIP byte-pair encoder (merges = lines 1..48,894 of bpe_simple_vocab_16e6.txt.gz).

    Words and whole texts are cached, each cache bounded (LRU): over billions of web captions an
    unbounded cache grows without limit. The capacities change memory and speed, never the ids."""

    specials = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}

    pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                            regex.IGNORECASE)

    def __init__(self, bpe_path=None, word_cache_size=1 << 16, text_cache_size=1 << 17):
        path = Path(bpe_path) if bpe_path else ASSETS / "bpe_simple_vocab_16e6.txt.gz"
        if not path.exists():
            raise FileNotFoundError(f"BPE merges not found at {path}: set MSCLIP_ASSETS or pass bpe_path")
        merges = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        self.byte_to_char = _byte_alphabet()
        self.char_to_byte = {v: k for k, v in self.byte_to_char.items()}
        vocab = list(self.byte_to_char.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.merge_rank = {m: i for i, m in enumerate(merges)}
        self.word_cache, self.text_cache = LRUCache(word_cache_size), LRUCache(text_cache_size)

    def bpe(self, word):
        cached = self.specials.get(word) or self.word_cache.lookup(word)
        if cached is not None:
            return cached
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda pair: self.merge_rank.get(pair, math.inf))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return self.word_cache.store(word, " ".join(parts))

    def encode(self, text):
        """Token ids of `text` without SOT/EOT, as a tuple."""
        cached = self.text_cache.lookup(text)
        if cached is not None:
            return cached
        ids = []
        for word in self.pattern.findall(clean_text(text)):
            word = "".join(self.byte_to_char[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(word).split(" "))
        return self.text_cache.store(text, tuple(ids))

    def decode(self, ids):
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.char_to_byte[ch] for ch in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts, context_length=77, eot_when_truncated=True):
        """[N, context_length] ids: SOT, text, EOT, zero padding.

        Text longer than the context is cut; by default the last kept token is EOT (OpenCLIP), so
        pooling at EOT still reads the end of the caption. The official MS-CLIP eval cut without EOT
        (eot_when_truncated=False): zero-shot prompts never reach 77 tokens, so it makes no difference there.
        """
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT, *self.encode(text), EOT]
            if len(ids) > context_length:
                ids = ids[:context_length]
                if eot_when_truncated:
                    ids[-1] = EOT
            out[row, : len(ids)] = torch.tensor(ids)
        return out


@functools.lru_cache(maxsize=None)
def default_tokenizer():
    return Tokenizer()


def tokenize(texts, context_length=77, eot_when_truncated=True):
    """Tokenize a string or a list of strings to a LongTensor[N, context_length] (see Tokenizer.__call__)."""
    return default_tokenizer()(texts, context_length, eot_when_truncated)


# ----------------------------------------------------------------------------------------------
# Image preprocessing (ARCHITECTURE §11), without torchvision
# ----------------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageTransform:
    """PIL image -> normalised float tensor [3, size, size].

    Eval (the official zero-shot transform): bicubic resize of the shorter side to `size`, center
    crop. Train: random resized crop (area fraction `scale`, aspect 3/4..4/3, bicubic), its random
    draws taken from the `rng` passed in, so a sample's augmentation is a function of the caller's seed.
    The crop is cut, then resized as torchvision's RandomResizedCrop does (OpenCLIP's training
    transform), by torch's uint8 antialiased bicubic: PIL's filter (a = -0.5, the same support) in
    another rounding, within 2 levels of PIL's resize on photos and 3x faster on one core (tested;
    a data-loading worker's largest cost after the JPEG decode).
    """

    def __init__(self, size=224, train=False, scale=(0.9, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size, self.train, self.scale = size, train, scale
        self.mean = np.asarray(mean, dtype=np.float32) * 255
        self.inv_std = 1 / (np.asarray(std, dtype=np.float32) * 255)

    def __call__(self, image, rng=None):
        array = (self.pixels(image, rng).astype(np.float32) - self.mean) * self.inv_std
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    def pixels(self, image, rng=None, box=None):
        """The cropped and resized 8-bit image, uint8 [size, size, 3], before normalisation (data
        loaders ship this: a quarter of fp32's bytes). Train: `box` (left, top, right, bottom) is the
        random crop when drawn already (data.py draws it on a JPEG's full size before decoding it at a
        reduced scale)."""
        if image.mode != "RGB":  # convert() copies even an RGB image
            image = image.convert("RGB")
        if self.train:
            left, top, right, bottom = box or self._random_crop_box(image.size, rng or random.Random())
            crop = torch.from_numpy(np.array(np.asarray(image)[top:bottom, left:right]))  # a writable copy
            crop = crop.permute(2, 0, 1).unsqueeze(0)  # channels-last strides: torch's fast uint8 path
            crop = F.interpolate(crop, size=(self.size, self.size), mode="bicubic", antialias=True)
            return crop[0].permute(1, 2, 0).numpy()
        else:
            image = self._center_crop(self._resize_shorter(image))
        return np.asarray(image)

    def batch(self, images, rng=None):
        return torch.stack([self(image, rng) for image in images])

    def _resize_shorter(self, image):
        w, h = image.size
        if min(w, h) == self.size:
            return image
        long = int(self.size * max(w, h) / min(w, h))
        return image.resize((self.size, long) if w <= h else (long, self.size), Image.BICUBIC)

    def _center_crop(self, image):
        w, h = image.size
        left, top = int(round((w - self.size) / 2.0)), int(round((h - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))

    def _random_crop_box(self, image_size, rng):
        w, h = image_size
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                return (left, top, left + cw, top + ch)
        # Fallback (as torchvision): the central crop with the aspect ratio clamped to 3/4..4/3.
        cw, ch = (w, round(w * 4 / 3)) if w / h < 3 / 4 else (round(h * 4 / 3), h) if w / h > 4 / 3 else (w, h)
        left, top = (w - cw) // 2, (h - ch) // 2
        return (left, top, left + cw, top + ch)


# ----------------------------------------------------------------------------------------------
# Checkpoints: this project's own, and the released (official) MS-CLIP-S state dicts
# ----------------------------------------------------------------------------------------------

_BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def official_key_map(config):
    """(official key, our key) pairs in the official state-dict order. A shared tensor appears
    under two official keys (visual.* and transformer.*): the official code ties by object identity."""
    c, pairs = config, []

    def add(official, ours, names):
        pairs.extend((f"{official}.{o}", f"{ours}.{m}") for o, m in names)

    weight, weight_bias = [("weight", "weight")], [("weight", "weight"), ("bias", "bias")]

    def conv_bn(conv, bn, ours):
        add(conv, ours + ".conv", weight)
        add(bn, ours + ".bn", [(n, n) for n in _BN])

    def block(official, ours):  # ours: part name -> our module path
        add(official + ".attn", ours["attn"], [("in_proj_weight", "qkv.weight"), ("in_proj_bias", "qkv.bias"),
                                               ("out_proj.weight", "out.weight"), ("out_proj.bias", "out.bias")])
        add(official + ".ln_1", ours["ln_1"], weight_bias)
        add(official + ".mlp", ours["mlp"], [("c_fc.weight", "expand.weight"), ("c_fc.bias", "expand.bias"),
                                             ("c_proj.weight", "project.weight"), ("c_proj.bias", "project.bias")])
        add(official + ".ln_2", ours["ln_2"], weight_bias)

    def shared_layer(depth, modality):
        layer = f"layers.{depth - first}"
        is_shared = {"attn": c.share_attention, "mlp": c.share_mlp, "ln_1": c.share_layernorms, "ln_2": c.share_layernorms}
        return {part: f"{layer}.{'shared' if s else modality}.{part}" for part, s in is_shared.items()}

    if not c.adapter_depthwise:
        raise ValueError("the official code has no adapters without depthwise convs (Table 6 ablation)")
    first = 1 if c.early_specialization else 0
    pairs += [("positional_embedding", "text.positions"), ("text_projection", "text.projection"),
              ("logit_scale", "logit_scale"), ("visual.class_embedding", "image.class_token"),
              ("visual.positional_embedding", "image.positions"), ("visual.proj", "image.projection")]
    if not c.early_specialization:
        add("visual.conv1", "image.patch_embed", weight)
    add("visual.ln_pre", "image.ln_pre", weight_bias)
    stem = "visual.transformer.resblocks.0"
    if c.early_specialization:
        conv_bn(f"{stem}.conv1", f"{stem}.bn1", "image.stem.first")
        for i in range(4):
            official = f"{stem}.resnet_stage.conv_{i}"
            conv_bn(f"{official}.conv1", f"{official}.bn1", f"image.stem.stages.{i}.conv")
            conv_bn(f"{official}.downsample.0", f"{official}.downsample.1", f"image.stem.stages.{i}.shortcut")
        add(f"{stem}.last_conv", "image.stem.last", weight)
    for depth in range(first, c.layers):
        block(f"visual.transformer.resblocks.{depth}", shared_layer(depth, "image"))
    if c.parallel_branch:
        branch = "visual.transformer.parallel_branch_v"
        conv_bn(f"{branch}.0.conv", f"{branch}.0.bn", "image.branch.0.0")
        for j in range(1, 5):
            official, ours = f"{branch}.{j}.resnet_stage.conv_0", f"image.branch.{j}"
            for conv, bn, mine in [("conv1", "bn1", "reduce"), ("conv2", "bn2", "conv"), ("conv3", "bn3", "expand"),
                                   ("residual_conv", "residual_bn", "shortcut")]:
                conv_bn(f"{official}.{conv}", f"{official}.{bn}", f"{ours}.{mine}")
        for j in range(5):
            official, ours = f"visual.transformer.parallel_lateral_adapter.{j}", f"image.adapters.{j}"
            conv_bn(f"{official}.top2bottom_dw_conv.conv", f"{official}.top2bottom_dw_conv.bn", f"{ours}.branch_pool")
            add(f"{official}.top2bottom_pw_conv.conv", f"{ours}.branch_proj", weight)
            conv_bn(f"{official}.bottom_dw_conv.conv", f"{official}.bottom_dw_conv.bn", f"{ours}.token_mix")
            add(f"{official}.ln_adapt", f"{ours}.norm", weight_bias)
    add("visual.ln_post", "image.ln_post", weight_bias)
    if c.early_specialization:
        block("transformer.resblocks.0", {part: f"text.first_layer.{part}" for part in ("attn", "ln_1", "mlp", "ln_2")})
    for depth in range(first, c.layers):
        block(f"transformer.resblocks.{depth}", shared_layer(depth, "text"))
    add("token_embedding", "text.token_embedding", weight)
    add("ln_final", "text.ln_final", weight_bias)
    return pairs


def config_from_official(state_dict):
    """Read the architecture off an official state dict's shapes (B/32: 50 image positions, B/16: 197)."""
    def shape(key):
        if key not in state_dict:
            raise ValueError(f"not an official MS-CLIP state dict: key {key!r} is missing")
        return tuple(state_dict[key].shape)

    positions, width = shape("visual.positional_embedding")
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ValueError(f"visual.positional_embedding has {positions} rows: not 1 + a square grid")
    text_width = shape("token_embedding.weight")[1]
    layers = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("transformer.resblocks."))
    early = "visual.transformer.resblocks.0.conv1.weight" in state_dict
    first = 1 if early else 0

    def tied(part):
        key = f"transformer.resblocks.{first}.{part}"
        return text_width == width and key in state_dict and torch.equal(state_dict[key], state_dict["visual." + key])

    patch_size = 32 if grid == 7 else 16 if grid == 14 else None
    if patch_size is None:
        raise ValueError(f"visual.positional_embedding {positions}x{width}: expected a 7x7 (B/32) or 14x14 (B/16) grid")
    return MSCLIPConfig(embed_dim=shape("visual.proj")[1], image_size=grid * patch_size, patch_size=patch_size,
                        vision_width=width, vision_heads=width // 64, text_width=text_width, text_heads=text_width // 64,
                        layers=layers, vocab_size=shape("token_embedding.weight")[0],
                        context_length=shape("positional_embedding")[0], share_attention=tied("attn.in_proj_weight"),
                        share_mlp=tied("mlp.c_fc.weight"), early_specialization=early,
                        parallel_branch=any(k.startswith("visual.transformer.parallel_branch_v.") for k in state_dict))


def _load_exact(model, state_dict):
    """load_state_dict(strict) with an error naming the first key that does not fit."""
    expected = model.state_dict()
    if state_dict.get("logit_scale") is not None and tuple(state_dict["logit_scale"].shape) == (1,):
        state_dict = {**state_dict, "logit_scale": state_dict["logit_scale"].reshape(())}  # DeepSpeed's fp32 export
    for key, tensor in expected.items():
        if key not in state_dict:
            raise ValueError(f"checkpoint does not fit {model.config}: key {key!r} is missing")
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint does not fit: key {key!r} has shape {tuple(state_dict[key].shape)}, "
                             f"the model expects {tuple(tensor.shape)}")
    for key in state_dict:
        if key not in expected:
            raise ValueError(f"checkpoint does not fit: unexpected key {key!r}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()})
    return model


def from_official_state_dict(state_dict):
    """An MSCLIP holding an official state dict's weights, every key consumed and both copies of
    every shared tensor checked equal."""
    config = config_from_official(state_dict)
    model = MSCLIP(config)
    expected, ours, pairs = model.state_dict(), {}, official_key_map(config)
    for official, mine in pairs:
        if official not in state_dict:
            raise ValueError(f"official state dict does not fit {config}: key {official!r} is missing")
        tensor = state_dict[official]
        if tuple(tensor.shape) != tuple(expected[mine].shape):
            raise ValueError(f"official key {official!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected[mine].shape)}")
        if mine in ours and not torch.equal(ours[mine], tensor):
            twin = next(o for o, m in pairs if m == mine)
            raise ValueError(f"shared tensor {official!r} differs from its twin {twin!r}")
        ours[mine] = tensor
    used = {official for official, _ in pairs}
    unused = [k for k in state_dict if k not in used]
    if unused:
        raise ValueError(f"official state dict has a key this architecture does not use: {unused[0]!r}")
    return _load_exact(model, ours)


def export_official_state_dict(model):
    """The official layout (key order, names, duplicated shared tensors) of `model`'s weights."""
    ours = model.state_dict()
    return OrderedDict((official, ours[mine]) for official, mine in official_key_map(model.config))


def save_checkpoint(model, path):
    """Write weights + config atomically (temp file, then rename): a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"msclip_config": asdict(model.config), "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(source, map_location="cpu"):
    """An MSCLIP in eval mode from a path or a state dict: this project's checkpoints (save_checkpoint,
    train_ds.py's export) or a released MS-CLIP-S state dict. Files load with weights_only=True."""
    if isinstance(source, (str, os.PathLike)):
        if os.path.isdir(source):
            raise ValueError(f"{source} is a folder (a train_ds.py checkpoint?): export it to one file first, "
                             f"python train_ds.py --checkpoint {source} --export msclip.pt")
        source = torch.load(source, map_location=map_location, weights_only=True)
    if not isinstance(source, dict):
        raise ValueError(f"expected a state dict (a dict of tensors), got {type(source).__name__}")
    if "msclip_config" in source:
        names = {f.name for f in fields(MSCLIPConfig)}
        config = MSCLIPConfig(**{k: v for k, v in source["msclip_config"].items() if k in names})
        model = _load_exact(MSCLIP(config), source["state_dict"])
    elif "visual.positional_embedding" in source:
        model = from_official_state_dict(source)
    else:
        key = next(iter(source), None)
        raise ValueError(f"not an MS-CLIP checkpoint: no 'msclip_config' and no official keys (first key: {key!r})")
    return model.eval()
