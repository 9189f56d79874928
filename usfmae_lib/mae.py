"""The masked autoencoder (MAE) of USF-MAE: model, named configs, loading checkpoints, encoder export.

`MaskedAutoencoderViT` computes what the reference MAE (facebookresearch/mae, `models_mae.py`,
He et al. 2021) computes, given the same weights, images and per-patch noise, and uses its
state-dict key names, so reference checkpoints (`{'model': ...}`) and the released USF-MAE
weights (a bare state dict) load with strict=True. It is re-stated here on modern timm blocks
(`timm.models.vision_transformer.Block`, whose attention calls F.scaled_dot_product_attention),
because the reference pins timm 0.3.2 and no longer imports (see docs/mae.md).

    model = build_model("mae_vit_tiny_patch16_dec128d2b", img_size=64)
    loss, pred, mask = model(imgs, mask_ratio=0.25)   # imgs [N, 3, H, W], ImageNet-normalised
    model = load_model("checkpoint-last.pth")           # ours, reference, or released weights
    export_encoder(model, "encoder.safetensors")        # timm VisionTransformer key layout

Shapes: N images, L = (H/p)^2 patches of p*p*3 values, D encoder width, Dd decoder width,
K = int(L * (1 - mask_ratio)) visible patches.

Reading and writing checkpoint files (safely: nothing pickled ever runs) is `checkpoints.py`'s;
what their tensors mean for this model (its config, its position tables) is here.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import Block

from . import UsfmaeError, checkpoints

# ============================================================================ named configs
# name -> constructor kwargs (img_size is chosen per use: 224 for the paper, 32-112 on a CPU).
# Head counts do not change any tensor shape, so a wrong one loads silently and computes
# something else: the released USF-MAE weights come from the reference
# `mae_vit_base_patch16_dec512d8b`, whose decoder has 16 heads (the paper's text says 8).
CONFIGS = {
    "mae_vit_base_patch16_dec512d8b": dict(  # the paper: ViT-B/16 encoder, 512 x 8 decoder
        patch_size=16, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0),
    "mae_vit_small_patch16_dec256d4b": dict(  # ViT-S/16 encoder, 256 x 4 decoder
        patch_size=16, embed_dim=384, depth=12, num_heads=6,
        decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8, mlp_ratio=4.0),
    "mae_vit_tiny_patch16_dec128d2b": dict(  # ViT-Ti/16 encoder, 128 x 2 decoder: the CPU default
        patch_size=16, embed_dim=192, depth=12, num_heads=3,
        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0),
}
PAPER_CONFIG = "mae_vit_base_patch16_dec512d8b"
CPU_CONFIG = "mae_vit_tiny_patch16_dec128d2b"

# every reference config builds its LayerNorms with eps 1e-6
norm_layer_eps6 = partial(nn.LayerNorm, eps=1e-6)


# ============================================================================ position embeddings
def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2D sin-cos table [grid_size**2 (+1), embed_dim], exactly as the reference builds it.

    Patch (row i, col j) sits at index i * grid_size + j. The first half of the channels encodes
    the column j, the second half the row i (the reference meshgrids (w, h) and names them h, w);
    each half is [sin(pos * omega), cos(pos * omega)] with omega = 1 / 10000^(k / (D/4)).
    Computed in float64 like the reference's numpy, then cast. The cls row (if any) is zero.
    """
    if embed_dim % 4:
        raise UsfmaeError(f"embed_dim {embed_dim} must be a multiple of 4 for 2D sin-cos position embeddings")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)  # [D/4]
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float32),
                             np.arange(grid_size, dtype=np.float32), indexing="ij")

    def encode(pos):  # [G*G] -> [G*G, D/2]
        angles = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1)  # [G*G, D]
    if cls_token:
        table = np.concatenate([np.zeros([1, embed_dim]), table], axis=0)
    return torch.from_numpy(table).float()


# ============================================================================ model
POS_EMBED = ("fixed", "learnable")  # position tables: sin-cos never trained, or sin-cos at the start and trained


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a ViT encoder and a light ViT decoder (reference MAE semantics).

    Defaults are the paper's model (ViT-B/16 at 224 px, decoder 512 x 8 with 16 heads) with
    LayerNorm eps 1e-6, as every reference config passes it (the reference class itself defaults
    to ViT-L and eps 1e-5, which no released checkpoint uses).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3,
                 embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_layer=norm_layer_eps6, norm_pix_loss=False, pos_embed="fixed"):
        super().__init__()
        if pos_embed not in POS_EMBED:
            raise UsfmaeError(f"pos_embed must be one of {', '.join(POS_EMBED)}, got {pos_embed!r}")
        # fixed: the sin-cos tables are never trained (reference MAE, official code); learnable: they
        # start as the same tables and are trained (the paper's text: "learnable positional encodings")
        learnable = pos_embed == "learnable"
        # --- encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # a parameter either way, so it is in the state dict under the reference name
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=learnable)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        # --- decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=learnable)  # "again added" (2.3): the same kind
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self):
        """The reference initialisation: sin-cos tables, xavier-uniform linears and patch
        projection (as a linear), normal(0.02) cls and mask tokens, LayerNorm 1/0."""
        grid = self.patch_embed.grid_size[0]
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], grid).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ patches
    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def patchify(self, imgs):
        """[N, C, H, W] -> [N, L, p*p*C], patches row-major, values ordered (p, q, c)."""
        p = self.patch_size
        n, c, hh, ww = imgs.shape
        if hh != ww or hh % p:
            raise UsfmaeError(f"images must be square with a side divisible by {p}; got {hh}x{ww}")
        h = w = hh // p
        x = imgs.reshape(n, c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, x):
        """[N, L, p*p*C] -> [N, C, H, W], the inverse of patchify."""
        p = self.patch_size
        n, length, values = x.shape
        h = w = int(round(length ** 0.5))
        c = values // (p * p)
        if h * w != length or c * p * p != values:
            raise UsfmaeError(f"cannot unpatchify {tuple(x.shape)}: L must be a square and the last dim p*p*C")
        x = x.reshape(n, h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, c, h * p, w * p)

    def random_masking(self, x, mask_ratio, noise=None):
        """Keep a random subset of int(L * (1 - mask_ratio)) tokens per image.

        x [N, L, D]; noise [N, L] (default uniform): the tokens with the smallest noise are kept.
        Returns x_masked [N, K, D] (kept tokens in ascending-noise order), mask [N, L] (1 removed,
        0 kept, original patch order) and ids_restore [N, L] (undoes the shuffle).
        """
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)  # [N, L] in [0, 1)
        elif noise.shape != (n, length):
            raise UsfmaeError(f"noise must have shape [N, L] = [{n}, {length}]; got {list(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)        # ascending: small is keep
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L]
        ids_keep = ids_shuffle[:, :len_keep]             # [N, K]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # [N, K, D]
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)        # [N, L] back in patch order
        return x_masked, mask, ids_restore

    # ------------------------------------------------------------------ forward
    def encoder_tokens(self, x, mask_ratio, noise=None):
        """imgs [N, C, H, W] -> the encoder's input [N, 1+K, D] (cls, then the visible patches'
        tokens with their position embeddings, in noise order), mask [N, L], ids_restore [N, L]."""
        x = self.patch_embed(x)                            # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # [N, K, D]
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # [N, 1+K, D]
        return x, mask, ids_restore

    def forward_encoder(self, x, mask_ratio, noise=None):
        """imgs [N, C, H, W] -> latent [N, 1+K, D] (cls first, after `norm`), mask, ids_restore.

        With mask_ratio 0 the tokens still come out in noise order, as in the reference; pass
        noise = arange(L) to keep patch order.
        """
        x, mask, ids_restore = self.encoder_tokens(x, mask_ratio, noise)  # [N, 1+K, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def decoder_tokens(self, x, ids_restore):
        """latent [N, 1+K, D] -> the decoder's input [N, 1+L, Dd]: cls, then every patch position in
        patch order, the encoded visible tokens where they were and the shared mask token at each
        hidden one, all with the decoder's position embeddings."""
        x = self.decoder_embed(x)                          # [N, 1+K, Dd]
        n, _, dim = x.shape
        mask_tokens = self.mask_token.expand(n, ids_restore.shape[1] + 1 - x.shape[1], -1)  # [N, L-K, Dd]
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, Dd] shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))  # patch order
        x = torch.cat([x[:, :1, :], x_], dim=1)            # [N, 1+L, Dd]
        return x + self.decoder_pos_embed

    def forward_decoder(self, x, ids_restore):
        """latent [N, 1+K, D] -> pred [N, L, p*p*C] (cls dropped)."""
        x = self.decoder_tokens(x, ids_restore)            # [N, 1+L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))        # [N, 1+L, p*p*C]
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error per patch, averaged over the removed patches only.

        imgs [N, C, H, W]; pred [N, L, p*p*C]; mask [N, L] (1 removed). With norm_pix_loss each
        target patch is normalised by its own mean and (unbiased var + 1e-6)^0.5.
        """
        target = self.patchify(imgs)                       # [N, L, p*p*C]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)         # [N, L] per-patch MSE
        return (loss * mask).sum() / mask.sum()            # removed patches only

    def forward(self, imgs, mask_ratio=0.25, noise=None):
        """imgs [N, C, H, W] -> (loss [], pred [N, L, p*p*C], mask [N, L]). The paper masks 25%."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def build_model(name: str = CPU_CONFIG, img_size: int = 224, **overrides) -> MaskedAutoencoderViT:
    """Build a named config (see CONFIGS) at img_size; overrides replace any constructor kwarg."""
    if name not in CONFIGS:
        raise UsfmaeError(f"unknown MAE config {name!r}; valid names: {', '.join(CONFIGS)}")
    kwargs = dict(CONFIGS[name], img_size=img_size)
    kwargs.update(overrides)
    return MaskedAutoencoderViT(**kwargs)


# ============================================================================ loading a checkpoint
def infer_config(state: dict, path) -> str:
    """The named config whose shapes fit `state` (head counts cannot be read from shapes)."""
    try:
        d = state["pos_embed"].shape[-1]
        dims = dict(
            patch_size=state["patch_embed.proj.weight"].shape[-1], embed_dim=d,
            depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
            decoder_embed_dim=state["decoder_embed.weight"].shape[0],
            decoder_depth=len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")}),
            mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / d)
    except KeyError as err:
        raise UsfmaeError(f"cannot infer the MAE config of {path}: key {err} is missing (an encoder-only "
                          "file?); pass config=<one of " + ", ".join(CONFIGS) + ">") from err
    fits = [name for name, cfg in CONFIGS.items() if all(cfg[k] == v for k, v in dims.items())]
    if len(fits) != 1:
        raise UsfmaeError(f"no single named config fits the shapes of {path} ({dims}); "
                          f"pass config=<one of {', '.join(CONFIGS)}> or build the model yourself")
    return fits[0]


def pos_embed_grid(pos_embed: torch.Tensor) -> int:
    """The side of the square patch grid a position table [1, 1 + side**2, D] (cls row first) covers."""
    return int(round(math.sqrt(pos_embed.shape[1] - 1)))


def interpolate_pos_embed(state: dict, model: MaskedAutoencoderViT) -> dict:
    """Resize pos_embed and decoder_pos_embed of `state` to `model`'s patch grid, as the reference
    `util/pos_embed.interpolate_pos_embed` does (cls row kept, patch grid bicubic,
    align_corners=False, no antialias). Returns a new dict; tables already of the right size pass."""
    state = dict(state)
    for key in ("pos_embed", "decoder_pos_embed"):
        if key in state and state[key].shape != getattr(model, key).shape:
            new_grid = model.patch_embed.grid_size
            state[key] = resample_abs_pos_embed(state[key].float(), list(new_grid), num_prefix_tokens=1,
                                                interpolation="bicubic", antialias=False)
    return state


def load_model(path, config: str | None = None, img_size: int | None = None) -> MaskedAutoencoderViT:
    """Build the model a checkpoint was trained with and load it with strict=True.

    The config comes from the checkpoint's 'params' (our pretraining: 'model', 'img_size',
    'norm_pix_loss', 'pos_embed', 'model_overrides'), else `config`, else the single named config whose
    shapes fit. img_size defaults to the checkpoint's; a different one
    resizes the position tables like the reference's interpolate_pos_embed (bicubic).
    """
    obj = checkpoints.read_checkpoint(path)
    state = checkpoints.unwrap_state_dict(obj, path)
    params = obj.get("params") if isinstance(obj.get("params"), dict) else {}
    name = config or params.get("model") or infer_config(state, path)
    if name not in CONFIGS:
        raise UsfmaeError(f"checkpoint {path} names MAE config {name!r}, which is unknown; "
                          f"valid names: {', '.join(CONFIGS)}")
    patch = CONFIGS[name]["patch_size"]
    ckpt_size = params.get("img_size") or (pos_embed_grid(state["pos_embed"]) * patch if "pos_embed" in state else 224)
    overrides = dict(params.get("model_overrides") or {}) if name == params.get("model") else {}
    overrides["norm_pix_loss"] = bool(params.get("norm_pix_loss", overrides.get("norm_pix_loss", False)))
    overrides["pos_embed"] = params.get("pos_embed", overrides.get("pos_embed", "fixed"))  # a bare state dict: fixed
    model = build_model(name, img_size=int(img_size or ckpt_size), **overrides)
    state = interpolate_pos_embed(state, model)

    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    wrong_shape = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        lines = [f"checkpoint {path} does not fit MAE config {name!r} (strict load):"]
        if missing:
            lines.append(f"  missing keys: {checkpoints.describe_keys(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {checkpoints.describe_keys(unexpected)}")
        if wrong_shape:
            k = sorted(wrong_shape)[0]
            lines.append(f"  wrong shapes: {len(wrong_shape)} (e.g. {k}: file {list(state[k].shape)}, "
                         f"model {list(expected[k].shape)})")
        if missing and not any(k.startswith(("decoder", "mask_token")) for k in state):
            lines.append("  fix: this file holds the encoder only (no decoder): load it into timm "
                         "(see export_encoder) for fine-tuning; it cannot reconstruct images")
        else:
            lines.append(f"  fix: pass the config the file was trained with (config=<one of {', '.join(CONFIGS)}>), "
                         "or check that it is an MAE checkpoint with reference key names")
        raise UsfmaeError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    model.trained_params = dict(params)  # the recipe the file records (empty for a bare state dict)
    return model


# ============================================================================ export
# timm VisionTransformer names these exactly as MAE does ("decoder_pos_embed" does not match)
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def encoder_state_dict(model_or_state) -> dict:
    """The encoder's tensors under timm VisionTransformer names (identical to the MAE names):
    cls_token, pos_embed, patch_embed.proj.*, blocks.*, norm.*; no decoder, no mask token."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    if isinstance(state.get("model"), dict):
        state = state["model"]
    encoder = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
    if "pos_embed" not in encoder or "blocks.0.attn.qkv.weight" not in encoder:
        raise UsfmaeError("no MAE encoder found to export (expected pos_embed, blocks.*, ...); "
                          "pass a MaskedAutoencoderViT or its state dict")
    return encoder


def export_encoder(model_or_state, path) -> Path:
    """Write the encoder alone to a safetensors file in timm's VisionTransformer key layout, e.g.
    timm.create_model('vit_base_patch16_224', pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file=path)).
    Written atomically (temp file + rename). For a folder that timm loads alone (weights, config.json
    and a model card: timm.create_model('local-dir:<folder>', pretrained=True)), see
    model_card.export_encoder_folder."""
    return checkpoints.save_safetensors(encoder_state_dict(model_or_state), path, {"source": "usfmae MAE encoder"})


# ============================================================================ FLOPs
def mae_flops(config_name: str, img_size: int, mask_ratio: float, batch: int) -> float:
    """Matmul FLOPs of one MAE training step (forward + backward) on `batch` images.

    A matmul [M, K] x [K, N] costs 2*M*K*N. With L patches of P = p*p*3 values, K visible,
    encoder width D on T = 1+K tokens, decoder width Dd on S = 1+L tokens, MLP ratio r:
      patch embed (all L patches)      2 * L * P * D
      one ViT block on T tokens, dim D 2*T*D*D*(3 + 1 + 2r)  (qkv, proj, fc1+fc2)
                                       + 4*T*T*D               (q@k^T and attn@v over all heads)
      decoder_embed                    2 * T * D * Dd
      decoder_pred (cls row included)  2 * S * Dd * P
    forward F = patch + depth*block(T, D) + decoder_embed + decoder_depth*block(S, Dd) + pred.
    Backward costs twice the forward for each matmul (input and weight gradients), except the
    patch embedding, whose input (the images) needs no gradient: step = 3F - patch embed.
    Norms, softmax, GELU, masking and the loss are elementwise and excluded (under 1%), the usual
    convention for MFU; attention recomputation in flash backward is not counted.
    """
    if config_name not in CONFIGS:
        raise UsfmaeError(f"unknown MAE config {config_name!r}; valid names: {', '.join(CONFIGS)}")
    c = CONFIGS[config_name]
    p, d, dd, r = c["patch_size"], c["embed_dim"], c["decoder_embed_dim"], c["mlp_ratio"]
    n_patches = (img_size // p) ** 2
    values = p * p * 3
    tokens_enc = 1 + int(n_patches * (1 - mask_ratio))
    tokens_dec = 1 + n_patches

    def block(t, dim):
        return 2 * t * dim * dim * (4 + 2 * r) + 4 * t * t * dim

    patch = 2 * n_patches * values * d
    forward = (patch + c["depth"] * block(tokens_enc, d) + 2 * tokens_enc * d * dd
               + c["decoder_depth"] * block(tokens_dec, dd) + 2 * tokens_dec * dd * values)
    return float(batch * (3 * forward - patch))
