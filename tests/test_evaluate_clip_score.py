"""CLIP score from a local folder: the definition computed by hand, batch independence, torchmetrics
parity, and the folders `load_clip` refuses."""

import json
import os
import shutil

import pytest
import torch
from diffusers_tiny import clip_tokenizer

from attnlab.errors import ConfigError
from attnlab.evaluate.clip_score import ClipScorer, load_clip

TEXTS = ["a red car", "a cat", "a photo of a dog", "the green ball on the tree", "a blue car", "a dog"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])  # OpenAI CLIP's normalisation
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIP (32 px images, 8 px patches, 2 layers of width 32) saved as transformers saves one."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tok = clip_tokenizer()
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text = dict(
        layers,
        vocab_size=len(tok),
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        max_position_embeddings=77,
    )
    cfg = CLIPConfig(
        text_config=text, vision_config=dict(layers, image_size=32, patch_size=8), projection_dim=16
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    # The Pil image processor: CLIPImageProcessor needs torchvision and would fall back to it anyway.
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder, model, tok


@pytest.fixture(scope="module")
def images():
    return torch.rand(len(TEXTS), 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def cosine(model, tok, images, texts):
    """cos(E_image, E_text) of CLIP's projected embeddings, through the model's submodules by hand."""
    pix = ((images + 1) * 127.5).round() / 255  # the uint8 image the score sees, rescaled to [0, 1]
    pix = (pix - MEAN[:, None, None]) / STD[:, None, None]  # resize and crop are identities at 32 px
    vision = model.vision_model(pixel_values=pix).last_hidden_state  # (N, 1 + patches, 32)
    e_img = model.visual_projection(model.vision_model.post_layernorm(vision[:, 0]))  # CLS token
    ids = tok(texts, padding=True, return_tensors="pt")
    text = model.text_model(**ids).last_hidden_state  # (N, L, 32), after the final layer norm
    eos = (ids["input_ids"] == tok.eos_token_id).int().argmax(-1)  # the first EOS of each row
    e_txt = model.text_projection(text[torch.arange(len(texts)), eos])
    return (e_img * e_txt).sum(-1) / (e_img.norm(dim=-1) * e_txt.norm(dim=-1))


def reference(model, tok, images, texts):
    """The CLIP score's definition: 100 * max(cos, 0)."""
    return 100 * cosine(model, tok, images, texts).clamp(min=0)


def _broken_torchmetrics_reason(scorer, images):
    from torchmetrics.functional.multimodal import clip_score

    x = ((images[:1] + 1) * 127.5).round().to(torch.uint8)
    try:
        clip_score(x[0], TEXTS[0], lambda: (scorer.model, scorer.processor))
    except AttributeError as e:
        return f"torchmetrics' clip_score fails with this transformers: {e}"
    return None


@torch.no_grad()
def test_score_is_the_definition(clip_folder, images):
    folder, model, tok = clip_folder
    scorer = load_clip(folder)
    got = scorer.score(images, TEXTS)
    assert got.shape == (len(TEXTS),) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference(model, tok, images, TEXTS), atol=1e-4, rtol=0)
    assert scorer.mean_score(images, TEXTS) == pytest.approx(got.mean().item(), abs=1e-5)
    assert scorer.backend in ("torchmetrics", "transformers")
    assert not any(p.requires_grad for p in scorer.model.parameters())


@torch.no_grad()
def test_score_clamps_negative_cosines_to_zero(clip_folder, images):
    folder, model, tok = clip_folder
    flipped = load_clip(folder)
    flipped.model.visual_projection.weight.neg_()  # every cosine changes sign
    a, b = load_clip(folder).score(images, TEXTS), flipped.score(images, TEXTS)
    assert torch.all(torch.minimum(a, b) == 0)
    assert (a > 0).any() and (b > 0).any()  # both signs occur among these pairs
    torch.testing.assert_close(a + b, 100 * cosine(model, tok, images, TEXTS).abs(), atol=1e-4, rtol=0)


@torch.no_grad()
def test_score_does_not_depend_on_the_batch(clip_folder, images):
    scorer = load_clip(clip_folder[0])
    full = scorer.score(images, TEXTS)
    torch.testing.assert_close(scorer.score(images[:1], TEXTS[:1]), full[:1], atol=1e-4, rtol=0)
    torch.testing.assert_close(scorer.score(images, TEXTS, batch_size=4), full, atol=1e-4, rtol=0)
    torch.testing.assert_close(scorer.score(images[3:4], TEXTS[3]), full[3:4], atol=1e-4, rtol=0)


@torch.no_grad()
def test_grey_images_score_as_three_equal_channels(clip_folder, images):
    scorer = load_clip(clip_folder[0])
    grey = images[:, :1]
    torch.testing.assert_close(scorer.score(grey, TEXTS), scorer.score(grey.expand(-1, 3, -1, -1), TEXTS))


@torch.no_grad()
def test_torchmetrics_gives_the_same_value(clip_folder, images):
    from torchmetrics.functional.multimodal import clip_score

    scorer = load_clip(clip_folder[0])
    reason = _broken_torchmetrics_reason(scorer, images)
    ours = scorer.score(images, TEXTS)
    if reason:
        assert scorer.backend == "transformers" and "norm" in scorer.fallback_reason
        pytest.skip(reason)
    assert scorer.backend == "torchmetrics"
    x = ((images + 1) * 127.5).round().to(torch.uint8)
    local = lambda: (scorer.model, scorer.processor)  # noqa: E731
    per_image = torch.stack([clip_score(x[i], TEXTS[i], local) for i in range(len(TEXTS))])
    torch.testing.assert_close(per_image.float(), ours, atol=1e-4, rtol=0)


class _TensorFeatures(torch.nn.Module):
    """A CLIPModel whose feature calls return tensors, as transformers < 5 did."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    @property
    def dtype(self):
        return self.inner.dtype

    def get_image_features(self, *args, **kwargs):
        out = self.inner.get_image_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *args, **kwargs):
        out = self.inner.get_text_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def test_torchmetrics_path_runs_where_features_are_tensors(clip_folder, images):
    folder, model, tok = clip_folder
    loaded = load_clip(folder)
    scorer = ClipScorer(_TensorFeatures(loaded.model), loaded.processor)
    got = scorer.score(images, TEXTS)
    assert scorer.backend == "torchmetrics" and scorer.fallback_reason is None
    torch.testing.assert_close(got, reference(model, tok, images, TEXTS), atol=1e-4, rtol=0)


def test_loading_is_offline_and_restores_the_environment(clip_folder, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load_clip(clip_folder[0])
    assert "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    load_clip(clip_folder[0])
    assert os.environ["HF_HUB_OFFLINE"] == "0"


def _copy(clip_folder, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(clip_folder[0], folder)
    return folder


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"CLIP folder .*nowhere: not found; expected a CLIP folder"):
        load_clip(tmp_path / "nowhere")


def test_folder_without_config_is_refused(clip_folder, tmp_path):
    folder = _copy(clip_folder, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"copy: no config\.json"):
        load_clip(folder)


def test_config_of_another_model_is_refused(clip_folder, tmp_path):
    folder = _copy(clip_folder, tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ConfigError, match=r"copy: config\.json has model_type='bert'; expected \"clip\""):
        load_clip(folder)


def test_pickled_only_weights_are_refused_by_name(clip_folder, tmp_path):
    folder = _copy(clip_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(clip_folder[1].state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(
        ConfigError, match=r"copy: its weights are pickled \(pytorch_model\.bin\).*model\.safetensors"
    ):
        load_clip(folder)


@pytest.mark.parametrize(
    "remove, message",
    [(["tokenizer.json"], "no tokenizer"), (["processor_config.json"], "no image processor")],
)
def test_missing_tokenizer_or_processor_is_refused(clip_folder, tmp_path, remove, message):
    folder = _copy(clip_folder, tmp_path)
    for name in remove:
        (folder / name).unlink()
    with pytest.raises(ConfigError, match=rf"copy: {message}"):
        load_clip(folder)


def test_bad_images_and_text_counts_are_refused(clip_folder, images):
    scorer = load_clip(clip_folder[0])
    with pytest.raises(ConfigError, match=r"must be \(N, 3, H, W\).*got \(3, 32, 32\)"):
        scorer.score(images[0], TEXTS[0])
    with pytest.raises(ConfigError, match="one text per image, got 2 texts for 6 images"):
        scorer.score(images, TEXTS[:2])
