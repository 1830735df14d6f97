"""Independent test reference: the OFFICIAL MS-CLIP-S module structure in plain PyTorch.

Written only from ``shared/ARCHITECTURE.md`` (spec of Hxyou/MSCLIP ``clip_openai_pe_res_v1.py``),
deliberately in the official style and NOT optimised:

* sequence-first transformer (L, B, D), attention through ``torch.nn.MultiheadAttention``;
* hand-written TF-style LayerNorm (fp32 statistics, biased variance, eps 1e-12 inside the sqrt);
* weight sharing by object identity (text block k reuses visual block k's ``attn.in_proj_weight``,
  ``attn.in_proj_bias``, ``attn.out_proj`` and ``mlp`` objects, k = 1..layers-1), so that
  ``state_dict()`` lists every shared tensor twice, exactly like the released checkpoints;
* module / parameter registration order chosen so ``state_dict()`` reproduces the official key
  order (see ``tests/reference/official_keys_b32.txt`` / ``official_keys_b16.txt``).

It must not import or depend on ``msclip.py``: tests use it to check the product model.

API::

    build_official_msclip_s(patch_size=32, width=768, heads=12, layers=12, image_size=224,
                            embed_dim=512, vocab_size=49408, context_length=77) -> nn.Module
    model.encode_image(images[B,3,H,W])      -> raw image embeddings [B, embed_dim] (not normalised)
    model.encode_text(tokens[B, context_len]) -> raw text embeddings  [B, embed_dim] (not normalised)
    model(images, tokens)                    -> (logits_per_image, logits_per_text), exp(logit_scale)*cos
    randomize_batchnorm_stats(model, seed=0)  # random but valid BN running stats + affine params

The returned model is in eval mode (BatchNorm uses running statistics, as in the official eval code).
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["build_official_msclip_s", "randomize_batchnorm_stats", "OfficialMSCLIPS"]

# Resblocks (index 0 = conv stem) at whose INPUT parallel stage j / adapter j run, j = 0..4.
LATERAL_LAYERS = (2, 4, 6, 8, 10)


# ----------------------------------------------------------------------------------------------
# shared building blocks
# ----------------------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """TF-style LayerNorm: eps inside the sqrt, biased variance, statistics in fp32."""

    def __init__(self, hidden_size, eps=1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        orig_type = x.dtype
        x = x.float()
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.variance_epsilon)
        return self.weight * x.to(orig_type) + self.bias


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)). Input/output (L, B, D)."""

    def __init__(self, d_model, n_head, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)
        # plain attribute (NOT a buffer): the official state dict holds no mask
        self.attn_mask = attn_mask

    def attention(self, x):
        mask = self.attn_mask
        if mask is not None:
            mask = mask.to(dtype=x.dtype, device=x.device)
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


def share_block(text_block, visual_block):
    """Make text_block use visual_block's attn in_proj / out_proj / mlp objects (ln_1/ln_2 stay)."""
    # assignment to existing names keeps the registration order (and so the state_dict order)
    text_block.attn.in_proj_weight = visual_block.attn.in_proj_weight
    text_block.attn.in_proj_bias = visual_block.attn.in_proj_bias
    text_block.attn.out_proj = visual_block.attn.out_proj
    text_block.mlp = visual_block.mlp


# ----------------------------------------------------------------------------------------------
# vision: conv stem ("early specialization", resblocks.0)
# ----------------------------------------------------------------------------------------------
def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)


class BasicBlockV0(nn.Module):
    """'basic_v0': ReLU(bn1(conv3x3_s(x)) + downsample(x)), downsample = conv1x1_s + BN."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)  # eps 1e-5
        self.relu = nn.ReLU(inplace=False)
        self.downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        out = out + self.downsample(x)
        return self.relu(out)


class ResStage(nn.Module):
    """Container whose children are named conv_0, conv_1, ... (official naming)."""

    def __init__(self, blocks):
        super().__init__()
        for i, b in enumerate(blocks):
            self.add_module("conv_%d" % i, b)
        self.num = len(blocks)

    def forward(self, x):
        for i in range(self.num):
            x = getattr(self, "conv_%d" % i)(x)
        return x


class EarlyConvRes(nn.Module):
    """Stem: conv1 3x3 s2 (3->w/16) + bn1 + ReLU, 4 basic_v0 stages, last_conv 1x1 (w->w)."""

    def __init__(self, width, strides):
        super().__init__()
        chans = [width // 16, width // 8, width // 4, width // 2, width]
        self.conv1 = nn.Conv2d(3, chans[0], kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        self.relu = nn.ReLU(inplace=False)
        self.resnet_stage = ResStage([BasicBlockV0(chans[i], chans[i + 1], strides[i]) for i in range(4)])
        self.last_conv = nn.Conv2d(width, width, kernel_size=1, stride=1, padding=0, bias=False)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.resnet_stage(x)
        return self.last_conv(x)


# ----------------------------------------------------------------------------------------------
# vision: parallel conv branch + lateral (T2B) adapters
# ----------------------------------------------------------------------------------------------
class ConvBNReLU(nn.Module):
    """Parallel branch stage 0: conv 3x3 s2 p1 (3 -> w/16) + bn (eps 1e-5) + ReLU."""

    def __init__(self, in_c, out_c):
        super().__init__()
        self.conv = nn.Conv2d(in_c, out_c, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_c, eps=1e-5)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Branch bottleneck (all BNs eps 1e-6), mid = out/2, projection shortcut."""

    def __init__(self, in_c, out_c, stride):
        super().__init__()
        mid = out_c // 2
        self.conv1 = nn.Conv2d(in_c, mid, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(mid, eps=1e-6)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid, eps=1e-6)
        self.conv3 = nn.Conv2d(mid, out_c, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_c, eps=1e-6)
        self.residual_conv = nn.Conv2d(in_c, out_c, kernel_size=1, stride=stride, padding=0, bias=False)
        self.residual_bn = nn.BatchNorm2d(out_c, eps=1e-6)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.residual_bn(self.residual_conv(x))
        return self.relu(out + shortcut)


class BranchResStage(nn.Module):
    """Parallel branch stage j >= 1: resnet_stage.conv_0 = one Bottleneck."""

    def __init__(self, in_c, out_c, stride):
        super().__init__()
        self.resnet_stage = ResStage([Bottleneck(in_c, out_c, stride)])

    def forward(self, x):
        return self.resnet_stage(x)


class DWConvBN(nn.Module):
    """Depthwise conv + BN (eps 1e-5). Names: conv, bn."""

    def __init__(self, channels, kernel_size, stride, padding):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=kernel_size, stride=stride,
                              padding=padding, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels, eps=1e-5)

    def forward(self, x):
        return self.bn(self.conv(x))


class PWConv(nn.Module):
    """1x1 conv, no BN / activation. Name: conv."""

    def __init__(self, in_c, out_c):
        super().__init__()
        self.conv = nn.Conv2d(in_c, out_c, kernel_size=1, stride=1, padding=0, bias=False)

    def forward(self, x):
        return self.conv(x)


class LateralAdapter(nn.Module):
    """T2B adapter: branch map p_j + tokens x (L, B, D) -> new tokens (replaces the stream).

    t = pw(bn(dw_K(p_j))) on the token grid; g = bn(dw3x3(grid tokens));
    new = ln_adapt([cls + cls ; g + t]).
    """

    def __init__(self, in_c, width, kernel):
        super().__init__()
        self.top2bottom_dw_conv = DWConvBN(in_c, kernel_size=kernel, stride=kernel, padding=0)
        self.top2bottom_pw_conv = PWConv(in_c, width)
        self.bottom_dw_conv = DWConvBN(width, kernel_size=3, stride=1, padding=1)
        self.ln_adapt = LayerNorm(width)

    def forward(self, p, x):
        L, B, D = x.shape
        t = self.top2bottom_pw_conv(self.top2bottom_dw_conv(p))         # B, D, h, w
        h, w = t.shape[-2:]
        if h * w != L - 1:
            raise ValueError("adapter: branch map lands on %dx%d, tokens %d" % (h, w, L - 1))
        t = t.flatten(2).permute(2, 0, 1)                                  # hw, B, D
        cls = x[:1]                                                        # 1, B, D
        g = x[1:].permute(1, 2, 0).reshape(B, D, h, w)                     # row-major grid
        g = self.bottom_dw_conv(g).flatten(2).permute(2, 0, 1)             # hw, B, D
        # PRALLEL_T2B_USECLS: CLS slot of t is the transformer's own CLS -> cls + cls
        new = torch.cat([cls + cls, g + t], dim=0)
        return self.ln_adapt(new)


# ----------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------
class VisualTransformer(nn.Module):
    """visual.transformer: resblocks (0 = stem, 1.. = attn), parallel_branch_v, parallel_lateral_adapter."""

    def __init__(self, width, layers, heads, stem_strides, branch_channels, branch_strides, adapter_kernels):
        super().__init__()
        self.width = width
        self.layers = layers
        blocks = [EarlyConvRes(width, stem_strides)]
        blocks += [ResidualAttentionBlock(width, heads) for _ in range(layers - 1)]
        self.resblocks = nn.ModuleList(blocks)
        branch = [ConvBNReLU(3, branch_channels[0])]
        for j in range(1, 5):
            branch.append(BranchResStage(branch_channels[j - 1], branch_channels[j], branch_strides[j]))
        self.parallel_branch_v = nn.ModuleList(branch)
        self.parallel_lateral_adapter = nn.ModuleList(
            [LateralAdapter(branch_channels[j], width, adapter_kernels[j]) for j in range(5)])

    def forward(self, x, image):
        """x: tokens (L, B, D) after ln_pre; image: the normalised input image (branch input)."""
        p = image
        for k in range(1, self.layers):
            if k in LATERAL_LAYERS:
                j = LATERAL_LAYERS.index(k)
                p = self.parallel_branch_v[j](p)
                x = self.parallel_lateral_adapter[j](p, x)
            x = self.resblocks[k](x)
        return x


class TextTransformer(nn.Module):
    """top-level ``transformer``: resblocks 0..layers-1, causal mask."""

    def __init__(self, width, layers, heads, attn_mask):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x):
        for blk in self.resblocks:
            x = blk(x)
        return x


class VisualModel(nn.Module):
    def __init__(self, image_size, patch_size, width, layers, heads, output_dim):
        super().__init__()
        if patch_size == 32:
            strides = (2, 2, 2, 2)
        elif patch_size == 16:
            strides = (2, 2, 2, 1)
        else:
            raise ValueError("patch_size must be 16 or 32, got %r" % (patch_size,))
        if width % 16 != 0:
            raise ValueError("width must be a multiple of 16 (conv channels start at width/16)")
        channels = [width // 16, width // 8, width // 4, width // 2, width]

        def out_size(n, s):  # 3x3 pad 1 (or 1x1 pad 0) conv with stride s
            return (n - 1) // s + 1

        # stem: conv1 s2, then res stages
        n = out_size(image_size, 2)
        for s in strides:
            n = out_size(n, s)
        grid = n
        if grid * patch_size != image_size:
            raise ValueError("image_size %d not divisible into a %d-patch grid" % (image_size, patch_size))
        # branch: stage 0 s2, stages 1..4 with the stem's strides
        branch_strides = (2,) + tuple(strides)
        sizes = []
        n = image_size
        for s in branch_strides:
            n = out_size(n, s)
            sizes.append(n)
        kernels = []
        for sz in sizes:
            if sz % grid != 0:
                raise ValueError("branch map %d not a multiple of token grid %d" % (sz, grid))
            kernels.append(sz // grid)
        self.grid_size = grid
        self.branch_sizes = tuple(sizes)
        self.adapter_kernels = tuple(kernels)
        self.input_resolution = image_size
        self.output_dim = output_dim

        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.ln_pre = LayerNorm(width)
        self.transformer = VisualTransformer(width, layers, heads, strides, channels, branch_strides, kernels)
        self.ln_post = LayerNorm(width)

    def forward(self, image):
        x = self.transformer.resblocks[0](image)                           # B, D, h, w
        B, D = x.shape[0], x.shape[1]
        x = x.reshape(B, D, -1).permute(0, 2, 1)                           # B, hw, D (row-major)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(B, 1, D, dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)                                             # L, B, D
        x = self.transformer(x, image)
        x = x.permute(1, 0, 2)                                             # B, L, D
        x = self.ln_post(x[:, 0, :])
        return x @ self.proj


# ----------------------------------------------------------------------------------------------
# the CLIP model
# ----------------------------------------------------------------------------------------------
class OfficialMSCLIPS(nn.Module):
    def __init__(self, embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                 vision_patch_size=32, context_length=77, vocab_size=49408,
                 transformer_width=768, transformer_heads=12, transformer_layers=12):
        super().__init__()
        if transformer_width != vision_width or transformer_layers != vision_layers:
            raise ValueError("MS-CLIP-S shares blocks: text and vision width/layers must match")
        if vision_layers < LATERAL_LAYERS[-1] + 1:
            raise ValueError("layers must be >= %d (lateral adapters feed resblocks %s)"
                             % (LATERAL_LAYERS[-1] + 1, LATERAL_LAYERS))
        self.context_length = context_length
        self.vocab_size = vocab_size

        # own parameters first (state_dict order: positional_embedding, text_projection, logit_scale)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))

        self.visual = VisualModel(image_resolution, vision_patch_size, vision_width, vision_layers,
                                  transformer_heads, embed_dim)
        self.transformer = TextTransformer(transformer_width, transformer_layers, transformer_heads,
                                           self.build_attention_mask())
        # N_LAYERS = 1, SHARE_BOTTOM_LAYER = False: share blocks i >= 1 (same index on both sides)
        for i in range(1, transformer_layers):
            share_block(self.transformer.resblocks[i], self.visual.transformer.resblocks[i])
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.ln_final = LayerNorm(transformer_width)

        self.initialize_parameters()

    def build_attention_mask(self):
        mask = torch.empty(self.context_length, self.context_length)
        mask.fill_(float("-inf"))
        mask.triu_(1)  # -inf strictly above the diagonal, 0 elsewhere
        return mask

    @torch.no_grad()
    def initialize_parameters(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.MultiheadAttention):
                nn.init.xavier_uniform_(m.in_proj_weight)
                nn.init.zeros_(m.in_proj_bias)
        # token_embedding: nn.Embedding default N(0, 1), left as is
        nn.init.trunc_normal_(self.positional_embedding, std=0.02, a=-2.0, b=2.0)
        nn.init.trunc_normal_(self.text_projection, std=0.02, a=-2.0, b=2.0)
        # visual class/pos embedding and proj: width^-0.5 * randn (set in VisualModel.__init__)
        self.logit_scale.fill_(1.0)

    @property
    def dtype(self):
        return self.visual.positional_embedding.dtype

    def encode_image(self, image):
        return self.visual(image.type(self.dtype))

    def encode_text(self, text):
        if text.dim() != 2 or text.shape[1] != self.context_length:
            raise ValueError("text tokens must have shape [B, %d], got %s"
                             % (self.context_length, tuple(text.shape)))
        x = self.token_embedding(text).type(self.dtype)                    # B, L, D
        x = x + self.positional_embedding.type(self.dtype)
        x = x.permute(1, 0, 2)                                             # L, B, D
        x = self.transformer(x)
        x = x.permute(1, 0, 2)                                             # B, L, D
        x = self.ln_final(x).type(self.dtype)
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        return x @ self.text_projection

    def forward(self, image, text):
        image_features = self.encode_image(image)
        text_features = self.encode_text(text)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        logit_scale = self.logit_scale.exp()
        logits_per_image = logit_scale * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def build_official_msclip_s(patch_size=32, width=768, heads=12, layers=12, image_size=224,
                            embed_dim=512, vocab_size=49408, context_length=77):
    """Build the official-structure MS-CLIP-S (random init per spec §8), returned in eval mode."""
    model = OfficialMSCLIPS(embed_dim=embed_dim, image_resolution=image_size, vision_layers=layers,
                            vision_width=width, vision_patch_size=patch_size,
                            context_length=context_length, vocab_size=vocab_size,
                            transformer_width=width, transformer_heads=heads,
                            transformer_layers=layers)
    return model.eval()


@torch.no_grad()
def randomize_batchnorm_stats(model, seed=0):
    """Give every BatchNorm2d random but valid running stats and affine params (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))          # in [0.5, 1.5)
            if m.affine:
                m.weight.copy_(1.0 + 0.1 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return model
