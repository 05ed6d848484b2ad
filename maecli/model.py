"""The Masked Autoencoder of He et al. 2021, built from timm's ViT blocks.

Conventions, stated once:
- images are (N, 3, H, W) floats; patches are numbered row-major over the (H/p, W/p) grid;
- `mask`: 0 is keep, 1 is remove;
- state_dict keys are those of the official MAE checkpoints (`blocks.N.attn.qkv.weight`, ...),
  so official weights load strictly and the encoder keys load into a timm VisionTransformer.
"""

from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block


def to_2tuple(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def sincos_pos_embed(embed_dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, laid out as the official MAE's: [sin_w | cos_w | sin_h | cos_h].

    Returns (1 + gh * gw, D) with a zero row for the class token, or (gh * gw, D) without it.
    """
    assert embed_dim % 4 == 0, f"embed_dim must be divisible by 4, got {embed_dim}"
    gh, gw = grid_size
    omega = torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4)
    omega = 1.0 / 10000**omega  # (D/4,)
    h, w = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    out_w = w.reshape(-1, 1) * omega  # (L, D/4)
    out_h = h.reshape(-1, 1) * omega  # (L, D/4)
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)  # (L, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)  # (1 + L, D)
    return emb.float()


class MaskedAutoencoder(nn.Module):
    """MAE with a ViT encoder that sees only the visible patches and a light ViT decoder."""

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        decoder: bool = True,
        decoder_block: type[nn.Module] = Block,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        assert self.img_size[0] % patch_size == 0 and self.img_size[1] % patch_size == 0, (
            f"img_size {self.img_size} must be divisible by patch_size {patch_size}"
        )
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.norm_pix_loss = norm_pix_loss

        # encoder
        self.patch_embed = PatchEmbed(img_size=self.img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)  # fixed sin-cos
        self.blocks = nn.ModuleList(
            [Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        # decoder (left out when another objective trains the encoder, as a contrastive method's; a frame-pair method's
        # blocks also attend to another frame: `decoder_block`)
        self.has_decoder = decoder
        if decoder:
            self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False)
            self.decoder_blocks = nn.ModuleList(
                [
                    decoder_block(dim=decoder_embed_dim, num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                    for _ in range(decoder_depth)
                ]
            )
            self.decoder_norm = norm_layer(decoder_embed_dim)
            self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.initialize_weights()

    def initialize_weights(self) -> None:
        self.pos_embed.data.copy_(sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size).unsqueeze(0))
        if self.has_decoder:
            self.decoder_pos_embed.data.copy_(sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid_size).unsqueeze(0))
        # patch_embed like nn.Linear (instead of nn.Conv2d), as the official code does
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        if self.has_decoder:
            nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), channels last within a patch."""
        p, (h, w) = self.patch_size, self.grid_size
        N, C = imgs.shape[:2]
        assert imgs.shape[2:] == (h * p, w * p), f"expected images of {(h * p, w * p)}, got {tuple(imgs.shape[2:])}"
        x = imgs.reshape(N, C, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(N, h * w, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W)."""
        p, (h, w) = self.patch_size, self.grid_size
        N, L = x.shape[:2]
        assert L == h * w, f"expected {h * w} patches, got {L}"
        C = x.shape[2] // (p * p)
        x = x.reshape(N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(N, C, h * p, w * p)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by argsort of noise: keep the `int(L * (1 - mask_ratio))` lowest-noise tokens.

        x: (N, L, D); noise: (N, L) or None. Returns x_masked (N, K, D), mask (N, L), ids_restore (N, L).
        """
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)  # (N, L) in [0, 1)
        assert noise.shape == (N, L), f"noise must be {(N, L)}, got {tuple(noise.shape)}"
        ids_shuffle = torch.argsort(noise, dim=1)  # (N, L) ascending: small is keep
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, L)
        ids_keep = ids_shuffle[:, :len_keep]  # (N, K)
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (N, K, D)
        mask = (ids_restore >= len_keep).float()  # (N, L) in patch order: a patch is removed if its rank is past len_keep
        return x_masked, mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.patch_embed(imgs)  # (N, L, D)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # (N, K, D)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]  # (1, 1, D)
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (N, 1 + K, D)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on every patch, in patch order: (N, 1 + L, D). What export and probe use."""
        noise = torch.arange(self.num_patches, device=imgs.device).expand(imgs.shape[0], -1)  # identity shuffle
        x, _, _ = self.forward_encoder(imgs, mask_ratio=0.0, noise=noise)
        return x

    def decoder_tokens(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoder output (N, 1 + K, D) -> the decoder's input (N, 1 + L, Dd): embedded, a mask token at every removed
        patch, in patch order, plus the decoder's position embedding."""
        x = self.decoder_embed(x)  # (N, 1 + K, Dd)
        N, K1, Dd = x.shape
        L = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(N, L + 1 - K1, -1)  # (N, L - K, Dd)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (N, L, Dd), shuffled order
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # (N, L, Dd) patch order
        x = torch.cat([x[:, :1, :], x_], dim=1)  # (N, 1 + L, Dd)
        return x + self.decoder_pos_embed

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_tokens(x, ids_restore)  # (N, 1 + L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # (N, 1 + L, p*p*C)
        return x[:, 1:, :]  # (N, L, p*p*C)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the removed patches (on every patch when none is removed)."""
        target = self.patchify(imgs)  # (N, L, p*p*C)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # (N, L) per-patch loss
        removed = mask.sum()
        masked_loss = (loss * mask).sum() / removed.clamp(min=1)
        return torch.where(removed > 0, masked_loss, loss.mean())  # branch-free: no host sync, one compiled graph

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)  # (N, 1 + K, D)
        pred = self.forward_decoder(latent, ids_restore)  # (N, L, p*p*C)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask
