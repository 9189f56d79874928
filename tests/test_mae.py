"""Tests of usfmae_lib.mae: reference MAE semantics, checkpoints, timm export, FLOP count.

`reference_forward` below re-states the forward pass of facebookresearch/mae `models_mae.py`
(He et al., "Masked Autoencoders Are Scalable Vision Learners"; CC-BY-NC 4.0) with plain torch
ops on a state dict, written independently of usfmae_lib.mae (explicit attention, numpy sin-cos
tables as the reference's util/pos_embed.py builds them), so the model is checked against the
semantics rather than against itself.
"""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from usfmae_lib import UsfmaeError
from usfmae_lib import checkpoints, mae
from usfmae_lib.mae import CONFIGS, MaskedAutoencoderViT, build_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# a very small model for semantic checks: 32 px, 8 px patches -> L = 16
SMALL = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=4,
             decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=3, mlp_ratio=4.0)
TINY = "mae_vit_tiny_patch16_dec128d2b"


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = MaskedAutoencoderViT(**{**SMALL, **kw})
    # non-trivial biases, norms and tokens so that every term of the forward matters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (name.endswith("bias") or "norm" in name or "token" in name):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# ---------------------------------------------------------------- reference re-statement
def ref_sincos_2d(embed_dim, grid_size):
    """util/pos_embed.get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=True)."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def ref_block(sd, prefix, x, heads):
    """timm 0.3.2 Block: x + attn(norm1(x)); x + mlp(norm2(x)); explicit softmax attention."""
    def ln(name, t):
        return F.layer_norm(t, t.shape[-1:], sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.bias"], eps=1e-6)

    def lin(name, t):
        return F.linear(t, sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.bias"])

    b, n, c = x.shape
    qkv = lin("attn.qkv", ln("norm1", x)).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    x = x + lin("attn.proj", (attn @ v).transpose(1, 2).reshape(b, n, c))
    return x + lin("mlp.fc2", F.gelu(lin("mlp.fc1", ln("norm2", x))))


def ref_patchify(imgs, p):
    h = w = imgs.shape[2] // p
    x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(shape=(imgs.shape[0], h * w, p ** 2 * 3))


def reference_forward(sd, cfg, imgs, mask_ratio, noise, norm_pix_loss=False):
    p = cfg["patch_size"]
    # encoder
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"][:, 1:, :]
    n, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, dim))
    mask = torch.ones([n, length])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    cls_token = sd["cls_token"] + sd["pos_embed"][:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for i in range(cfg["depth"]):
        x = ref_block(sd, f"blocks.{i}.", x, cfg["num_heads"])
    x = F.layer_norm(x, x.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    # decoder
    x = F.linear(x, sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    mask_tokens = sd["mask_token"].repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + sd["decoder_pos_embed"]
    for i in range(cfg["decoder_depth"]):
        x = ref_block(sd, f"decoder_blocks.{i}.", x, cfg["decoder_num_heads"])
    x = F.layer_norm(x, x.shape[-1:], sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps=1e-6)
    pred = F.linear(x, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:, :]
    # loss
    target = ref_patchify(imgs, p)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    loss = (loss * mask).sum() / mask.sum()
    return loss, pred, mask


def reference_keys(depth, decoder_depth):
    block = [f"{m}.{t}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for t in ("weight", "bias")]
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "mask_token",
            "decoder_pos_embed", "decoder_norm.weight", "decoder_norm.bias",
            "decoder_pred.weight", "decoder_pred.bias"}
    keys |= {f"blocks.{i}.{b}" for i in range(depth) for b in block}
    keys |= {f"decoder_blocks.{i}.{b}" for i in range(decoder_depth) for b in block}
    return keys


# ---------------------------------------------------------------- semantics
@pytest.mark.parametrize("mask_ratio,norm_pix_loss", [(0.25, False), (0.75, False), (0.5, True)])
def test_forward_equals_reference(mask_ratio, norm_pix_loss):
    model = small_model(norm_pix_loss=norm_pix_loss)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(3, 3, 32, 32, generator=g)
    noise = torch.rand(3, 16, generator=g)
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
        ref_loss, ref_pred, ref_mask = reference_forward(model.state_dict(), SMALL, imgs, mask_ratio,
                                                         noise, norm_pix_loss)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(pred, ref_pred, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)


def test_position_tables_are_reference_sincos_and_frozen():
    model = small_model()
    torch.testing.assert_close(model.pos_embed[0], torch.from_numpy(ref_sincos_2d(32, 4)).float(),
                               atol=0, rtol=0)
    torch.testing.assert_close(model.decoder_pos_embed[0], torch.from_numpy(ref_sincos_2d(24, 4)).float(),
                               atol=0, rtol=0)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    # the paper's size: 14 x 14 grid, 768 wide
    torch.testing.assert_close(mae.sincos_pos_embed_2d(768, 14), torch.from_numpy(ref_sincos_2d(768, 14)).float(),
                               atol=0, rtol=0)


def test_head_count_changes_the_computation():
    # shapes do not depend on heads, so only the config guards against a silent mismatch
    a, b = small_model(num_heads=4), small_model(num_heads=2)
    b.load_state_dict(a.state_dict(), strict=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        assert not torch.allclose(a(imgs, noise=noise)[1], b(imgs, noise=noise)[1], atol=1e-4)
    paper = CONFIGS[mae.PAPER_CONFIG]
    assert (paper["embed_dim"], paper["depth"], paper["num_heads"]) == (768, 12, 12)
    assert (paper["decoder_embed_dim"], paper["decoder_depth"], paper["decoder_num_heads"]) == (512, 8, 16)


def test_patchify_round_trip_and_patch_order():
    model = small_model()
    imgs = torch.randn(2, 3, 32, 32)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    assert torch.equal(model.unpatchify(patches), imgs)
    # patch 6 = row 1, col 2; values ordered (row in patch, col in patch, channel)
    assert torch.equal(patches[:, 6].reshape(2, 8, 8, 3), imgs[:, :, 8:16, 16:24].permute(0, 2, 3, 1))
    with pytest.raises(UsfmaeError):
        model.patchify(torch.randn(1, 3, 32, 36))


@pytest.mark.parametrize("length", [16, 49, 196])
def test_mask_counts_and_argsort_semantics(length):
    model = small_model()
    x = torch.randn(4, length, 5)
    for r in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9):
        noise = torch.rand(4, length)
        x_masked, mask, ids_restore = model.random_masking(x, r, noise)
        keep = int(length * (1 - r))
        assert torch.equal(mask.sum(1), torch.full((4,), float(length - keep)))
        assert x_masked.shape == (4, keep, 5)
        kept = noise.argsort(1)[:, :keep]  # smallest noise is kept, in ascending-noise order
        assert torch.equal(x_masked, torch.gather(x, 1, kept[..., None].expand(-1, -1, 5)))
        assert torch.equal(mask.gather(1, kept), torch.zeros(4, keep))
    with pytest.raises(UsfmaeError):
        model.random_masking(x, 0.5, torch.rand(4, length + 1))


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_ignores_visible_patches(norm_pix_loss):
    model = small_model(norm_pix_loss=norm_pix_loss)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=0.5, noise=noise)
        visible = (mask == 0)[..., None]  # [N, L, 1]
        # change the prediction at visible patches
        assert torch.equal(model.forward_loss(imgs, pred + 5 * visible, mask), loss)
        # change the image (the target) at visible patches
        target = model.patchify(imgs)
        altered = model.unpatchify(target + 3 * visible * torch.randn_like(target))
        assert torch.equal(model.forward_loss(altered, pred, mask), loss)
        # while a change at a removed patch does matter
        assert model.forward_loss(imgs, pred + 5 * (~visible), mask) != loss
        # the loss is the mean over removed patches of the per-patch MSE to the (normalised) target
        if norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(-1)
        torch.testing.assert_close(loss, per_patch[mask == 1].mean())


# ---------------------------------------------------------------- configs and checkpoints
def test_named_configs_and_unknown_name():
    model = build_model(TINY, img_size=64)
    assert set(model.state_dict()) == reference_keys(12, 2)
    assert model.patch_embed.num_patches == 16
    with pytest.raises(UsfmaeError, match="mae_vit_base_patch16_dec512d8b"):
        build_model("mae_vit_huge")
    with pytest.raises(UsfmaeError, match="valid names"):
        mae.mae_flops("nope", 224, 0.25, 1)


def test_paper_encoder_matches_timm_vit_base_layout():
    import timm
    with torch.device("meta"):
        ours = mae.encoder_state_dict(build_model(mae.PAPER_CONFIG, img_size=224))
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in vit.items()}


@pytest.mark.parametrize("wrap", ["bare", "model", "params", "ddp"])
def test_strict_load_of_reference_layout(tmp_path, wrap):
    src = build_model(TINY, img_size=32).eval()
    state = src.state_dict()
    assert set(state) == reference_keys(12, 2)
    obj = {"bare": state, "model": {"model": state, "epoch": 3},
           "params": {"model": state, "step": 5, "params": {"model": TINY, "img_size": 32, "mask_ratio": 0.25,
                                                            "norm_pix_loss": True}},
           "ddp": {"model": {f"module.{k}": v for k, v in state.items()}}}[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    loaded = checkpoints.load_checkpoint(path)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    # no config given: from 'params', else inferred from the shapes (img_size from pos_embed)
    model = mae.load_model(path)
    assert model.norm_pix_loss == (wrap == "params")
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 4)
    with torch.no_grad():
        src.norm_pix_loss = model.norm_pix_loss
        assert torch.equal(model(imgs, noise=noise)[1], src(imgs, noise=noise)[1])
    # the reference model loads our state dict with strict=True too (same keys and shapes)
    MaskedAutoencoderViT(img_size=32, **{k: v for k, v in CONFIGS[TINY].items()}).load_state_dict(
        loaded, strict=True)


def test_params_model_overrides_are_applied(tmp_path):
    src = build_model(TINY, img_size=32, depth=2, decoder_num_heads=2)
    torch.save({"model": src.state_dict(), "params": {"model": TINY, "img_size": 32, "norm_pix_loss": False,
                                                      "model_overrides": {"depth": 2, "decoder_num_heads": 2}}},
               tmp_path / "c.pth")
    model = mae.load_model(tmp_path / "c.pth")
    assert len(model.blocks) == 2 and model.decoder_blocks[0].attn.num_heads == 2


def test_safetensors_checkpoint(tmp_path):
    import safetensors.torch
    state = build_model(TINY, img_size=32).state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    model = mae.load_model(tmp_path / "w.safetensors", config=TINY)
    assert model.patch_embed.img_size == (32, 32)
    assert torch.equal(model.state_dict()["blocks.3.mlp.fc1.weight"], state["blocks.3.mlp.fc1.weight"])


def test_mismatched_checkpoints_name_keys_and_fix(tmp_path):
    state = build_model(TINY, img_size=32).state_dict()
    # a wrong config: same names, other shapes
    torch.save(state, tmp_path / "tiny.pth")
    with pytest.raises(UsfmaeError, match=r"wrong shapes.*\n.*fix: pass the config"):
        mae.load_model(tmp_path / "tiny.pth", config="mae_vit_small_patch16_dec256d4b")
    # an extra and a renamed key
    odd = dict(state, extra_head=torch.zeros(1))
    odd["blocks.0.attn.qkv.w"] = odd.pop("blocks.0.attn.qkv.weight")
    torch.save({"model": odd}, tmp_path / "odd.pth")
    with pytest.raises(UsfmaeError) as err:
        mae.load_model(tmp_path / "odd.pth", config=TINY)
    msg = str(err.value)
    assert "odd.pth" in msg and "missing keys: 1 (blocks.0.attn.qkv.weight)" in msg
    assert "unexpected keys: 2" in msg and "extra_head" in msg
    # an encoder-only file (like the reference's mae_pretrain_vit_base.pth)
    torch.save({"model": mae.encoder_state_dict(state)}, tmp_path / "enc.pth")
    with pytest.raises(UsfmaeError, match="encoder only"):
        mae.load_model(tmp_path / "enc.pth", config=TINY)
    with pytest.raises(UsfmaeError, match="pass config="):
        mae.load_model(tmp_path / "enc.pth")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UsfmaeError, match="nowhere.pth"):
        checkpoints.load_checkpoint(tmp_path / "nowhere.pth")
    (tmp_path / "junk.pth").write_bytes(b"<html>not found</html>")
    with pytest.raises(UsfmaeError, match="junk.pth"):
        checkpoints.load_checkpoint(tmp_path / "junk.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(UsfmaeError, match="list.pth"):
        checkpoints.load_checkpoint(tmp_path / "list.pth")


class _Payload:
    """Unpickling this calls Path.touch(marker): code execution if a loader trusts the pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_tampered_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"model": build_model(TINY, img_size=32).state_dict(), "extra": _Payload(str(marker))}
    path = tmp_path / "tampered.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    # sanity: plain unpickling would run the payload
    assert not marker.exists()
    with pytest.raises(UsfmaeError, match="tampered.pth") as err:
        checkpoints.load_checkpoint(path)
    assert "refused" in str(err.value) or "cannot read" in str(err.value)
    with pytest.raises(UsfmaeError):
        mae.load_model(path, config=TINY)
    assert not marker.exists(), "loading the checkpoint ran code from the pickle"


def test_other_img_size_interpolates_like_reference(tmp_path):
    src = build_model(TINY, img_size=64)
    torch.save({"model": src.state_dict()}, tmp_path / "c.pth")
    model = mae.load_model(tmp_path / "c.pth", img_size=96)  # 4x4 -> 6x6 grid
    assert model.pos_embed.shape == (1, 37, 192)
    # reference util/pos_embed.interpolate_pos_embed
    old = src.pos_embed.detach()
    tokens = old[:, 1:].reshape(-1, 4, 4, 192).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(6, 6), mode="bicubic", align_corners=False)
    expected = torch.cat([old[:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    assert model.decoder_pos_embed.shape == (1, 37, 128)
    assert torch.isfinite(model(torch.randn(1, 3, 96, 96))[0])


# ---------------------------------------------------------------- export to timm
def test_export_encoder_loads_into_timm(tmp_path):
    import safetensors.torch
    import timm
    model = build_model(TINY, img_size=64).eval()
    with torch.no_grad():  # a trained-looking encoder: nothing at its init values
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = mae.export_encoder(model, tmp_path / "enc" / "encoder.safetensors")
    keys = set(safetensors.torch.load_file(str(path)))
    assert not any(k.startswith(("decoder", "mask_token")) for k in keys) and "norm.weight" in keys

    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(path))).eval()
    vit2 = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0).eval()
    vit2.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    imgs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, mask, _ = model.forward_encoder(imgs, 0.0, noise=torch.arange(16.0).expand(2, 16))
        assert mask.sum() == 0
        for v in (vit, vit2):
            torch.testing.assert_close(v.forward_features(imgs), ours, atol=1e-5, rtol=1e-5)
    # a state dict (bare or wrapped) exports too
    mae.export_encoder({"model": model.state_dict()}, tmp_path / "e2.safetensors")
    assert set(safetensors.torch.load_file(str(tmp_path / "e2.safetensors"))) == keys


# ---------------------------------------------------------------- speed-related behaviour
def test_flop_formula_matches_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    for img_size, ratio, batch in ((64, 0.25, 2), (64, 0.75, 3)):
        torch.manual_seed(0)
        model = build_model(TINY, img_size=img_size)
        imgs = torch.randn(batch, 3, img_size, img_size)
        with FlopCounterMode(display=False) as counter:
            model(imgs, mask_ratio=ratio)[0].backward()
        counted = counter.get_total_flops()
        formula = mae.mae_flops(TINY, img_size, ratio, batch)
        assert abs(formula - counted) / counted < 0.03, (img_size, ratio, formula, counted)


def test_bf16_autocast_cpu_and_fused_attention(monkeypatch):
    model = build_model(TINY, img_size=32)
    attns = [b.attn for b in list(model.blocks) + list(model.decoder_blocks)]
    assert all(a.fused_attn for a in attns)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].dtype)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask = model(torch.randn(2, 3, 32, 32))
    loss.backward()
    assert len(calls) == len(attns) and set(calls) == {torch.bfloat16}
    assert pred.dtype == torch.bfloat16 and math.isfinite(loss.item())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.pos_embed.grad is None  # fixed tables are never trained
