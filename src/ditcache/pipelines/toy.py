"""Random-weight diffusers pipelines built locally (no download): for tests and benchmarks.

``dit_pipeline`` and ``pixart_pipeline`` build a ``DiTPipeline`` / ``PixArtAlphaPipeline`` of any
size with a tiny VAE and, for PixArt, a tiny T5 encoder from a ``transformers`` config and a
word-level tokenizer made in memory. Layers that diffusers initialises to zero (adaLN-zero, output
projections) get random values, so every site changes the output and a wrong cache cannot hide.
"""

from __future__ import annotations

import torch
from torch import nn

WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "car", "tree", "house", "on", "the", "beach")


def _wake(module: nn.Module, std: float, seed: int) -> nn.Module:
    """Give every all-zero parameter random values (a reproducible draw per seed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=8, sample_size=16)
    return vae.eval()


def dit_pipeline(depth: int = 2, hidden: int = 32, heads: int = 2, sample_size: int = 8, classes: int = 1000,
                 scheduler=None, seed: int = 0):
    """A class-conditional ``DiTPipeline`` (learned sigma, as the official DiT). The pipeline guides with
    the null class 1000, so the model keeps 1000 classes."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads,
                                        in_channels=4, out_channels=8, num_layers=depth, sample_size=sample_size,
                                        patch_size=2, num_embeds_ada_norm=classes)
    _wake(transformer, 0.2, seed)
    scheduler = scheduler or DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    return DiTPipeline(transformer=transformer, vae=tiny_vae(seed=seed), scheduler=scheduler,
                       id2label={i: f"class{i}" for i in range(classes)})


def word_tokenizer(max_length: int = 8):
    """A T5-style tokenizer (pad 0, eos 1, unk 2) over a few words, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def tiny_t5(width: int, vocab: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab, d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval()


def pixart_transformer(depth: int = 2, hidden: int = 32, heads: int = 2, sample_size: int = 8, caption_channels: int = 32,
                       seed: int = 0, wake: float = 0.2):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4, out_channels=8,
        num_layers=depth, sample_size=sample_size, patch_size=2, norm_type="ada_norm_single",
        caption_channels=caption_channels, cross_attention_dim=hidden, use_additional_conditions=False)
    return _wake(transformer, wake, seed) if wake else transformer.eval()


def pixart_pipeline(depth: int = 2, hidden: int = 32, heads: int = 2, sample_size: int = 8, text_width: int = 32,
                    max_tokens: int = 8, scheduler=None, seed: int = 0):
    """A text-to-image ``PixArtAlphaPipeline`` (DPM-Solver++ multistep by default, as PixArt ships)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    tokenizer = word_tokenizer(max_tokens)
    scheduler = scheduler or DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=tiny_t5(text_width, len(tokenizer), seed), vae=tiny_vae(seed=seed),
        transformer=pixart_transformer(depth, hidden, heads, sample_size, text_width, seed), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_alpha_shaped(depth: int = 28, latent: int = 64, text_tokens: int = 120, seed: int = 0):
    """A ``PixArtAlphaPipeline`` around a PixArt-alpha-shaped transformer with random weights (hidden
    1152, 16 heads, 4096-d captions; latent 64 = 1024 image tokens, 512 px) and no text encoder or
    VAE: it is called with ``caption_inputs`` and returns latents. For timing: speed does not depend
    on the weights' values."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    transformer = pixart_transformer(depth=depth, hidden=1152, heads=16, sample_size=latent, caption_channels=4096,
                                     seed=seed, wake=0.02)
    transformer.config.caption_channels = 4096
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def caption_inputs(batch: int, text_tokens: int = 120, width: int = 4096, seed: int = 0) -> dict:
    """Random caption features and masks in place of a T5 encoder's, for a text pipeline's call."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text_tokens, dtype=torch.long)
    return {"prompt_embeds": torch.randn(batch, text_tokens, width, generator=g) * 0.1, "prompt_attention_mask": mask,
            "negative_prompt_embeds": torch.randn(batch, text_tokens, width, generator=g) * 0.1,
            "negative_prompt_attention_mask": mask.clone()}
