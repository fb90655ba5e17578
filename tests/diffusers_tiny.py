"""Tiny random-weight diffusers pipelines, built offline (the configs of diffusers' own tests'
`get_dummy_components`), with tokenizers made from a small in-memory vocabulary."""

from __future__ import annotations

import torch

WORDS = ["a", "red", "car", "cat", "dog", "blue", "photo", "of", "and", "the", "on", "green", "ball", "tree"]


def clip_tokenizer():
    from transformers import CLIPTokenizer

    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for t in letters + [c + "</w>" for c in letters]:
        vocab.setdefault(t, len(vocab))
    merges = []
    for w in WORDS:
        cur = list(w[:-1]) + [w[-1] + "</w>"]
        while len(cur) > 1:
            merges.append((cur[0], cur[1]))
            vocab.setdefault(cur[0] + cur[1], len(vocab))
            cur = [cur[0] + cur[1], *cur[2:]]
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def clip_text(hidden: int = 32, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = clip_tokenizer()
    cfg = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tok),
        projection_dim=hidden,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval(), tok


def t5_text(seed: int = 0):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    tok = T5Tokenizer(
        vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS],
        extra_ids=0,
    )
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(cfg).eval(), tok


def vae(latent: int = 4, blocks=(4, 8), groups: int = 2):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=list(blocks),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(blocks),
        up_block_types=["UpDecoderBlock2D"] * len(blocks),
        latent_channels=latent,
        norm_num_groups=groups,
    ).eval()


def sd_components(cross_dim: int = 32, mid_attention: bool = True):
    """Stable Diffusion 1.x: a two-level U-Net with cross-attention down, mid and up."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    ).eval()
    text, tok = clip_text(cross_dim)
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    return {
        "unet": unet,
        "scheduler": sched,
        "vae": vae(4, (32, 64), 32),
        "text_encoder": text,
        "tokenizer": tok,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def sd(cls=None, **kw):
    from diffusers import StableDiffusionPipeline

    cls = cls or StableDiffusionPipeline
    comps = sd_components(**kw)
    return _build(cls, comps)


def _build(cls, comps):
    import inspect

    names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    pipe = cls(**{k: v for k, v in comps.items() if k in names})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_components():
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=8,
    ).eval()
    t1, tok1 = clip_text(32, seed=0)
    t2, tok2 = clip_text(32, projection=True, seed=1)
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )  # fmt: skip
    return {
        "unet": unet,
        "scheduler": sched,
        "vae": vae(4, (32, 64), 32),
        "text_encoder": t1,
        "tokenizer": tok1,
        "text_encoder_2": t2,
        "tokenizer_2": tok2,
        "image_encoder": None,
        "feature_extractor": None,
    }


def sdxl(cls=None):
    from diffusers import StableDiffusionXLPipeline

    return _build(cls or StableDiffusionXLPipeline, sdxl_components())


def pixart_components():
    from diffusers import DDIMScheduler, PixArtTransformer2DModel

    torch.manual_seed(0)
    tr = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=12,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    text, tok = t5_text()
    return {
        "transformer": tr,
        "vae": vae(4, (32, 64), 32),
        "scheduler": DDIMScheduler(clip_sample=False),
        "text_encoder": text,
        "tokenizer": tok,
    }


def pixart(cls=None):
    from diffusers import PixArtSigmaPipeline

    return _build(cls or PixArtSigmaPipeline, pixart_components())


def sd3_components(qk_norm: str | None = None, layers: int = 2):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        qk_norm=qk_norm,
    ).eval()
    t1, tok1 = clip_text(32, projection=True, seed=0)
    t2, tok2 = clip_text(32, projection=True, seed=1)
    t3, tok3 = t5_text()
    sd3_vae = vae(4, (32, 64), 32)
    sd3_vae.register_to_config(shift_factor=0.0609)  # SD3's VAE has one; decoding reads it
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": t1,
        "text_encoder_2": t2,
        "text_encoder_3": t3,
        "tokenizer": tok1,
        "tokenizer_2": tok2,
        "tokenizer_3": tok3,
        "transformer": tr,
        "vae": sd3_vae,
        "image_encoder": None,
        "feature_extractor": None,
    }


def sd3(cls=None, **kw):
    from diffusers import StableDiffusion3Pipeline

    return _build(cls or StableDiffusion3Pipeline, sd3_components(**kw))


def flux_components():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    t1, tok1 = clip_text(32, seed=0)
    t2, tok2 = t5_text()
    torch.manual_seed(0)
    v = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()  # fmt: skip
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": t1,
        "text_encoder_2": t2,
        "tokenizer": tok1,
        "tokenizer_2": tok2,
        "transformer": tr,
        "vae": v,
        "image_encoder": None,
        "feature_extractor": None,
    }


def flux(cls=None):
    from diffusers import FluxPipeline

    return _build(cls or FluxPipeline, flux_components())


def latents(pipe, batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Start latents for a pipeline call at `size` pixels (Flux: its packed tokens)."""
    g = torch.Generator().manual_seed(seed)
    den = getattr(pipe, "unet", None) or pipe.transformer
    ch = den.config.in_channels
    f = pipe.vae_scale_factor
    if type(pipe).__name__.startswith("Flux"):
        h, ch = 2 * (size // (f * 2)), ch // 4
        lat = torch.randn(batch, ch, h, h, generator=g)
        return pipe._pack_latents(lat, batch, ch, h, h)
    return torch.randn(batch, ch, size // f, size // f, generator=g)
