"""Coverage beyond timm (issue 21, item 8): architectures from transformers, diffusers,
segmentation-models-pytorch, torchaudio, encodec, demucs and spandrel at rank="full", on both torch routes.

Every model is built from a (small) config with random weights -- nothing is downloaded -- and put in eval
mode; norm layers' affine parameters and running statistics, and parameters initialised to all zeros, are then
drawn at random (``perturb``), and BatchNorm running statistics are set from the example input
(``calibrate_bn``), so that outputs depend on the input as a trained model's do (a run where an output does not
is flagged, its error not counted). For each model and each route:

* ``own``: ``dsrewrite.rewrite(model, inputs, rank="full", measure_time=False)``: the fx route, or the
  module-swap fallback when the model does not trace;
* ``swap``: the module-swap route forced. ``rewrite`` has no public option for it, so this script makes
  ``dsrewrite.api.trace`` (the whole-model ``torch.fx`` trace in ``api._build``) raise, exactly as an
  untraceable model would; sub-modules are still traced by ``frontends/swap.py`` as usual.

Recorded per run: the route taken, convs found / rewritten / skipped (reasons grouped), the largest relative
L2 error over all floating-point tensor outputs of ``result.model`` against the original on a fresh random
input (float32; "exact" means <= 1e-4; integer outputs, e.g. codec codes, are compared for equality),
whether the original was mutated (state_dict values, module types, training flag, and its output on the
fresh input before and after), the rewrite's wall time, and when something raised: the error line and the
innermost frame. The models of one library run in one worker process (imported once); a model that hangs
(``--timeout``) or crashes the worker is one row, and a new worker takes the rest.

The script directory is dropped from ``sys.path`` in the child: a ``kernels.py`` there (``benchmarks/kernels.py``
was renamed ``kernel_speed.py`` for this) would shadow the ``kernels`` distribution transformers/diffusers probe for.

Usage:
  python benchmarks/real_models_libs.py                       # all models, both routes (~15 min, 2 cores)
  python benchmarks/real_models_libs.py --models whisper_encoder,smp_fpn_effb0
  python benchmarks/real_models_libs.py --code-at HEAD     # the committed code, not a tree being edited
  python benchmarks/real_models_libs.py --list
  python benchmarks/real_models_libs.py --table benchmarks/real_models_libs.json   # Markdown of a run
Writes benchmarks/real_models_libs.json and benchmarks/real_models_libs.md (``--out``, ``--md``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from _meta import code_env  # benchmarks/_meta.py: this script's folder is sys.path[0]
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ------------------------------------------------------------------------------------------ the models
# name -> (library, builder); a builder returns (model, example inputs as a tuple of positional args)
MODELS: Dict[str, Tuple[str, Callable[[], Tuple[Any, tuple]]]] = {}


def model(name: str, lib: str):
    def deco(fn):
        MODELS[name] = (lib, fn)
        return fn
    return deco


def _t():
    import torch
    return torch


# ---- the ones issue 21 names first
@model("whisper_encoder", "transformers")
def _():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    cfg = WhisperConfig(d_model=64, encoder_layers=1, encoder_attention_heads=2, decoder_layers=1,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                        max_source_positions=32, vocab_size=100)
    return WhisperEncoder(cfg), (_t().randn(1, 16, 64),)


@model("encodec_seanet_encoder", "encodec")
def _():
    from encodec.modules import SEANetEncoder
    return SEANetEncoder(n_filters=8, ratios=[4, 2], dimension=16, lstm=1), (_t().randn(1, 1, 800),)


@model("encodec_seanet_decoder", "encodec")
def _():
    from encodec.modules import SEANetDecoder
    return SEANetDecoder(n_filters=8, ratios=[4, 2], dimension=16, lstm=1), (_t().randn(1, 16, 100),)


@model("encodec_24khz", "encodec")
def _():
    from encodec.model import EncodecModel
    m = EncodecModel._get_model([1.5, 3.0], sample_rate=24000, channels=1, causal=True, model_norm="weight_norm")
    m.set_target_bandwidth(1.5)
    return m, (_t().randn(1, 1, 2400),)


@model("hf_encodec", "transformers")
def _():
    from transformers import EncodecConfig, EncodecModel
    cfg = EncodecConfig(hidden_size=16, num_filters=8, num_residual_layers=1, upsampling_ratios=[4, 2],
                        codebook_size=16, codebook_dim=16, target_bandwidths=[20.0], sampling_rate=8000,
                        audio_channels=1, num_lstm_layers=1)
    return EncodecModel(cfg), (_t().randn(1, 1, 800),)


@model("smp_fpn_effb0", "segmentation-models-pytorch")
def _():
    import segmentation_models_pytorch as smp
    return smp.FPN(encoder_name="efficientnet-b0", encoder_weights=None, classes=2), (_t().randn(1, 3, 64, 64),)


@model("diffusers_unet2d", "diffusers")
def _():
    from diffusers import UNet2DModel
    m = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=8)
    return m, (_t().randn(1, 3, 32, 32), _t().tensor([10]))


@model("diffusers_vae_kl", "diffusers")
def _():
    from diffusers import AutoencoderKL
    m = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      latent_channels=4, norm_num_groups=8, sample_size=32)
    return m, (_t().randn(1, 3, 32, 32),)


@model("diffusers_vae_kl_decoder", "diffusers")
def _():
    from diffusers import AutoencoderKL
    m = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      latent_channels=4, norm_num_groups=8, sample_size=32)
    return m.decoder, (_t().randn(1, 4, 16, 16),)


@model("diffusers_unet2d_condition", "diffusers")
def _():
    from diffusers import UNet2DConditionModel
    m = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                             block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                             norm_num_groups=8, attention_head_dim=8)
    return m, (_t().randn(1, 4, 16, 16), _t().tensor([10]), _t().randn(1, 7, 32))


@model("demucs_hdemucs", "demucs")
def _():
    from demucs.hdemucs import HDemucs
    return HDemucs(sources=["drums", "bass"], channels=8, depth=4, nfft=256), (_t().randn(1, 2, 4096),)


@model("demucs_demucs", "demucs")
def _():
    from demucs.demucs import Demucs
    m = Demucs(sources=["drums", "bass"], channels=8, depth=3)
    return m, (_t().randn(1, 2, m.valid_length(2000)),)


@model("spandrel_esrgan", "spandrel")
def _():
    from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet
    return RRDBNet(num_filters=16, num_blocks=2, scale=4), (_t().randn(1, 3, 24, 24),)


@model("spandrel_swinir", "spandrel")
def _():
    from spandrel.architectures.SwinIR.__arch.SwinIR import SwinIR
    m = SwinIR(img_size=32, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=8, upscale=2,
               upsampler="pixelshuffle", drop_path_rate=0.0)
    return m, (_t().randn(1, 3, 32, 32),)


# ---- transformers: audio
def _audio_kw(**kw):
    base = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=2, vocab_size=32)
    base.update(kw)
    return base


@model("wav2vec2", "transformers")
def _():
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    return Wav2Vec2Model(Wav2Vec2Config(**_audio_kw())), (_t().randn(1, 1600),)


@model("hubert", "transformers")
def _():
    from transformers import HubertConfig, HubertModel
    return HubertModel(HubertConfig(**_audio_kw())), (_t().randn(1, 1600),)


@model("sew", "transformers")
def _():
    from transformers import SEWConfig, SEWModel
    return SEWModel(SEWConfig(**_audio_kw(squeeze_factor=2))), (_t().randn(1, 1600),)


@model("sew_d", "transformers")
def _():
    from transformers import SEWDConfig, SEWDModel
    return SEWDModel(SEWDConfig(**_audio_kw(squeeze_factor=2))), (_t().randn(1, 1600),)


@model("wavlm", "transformers")
def _():
    from transformers import WavLMConfig, WavLMModel
    return WavLMModel(WavLMConfig(**_audio_kw())), (_t().randn(1, 1600),)


@model("data2vec_audio", "transformers")
def _():
    from transformers import Data2VecAudioConfig, Data2VecAudioModel
    return Data2VecAudioModel(Data2VecAudioConfig(**_audio_kw(num_conv_pos_embeddings=5))), (_t().randn(1, 1600),)


@model("wav2vec2_conformer", "transformers")
def _():
    from transformers import Wav2Vec2ConformerConfig, Wav2Vec2ConformerModel
    cfg = Wav2Vec2ConformerConfig(**_audio_kw(conv_depthwise_kernel_size=7, position_embeddings_type="relative"))
    return Wav2Vec2ConformerModel(cfg), (_t().randn(1, 1600),)


@model("speech2text_encoder", "transformers")
def _():
    from transformers import Speech2TextConfig
    from transformers.models.speech_to_text.modeling_speech_to_text import Speech2TextEncoder
    cfg = Speech2TextConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, conv_channels=16,
                            input_feat_per_channel=20, input_channels=1, vocab_size=50, max_source_positions=100)
    return Speech2TextEncoder(cfg), (_t().randn(1, 40, 20),)


@model("mimi", "transformers")
def _():
    from transformers import MimiConfig, MimiModel
    cfg = MimiConfig(hidden_size=32, num_filters=8, num_residual_layers=1, upsampling_ratios=[4, 2],
                     codebook_size=16, codebook_dim=16, num_quantizers=2, num_semantic_quantizers=1,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                     intermediate_size=32, sampling_rate=800, frame_rate=50, sliding_window=16, upsample_groups=32,
                     vector_quantization_hidden_dimension=16,
                     use_cache=False)
    return MimiModel(cfg), (_t().randn(1, 1, 800),)


@model("dac", "transformers")
def _():
    from transformers import DacConfig, DacModel
    cfg = DacConfig(encoder_hidden_size=8, downsampling_ratios=[2, 4], decoder_hidden_size=16,
                    upsampling_ratios=[4, 2], n_codebooks=2, codebook_size=16, codebook_dim=4, hidden_size=32,
                    sampling_rate=800)
    return DacModel(cfg), (_t().randn(1, 1, 800),)


@model("univnet", "transformers")
def _():
    from transformers import UnivNetConfig, UnivNetModel
    cfg = UnivNetConfig(model_in_channels=8, model_hidden_channels=8, num_mel_bins=16, resblock_kernel_sizes=[3, 3],
                        resblock_stride_sizes=[4, 4], resblock_dilation_sizes=[[1, 3], [1, 3]],
                        kernel_predictor_num_blocks=1, kernel_predictor_hidden_channels=8)
    # the noise is an input: UnivNet draws it at random otherwise
    return UnivNetModel(cfg), (_t().randn(1, 10, 16), _t().randn(1, 10, 8))


# ---- transformers: vision
@model("hf_resnet", "transformers")
def _():
    from transformers import ResNetConfig, ResNetModel
    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
    return ResNetModel(cfg), (_t().randn(1, 3, 64, 64),)


@model("hf_convnext", "transformers")
def _():
    from transformers import ConvNextConfig, ConvNextModel
    return ConvNextModel(ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])), (_t().randn(1, 3, 64, 64),)


@model("hf_bit", "transformers")
def _():
    from transformers import BitConfig, BitModel
    cfg = BitConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_groups=8)
    return BitModel(cfg), (_t().randn(1, 3, 64, 64),)


@model("hf_regnet", "transformers")
def _():
    from transformers import RegNetConfig, RegNetModel
    cfg = RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], groups_width=8)
    return RegNetModel(cfg), (_t().randn(1, 3, 64, 64),)


@model("hf_mobilenet_v2", "transformers")
def _():
    from transformers import MobileNetV2Config, MobileNetV2Model
    return MobileNetV2Model(MobileNetV2Config(image_size=64, depth_multiplier=0.35)), (_t().randn(1, 3, 64, 64),)


@model("hf_efficientnet", "transformers")
def _():
    from transformers import EfficientNetConfig, EfficientNetModel
    cfg = EfficientNetConfig(image_size=64, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320)
    return EfficientNetModel(cfg), (_t().randn(1, 3, 64, 64),)


@model("hf_levit", "transformers")
def _():
    from transformers import LevitConfig, LevitModel
    cfg = LevitConfig(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
                      key_dim=[8, 8, 8])
    return LevitModel(cfg), (_t().randn(1, 3, 64, 64),)


@model("hf_cvt", "transformers")
def _():
    from transformers import CvtConfig, CvtModel
    return CvtModel(CvtConfig(embed_dim=[16, 32, 48], depth=[1, 2, 3], num_heads=[1, 2, 3])), (_t().randn(1, 3, 64, 64),)


@model("hf_mobilevit", "transformers")
def _():
    from transformers import MobileViTConfig, MobileViTModel
    cfg = MobileViTConfig(image_size=64, hidden_sizes=[32, 40, 48], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64])
    return MobileViTModel(cfg), (_t().randn(1, 3, 64, 64),)


@model("hf_swin", "transformers")
def _():
    from transformers import SwinConfig, SwinModel
    cfg = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
    return SwinModel(cfg), (_t().randn(1, 3, 64, 64),)


@model("hf_segformer", "transformers")
def _():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation
    cfg = SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], num_attention_heads=[1, 1, 2, 2],
                          decoder_hidden_size=32, num_labels=4)
    return SegformerForSemanticSegmentation(cfg), (_t().randn(1, 3, 64, 64),)


@model("hf_dpt", "transformers")
def _():
    from transformers import DPTConfig, DPTForDepthEstimation
    cfg = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                    image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                    neck_hidden_sizes=[8, 16, 32, 64], fusion_hidden_size=16, head_hidden_size=8)
    return DPTForDepthEstimation(cfg), (_t().randn(1, 3, 32, 32),)


@model("hf_yolos", "transformers")
def _():
    from transformers import YolosConfig, YolosModel
    cfg = YolosConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                      image_size=[64, 64], patch_size=8, num_detection_tokens=5)
    return YolosModel(cfg), (_t().randn(1, 3, 64, 64),)


@model("hf_detr_resnet", "transformers")
def _():
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
    bb = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                      out_features=["stage4"])
    cfg = DetrConfig(use_timm_backbone=False, backbone_config=bb, use_pretrained_backbone=False, d_model=32,
                     encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5, num_labels=3)
    return DetrForObjectDetection(cfg), (_t().randn(1, 3, 64, 64),)


@model("hf_upernet_convnext", "transformers")
def _():
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation
    bb = ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                        out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = UperNetConfig(backbone_config=bb, hidden_size=16, auxiliary_in_channels=64, auxiliary_channels=16,
                        num_labels=4, use_pretrained_backbone=False)
    return UperNetForSemanticSegmentation(cfg), (_t().randn(1, 3, 64, 64),)


@model("hf_glpn", "transformers")
def _():
    from transformers import GLPNConfig, GLPNForDepthEstimation
    cfg = GLPNConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], num_attention_heads=[1, 1, 2, 2],
                     decoder_hidden_size=16)
    return GLPNForDepthEstimation(cfg), (_t().randn(1, 3, 64, 64),)


@model("hf_pvt_v2", "transformers")
def _():
    from transformers import PvtV2Config, PvtV2Model
    cfg = PvtV2Config(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2])
    return PvtV2Model(cfg), (_t().randn(1, 3, 64, 64),)


# ---- diffusers
@model("diffusers_vq", "diffusers")
def _():
    from diffusers import VQModel
    m = VQModel(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=3,
                num_vq_embeddings=16, norm_num_groups=8, sample_size=32)
    return m, (_t().randn(1, 3, 32, 32),)


@model("diffusers_autoencoder_tiny", "diffusers")
def _():
    from diffusers import AutoencoderTiny
    m = AutoencoderTiny(encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16),
                        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)
    return m, (_t().randn(1, 3, 32, 32),)


@model("diffusers_oobleck", "diffusers")
def _():
    from diffusers import AutoencoderOobleck
    m = AutoencoderOobleck(encoder_hidden_size=8, downsampling_ratios=[2, 4], decoder_channels=8,
                           decoder_input_channels=4, audio_channels=2, channel_multiples=[1, 2])
    return m, (_t().randn(1, 2, 256),)


# ---- segmentation-models-pytorch (encoder_weights=None: random)
def _smp(arch: str, encoder: str, size: int = 64):
    import segmentation_models_pytorch as smp
    return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=2), (_t().randn(1, 3, size, size),)


model("smp_unet_resnet18", "segmentation-models-pytorch")(lambda: _smp("Unet", "resnet18"))
model("smp_unetpp_resnet18", "segmentation-models-pytorch")(lambda: _smp("UnetPlusPlus", "resnet18"))
model("smp_deeplabv3plus_resnet18", "segmentation-models-pytorch")(lambda: _smp("DeepLabV3Plus", "resnet18"))
model("smp_linknet_mobilenet_v2", "segmentation-models-pytorch")(lambda: _smp("Linknet", "mobilenet_v2"))
model("smp_pspnet_resnet18", "segmentation-models-pytorch")(lambda: _smp("PSPNet", "resnet18"))
model("smp_manet_resnet18", "segmentation-models-pytorch")(lambda: _smp("MAnet", "resnet18"))
model("smp_pan_resnet18", "segmentation-models-pytorch")(lambda: _smp("PAN", "resnet18", 128))
model("smp_segformer_mit_b0", "segmentation-models-pytorch")(lambda: _smp("Segformer", "mit_b0"))
model("smp_upernet_resnet18", "segmentation-models-pytorch")(lambda: _smp("UPerNet", "resnet18"))
model("smp_fpn_timm_effb0", "segmentation-models-pytorch")(lambda: _smp("FPN", "timm-efficientnet-b0"))
model("smp_unet_tu_regnety_002", "segmentation-models-pytorch")(lambda: _smp("Unet", "tu-regnety_002"))


# ---- demucs
@model("demucs_htdemucs", "demucs")
def _():
    from demucs.htdemucs import HTDemucs
    m = HTDemucs(sources=["drums", "bass"], channels=8, depth=4, nfft=2048, t_layers=1, t_heads=2, bottom_channels=0,
                 segment=0.25, samplerate=8000)
    return m, (_t().randn(1, 2, 2000),)


# ---- torchaudio
@model("torchaudio_wav2vec2", "torchaudio")
def _():
    from torchaudio.models import wav2vec2_model
    m = wav2vec2_model(extractor_mode="group_norm", extractor_conv_layer_config=[(16, 10, 5), (16, 3, 2), (16, 3, 2)],
                       extractor_conv_bias=False, encoder_embed_dim=32, encoder_projection_dropout=0.0,
                       encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4, encoder_num_layers=1,
                       encoder_num_heads=2, encoder_attention_dropout=0.0, encoder_ff_interm_features=32,
                       encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=False,
                       encoder_layer_drop=0.0, aux_num_out=None)
    return m, (_t().randn(1, 1600),)


@model("torchaudio_convtasnet", "torchaudio")
def _():
    from torchaudio.models import ConvTasNet
    m = ConvTasNet(num_sources=2, enc_kernel_size=16, enc_num_feats=32, msk_kernel_size=3, msk_num_feats=16,
                   msk_num_hidden_feats=32, msk_num_layers=2, msk_num_stacks=1)
    return m, (_t().randn(1, 1, 800),)


@model("torchaudio_wavernn", "torchaudio")
def _():
    from torchaudio.models import WaveRNN
    m = WaveRNN(upsample_scales=[2, 4], n_classes=16, hop_length=8, n_res_block=1, n_rnn=16, n_fc=16,
                kernel_size=5, n_freq=16, n_hidden=16, n_output=16)
    return m, (_t().randn(1, 1, (12 - 5 + 1) * 8), _t().randn(1, 1, 16, 12))


@model("torchaudio_hdemucs", "torchaudio")
def _():
    from torchaudio.models import HDemucs
    return HDemucs(sources=["drums", "bass"], channels=8, depth=4, nfft=256), (_t().randn(1, 2, 4096),)


@model("torchaudio_wav2letter", "torchaudio")
def _():
    from torchaudio.models import Wav2Letter
    return Wav2Letter(num_classes=10, input_type="mfcc", num_features=13), (_t().randn(1, 13, 60),)


# ---- spandrel (arch classes built directly)
@model("spandrel_hat", "spandrel")
def _():
    from spandrel.architectures.HAT.__arch.HAT import HAT
    m = HAT(img_size=32, embed_dim=16, depths=(1,), num_heads=(2,), window_size=8, upscale=2,
            upsampler="pixelshuffle", compress_ratio=2, squeeze_factor=4, drop_path_rate=0.0)
    return m, (_t().randn(1, 3, 32, 32),)


@model("spandrel_swin2sr", "spandrel")
def _():
    from spandrel.architectures.Swin2SR.__arch.Swin2SR import Swin2SR
    m = Swin2SR(img_size=32, embed_dim=16, depths=[1], num_heads=[2], window_size=8, upscale=2,
                upsampler="pixelshuffle", drop_path_rate=0.0)
    return m, (_t().randn(1, 3, 32, 32),)


@model("spandrel_dat", "spandrel")
def _():
    from spandrel.architectures.DAT.__arch.DAT import DAT
    m = DAT(img_size=32, embed_dim=16, split_size=[2, 4], depth=[1], num_heads=[2], upscale=2, drop_path_rate=0.0)
    return m, (_t().randn(1, 3, 32, 32),)


@model("spandrel_span", "spandrel")
def _():
    from spandrel.architectures.SPAN.__arch.span import SPAN
    return SPAN(num_in_ch=3, num_out_ch=3, feature_channels=16, upscale=2), (_t().randn(1, 3, 32, 32),)


@model("spandrel_omnisr", "spandrel")
def _():
    from spandrel.architectures.OmniSR.__arch.OmniSR import OmniSR
    return OmniSR(num_feat=16, window_size=8, up_scale=2), (_t().randn(1, 3, 32, 32),)


@model("spandrel_compact", "spandrel")
def _():
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact
    return SRVGGNetCompact(num_feat=16, num_conv=4, upscale=2), (_t().randn(1, 3, 32, 32),)


@model("spandrel_realcugan", "spandrel")
def _():
    from spandrel.architectures.RealCUGAN.__arch.upcunet_v3 import UpCunet2x
    return UpCunet2x(in_channels=3, out_channels=3), (_t().randn(1, 3, 64, 64),)


@model("spandrel_scunet", "spandrel")
def _():
    from spandrel.architectures.SCUNet.__arch.SCUNet import SCUNet
    return SCUNet(config=[1] * 7, dim=64, input_resolution=64), (_t().randn(1, 3, 64, 64),)


@model("spandrel_nafnet", "spandrel")
def _():
    from spandrel.architectures.NAFNet.__arch.NAFNet_arch import NAFNet
    return NAFNet(width=16, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1]), (_t().randn(1, 3, 32, 32),)


@model("spandrel_rcan", "spandrel")
def _():
    from spandrel.architectures.RCAN.__arch.rcan_arch import RCAN
    return RCAN(scale=2, n_resgroups=1, n_resblocks=2, n_feats=16, reduction=4), (_t().randn(1, 3, 32, 32),)


@model("spandrel_safmn", "spandrel")
def _():
    from spandrel.architectures.SAFMN.__arch.safmn import SAFMN
    return SAFMN(dim=16, n_blocks=2, upscaling_factor=2), (_t().randn(1, 3, 32, 32),)


@model("spandrel_realplksr", "spandrel")
def _():
    from spandrel.architectures.PLKSR.__arch.RealPLKSR import RealPLKSR
    return RealPLKSR(dim=16, n_blocks=2, upscaling_factor=2, kernel_size=7), (_t().randn(1, 3, 32, 32),)


@model("spandrel_drunet", "spandrel")
def _():
    from spandrel.architectures.DRUNet.__arch.network_unet import DRUNet
    return DRUNet(in_nc=2, out_nc=1, nc=[16, 32, 64, 128], nb=1), (_t().randn(1, 2, 32, 32),)


@model("spandrel_lama", "spandrel")
def _():
    from spandrel.architectures.LaMa.__arch.LaMa import LaMa
    return LaMa(in_nc=4, out_nc=3), (_t().randn(1, 3, 64, 64), (_t().rand(1, 1, 64, 64) > 0.7).float())


# ------------------------------------------------------------------------------------------ one run (child)
def perturb(m) -> int:
    """Random weights as a trained model would have them: norm layers' affine parameters and running statistics
    drawn around their defaults (gamma ~ U(0.5, 1.5), beta ~ U(-0.1, 0.1), mean ~ N(0, 0.1), var ~ U(0.5, 1.5)),
    and parameters initialised to all zeros (zero-init residual gammas, zero convs) drawn ~ N(0, 0.02). Without
    this some configs (transformers' EfficientNet and MobileViT) give outputs that do not depend on the input at
    all, and the error comparison would measure nothing. Returns how many tensors were changed."""
    import torch
    from torch import nn
    g = torch.Generator().manual_seed(7)
    n = 0
    with torch.no_grad():
        norms = [x for x in m.modules() if isinstance(x, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))]
        for x in norms:
            if getattr(x, "weight", None) is not None and isinstance(x.weight, torch.Tensor):
                x.weight.copy_(torch.rand(x.weight.shape, generator=g) + 0.5)
                n += 1
            if getattr(x, "bias", None) is not None and isinstance(x.bias, torch.Tensor):
                x.bias.copy_((torch.rand(x.bias.shape, generator=g) - 0.5) * 0.2)
                n += 1
            if getattr(x, "running_mean", None) is not None:
                x.running_mean.copy_(torch.randn(x.running_mean.shape, generator=g) * 0.1)
                x.running_var.copy_(torch.rand(x.running_var.shape, generator=g) + 0.5)
                n += 1
        normed = {id(p) for x in norms for p in x.parameters(recurse=False)}
        for p in m.parameters():
            if id(p) not in normed and p.is_floating_point() and p.numel() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                n += 1
    return n


def calibrate_bn(m, args: tuple) -> bool:
    """BatchNorm running statistics set to those of the example input (one forward with only the BatchNorm layers
    in train mode, cumulative averaging), so activations keep unit scale through the network as in a trained model:
    with transformers' small init (std 0.02) and unit running variances, the input's signal otherwise fades to
    float32 rounding within a few blocks (EfficientNet, MobileViT) and the error comparison measures nothing.
    Restores the perturbed statistics if that forward fails (e.g. a BatchNorm over one value per channel)."""
    import torch
    from torch import nn
    bns = [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm) and x.track_running_stats]
    if not bns:
        return False
    saved = [(x.momentum, x.running_mean.clone(), x.running_var.clone(), x.num_batches_tracked.clone()) for x in bns]
    for x in bns:
        x.reset_running_stats()
        x.momentum = None
        x.train()
    ok = True
    try:
        with torch.no_grad():
            m(*_c(args))
    except Exception:  # noqa: BLE001
        ok = False
    for x, (mom, mean, var, nbt) in zip(bns, saved):
        x.momentum = mom
        x.eval()
        if not ok:
            x.running_mean.copy_(mean)
            x.running_var.copy_(var)
            x.num_batches_tracked.copy_(nbt)
    return ok


def _tensors(out: Any, prefix: str = "out") -> List[Tuple[str, Any]]:
    """Every tensor in a model output (tensors, tuples/lists, dicts and ModelOutput/BaseOutput), with a path."""
    import torch
    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, dict):  # ModelOutput / BaseOutput are OrderedDicts
        return [t for k, v in out.items() for t in _tensors(v, f"{prefix}.{k}")]
    if isinstance(out, (list, tuple)):
        return [t for i, v in enumerate(out) for t in _tensors(v, f"{prefix}[{i}]")]
    return []


def _compare(ref: Any, new: Any) -> dict:
    """Largest relative L2 error over floating outputs; integer/bool outputs compared for equality."""
    import torch
    a, b = _tensors(ref), _tensors(new)
    res: dict = {"outputs": len(a)}
    if [n for n, _ in a] != [n for n, _ in b] or any(x.shape != y.shape for (_, x), (_, y) in zip(a, b)):
        res["output_mismatch"] = f"outputs differ in structure or shape: {[(n, tuple(t.shape)) for n, t in a][:4]} vs " \
                                 f"{[(n, tuple(t.shape)) for n, t in b][:4]}"
        return res
    worst, where, int_diff = 0.0, None, 0
    for (n, x), (_, y) in zip(a, b):
        if x.is_floating_point() or x.is_complex():
            x64, y64 = x.detach().to(torch.complex128 if x.is_complex() else torch.float64), y.detach().to(
                torch.complex128 if y.is_complex() else torch.float64)
            den = x64.abs().norm()
            e = float((y64 - x64).abs().norm() / den) if den > 0 else float((y64 - x64).abs().norm())
            if e != e:  # nan
                e = float("inf")
            if e >= worst:
                worst, where = e, n
        else:
            int_diff += int((x != y).sum())
    res.update(rel_error=worst, worst_output=where)
    if int_diff:
        res["int_elements_differing"] = int_diff
    return res


def _snapshot(m) -> dict:
    return {"state": {k: v.detach().clone() for k, v in m.state_dict().items()},
            "types": [(n, f"{type(x).__module__}.{type(x).__qualname__}") for n, x in m.named_modules()],
            "training": m.training}


def _mutations(m, snap: dict) -> List[str]:
    import torch
    now = _snapshot(m)
    what = []
    if set(now["state"]) != set(snap["state"]):
        gone, new = set(snap["state"]) - set(now["state"]), set(now["state"]) - set(snap["state"])
        what.append(f"state_dict keys changed (-{len(gone)} +{len(new)}, e.g. {sorted(gone)[:2]} -> {sorted(new)[:2]})")
    else:
        diff = [k for k, v in snap["state"].items()
                if v.shape != now["state"][k].shape or v.dtype != now["state"][k].dtype
                or not torch.equal(v, now["state"][k])]
        if diff:
            what.append(f"state_dict values changed ({len(diff)}: {diff[:3]})")
    if now["types"] != snap["types"]:
        before, after = dict(snap["types"]), dict(now["types"])
        changed = [n for n in set(before) | set(after) if before.get(n) != after.get(n)]
        what.append(f"module types changed ({len(changed)}: " + ", ".join(
            f"{n or '<root>'}: {before.get(n, '-').rsplit('.', 1)[-1]} -> {after.get(n, '-').rsplit('.', 1)[-1]}"
            for n in sorted(changed)[:3]) + ")")
    if now["training"] != snap["training"]:
        what.append("training flag changed")
    return what


def _fresh(args: tuple, seed: int) -> tuple:
    """Inputs of the same shapes: new random floats (same distribution kind), integer/bool inputs kept."""
    import torch
    g = torch.Generator().manual_seed(seed)
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            if ((a == 0) | (a == 1)).all():  # a mask
                out.append((torch.rand(a.shape, generator=g) > 0.7).to(a.dtype))
            else:
                out.append(torch.randn(a.shape, generator=g, dtype=a.dtype))
        else:
            out.append(a)
    return tuple(out)


def _frame(e: BaseException) -> Optional[str]:
    """The innermost frame outside torch itself, its path shortened (site-packages/, dsrewrite/)."""
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return None
    outside = [f for f in tb if "/site-packages/torch/" not in f.filename]
    f = (outside or tb)[-1]
    path = f.filename
    for cut in ("/site-packages/", "/" + os.path.basename(ROOT) + "/"):
        if cut in path:
            path = path.split(cut, 1)[1]
            break
    if "/dsrewrite/" in path and not path.startswith("dsrewrite/"):  # an exported copy (--code-at)
        path = "dsrewrite/" + path.split("/dsrewrite/", 1)[1]
    return f"{path}:{f.lineno} in {f.name}"


def _error_line(e: BaseException) -> dict:
    """The error's first line, its number of lines, where it was raised and, for an error re-raised from another
    (``raise ... from None`` keeps it as ``__context__``), the innermost original error and where that was raised."""
    msg = str(e).strip().splitlines()
    out = {"error": f"{type(e).__name__}: {msg[0] if msg else ''}"[:600], "error_lines": len(msg), "raised_at": _frame(e)}
    inner, seen = e, set()
    while (inner.__cause__ or inner.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        inner = inner.__cause__ or inner.__context__
    if inner is not e:
        m = str(inner).strip().splitlines()
        out.update(cause=f"{type(inner).__name__}: {m[0] if m else ''}"[:300], cause_at=_frame(inner))
    return out


def _c(args: tuple) -> tuple:
    """Fresh copies of the inputs for every call: some models change their input in place (spandrel's RCAN)."""
    return tuple(a.clone() if hasattr(a, "clone") else a for a in args)


def run_route(name: str, route: str) -> dict:
    import torch

    import dsrewrite
    import dsrewrite.api as api

    lib, build = MODELS[name]
    row: dict = {"model": name, "library": lib, "route_asked": route}
    torch.manual_seed(0)
    try:
        m, args = build()
        m = m.eval()
        row["perturbed_tensors"] = perturb(m)
        row["bn_calibrated"] = calibrate_bn(m, args)
    except Exception as e:  # noqa: BLE001 - the benchmark's own config does not build: a row, not a pass failure
        row.update({k: v for k, v in _error_line(e).items() if k == "error"})
        row["error"] = "build: " + row["error"]
        row["stage"] = "build"
        return row
    row["params"] = sum(p.numel() for p in m.parameters())
    row["inputs"] = [list(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
    xt = _fresh(args, 1234)
    try:
        with torch.no_grad():
            m(*_c(args))
            y_ref = m(*_c(xt))
            y_ref2 = m(*_c(xt))
    except Exception as e:  # noqa: BLE001
        row.update(_error_line(e))
        row["error"] = "original forward: " + row["error"]
        row["stage"] = "original"
        return row
    with torch.no_grad():
        y_ex = m(*_c(args))
    sens = _compare(y_ref, y_ex)  # the output on the example input vs the fresh one: does it depend on the input?
    row["input_sensitivity"] = sens.get("rel_error")
    if not sens.get("output_mismatch") and not sens.get("rel_error") and not sens.get("int_elements_differing"):
        row["output_independent_of_input"] = True
    det = _compare(y_ref, y_ref2)
    if det.get("rel_error", 0) > 0 or det.get("int_elements_differing") or det.get("output_mismatch"):
        row["nondeterministic_original"] = det
    snap = _snapshot(m)
    real_trace = api.trace
    if route == "swap":
        def untraceable(*a, **k):
            raise RuntimeError("whole-model tracing disabled by benchmarks/real_models_libs.py (swap route forced)")
        api.trace = untraceable
    t0 = time.perf_counter()
    try:
        res = dsrewrite.rewrite(m, _c(args), rank="full", measure_time=False)
    except Exception as e:  # noqa: BLE001
        row.update(_error_line(e))
        row["stage"] = "rewrite"
        row["rewrite_s"] = round(time.perf_counter() - t0, 2)
        res = None
    finally:
        api.trace = real_trace
    if res is not None:
        row["rewrite_s"] = round(time.perf_counter() - t0, 2)
        rep = res.report
        row.update(route=rep.route, convs=len(rep.layers), rewritten=len(rep.rewritten), skipped=len(rep.skipped),
                   folded=sum(1 for L in rep.rewritten if L.note and "folded" in L.note),
                   self_check_failed=sum(1 for L in rep.skipped if (L.reason or "").startswith("self-check failed")),
                   notes=[n for n in rep.notes if n][:4])
        reasons: dict = {}
        for L in rep.skipped:
            key = (L.reason or "").split(" (")[0]
            for short in ("already depthwise", "grouped convolution", "self-check failed", "unknown conv class"):
                key = short if key.startswith(short) else key
            reasons[key] = reasons.get(key, 0) + 1
        row["skip_reasons"] = reasons
        try:
            with torch.no_grad():
                y_new = res.model(*_c(xt))
            row.update(_compare(y_ref, y_new))
        except Exception as e:  # noqa: BLE001
            err = _error_line(e)
            row.update(err, error="rewritten model fails: " + err["error"], stage="rewritten forward")
    mut = _mutations(m, snap)
    try:
        with torch.no_grad():
            y_after = m(*_c(xt))
        c = _compare(y_ref, y_after)
        if c.get("output_mismatch") or c.get("rel_error", 0) > 0 or c.get("int_elements_differing"):
            if "nondeterministic_original" not in row:
                mut.append(f"original's output changed (rel. error {c.get('rel_error')})")
    except Exception as e:  # noqa: BLE001
        mut.append("original no longer runs: " + _error_line(e)["error"])
    row["mutated"] = mut
    return row


def child(names: List[str], out_path: str, routes: List[str]) -> None:
    """Run ``names`` one after the other in this process, appending one JSON line per (model, route) when done."""
    import warnings

    import torch
    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    for name in names:
        for route in routes:
            t0 = time.perf_counter()
            row = run_route(name, route)
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            with open(out_path, "a") as f:
                f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------ parent
def run_group(names: List[str], routes: List[str], timeout: float, env: Optional[dict], report) -> List[dict]:
    """Run ``names`` (one library) in a worker process that imports the library once. A model that writes no row for
    ``timeout`` seconds is killed (a row saying so) and a new worker takes the rest; a crash likewise."""
    rows: List[dict] = []
    todo = list(names)
    while todo:
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as tf:
            path = tf.name
        cmd = [sys.executable, os.path.abspath(__file__), "--child", ",".join(todo), "--child-out", path,
               "--routes", ",".join(routes)]
        errf = tempfile.TemporaryFile("w+")
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf, text=True, cwd=tempfile.gettempdir(), env=env)
        seen, last, crash = 0, time.perf_counter(), None
        while True:
            rc = p.poll()
            with open(path) as f:
                got = [json.loads(line) for line in f if line.strip()]
            for r in got[seen:]:
                rows.append(r)
                report(r)
            if len(got) > seen:
                seen, last = len(got), time.perf_counter()
            if rc is not None:
                if rc:
                    errf.seek(0)
                    tail = [x for x in errf.read().strip().splitlines() if x.strip()][-1:]
                    crash = f"worker exited {rc}: {tail[0][:300] if tail else ''}"
                break
            if time.perf_counter() - last > timeout:
                p.kill()
                p.wait()
                crash = f"timeout: no result for {timeout:.0f} s"
                break
            time.sleep(0.5)
        os.unlink(path)
        errf.close()
        done = {(r["model"], r["route_asked"]) for r in rows}
        todo = [n for n in todo if any((n, r) not in done for r in routes)]
        if crash and todo:  # the model it was on gets the error; a new worker takes the rest
            cur = todo.pop(0)
            for r in routes:
                if (cur, r) not in done:
                    row = {"model": cur, "library": MODELS[cur][0], "route_asked": r, "error": crash, "stage": "harness"}
                    rows.append(row)
                    report(row)
        elif not crash:
            todo = []
    return rows


def _exact(r: dict) -> bool:
    return "error" not in r and not r.get("output_independent_of_input") and not r.get("output_mismatch") and r.get("rel_error") is not None and r["rel_error"] <= 1e-4


def _cell(r: Optional[dict]) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "**error**: " + r["error"].replace("|", "\\|")[:220]
    if r.get("output_mismatch"):
        return "**outputs differ in shape**"
    s = f"{r.get('rewritten')}/{r.get('convs')}, {r['rel_error']:.1e}"
    if r["rel_error"] > 1e-4:
        s = "**NOT EXACT** " + s
    if r.get("self_check_failed"):
        s += f", {r['self_check_failed']} self-check skips"
    if r.get("int_elements_differing"):
        s += f", {r['int_elements_differing']} int elements differ"
    if r.get("output_independent_of_input"):
        s += ", **output independent of the input: not measured**"
    return s


def markdown(rows: List[dict], meta: Optional[dict] = None) -> str:
    by: Dict[str, Dict[str, dict]] = {}
    for r in rows:
        by.setdefault(r["model"], {})[r["route_asked"]] = r
    out = []
    if meta:
        out.append(f"Run {meta.get('date')} on dsrewrite {meta.get('code') or 'at ' + str(meta.get('commit'))}"
                   f"{' (working tree under dsrewrite/ modified)' if meta.get('dirty') else ''}, torch "
                   f"{meta.get('torch')}, {meta.get('threads')} threads; `{meta.get('command')}`. Versions: "
                   + ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()) + ".\n")
    runs = list(rows)
    n_ex = sum(_exact(r) for r in runs)
    n_err = sum("error" in r for r in runs)
    n_mut = sum(bool(r.get("mutated")) for r in runs)
    n_ind = sum(1 for r in runs if "error" not in r and r.get("output_independent_of_input"))
    n_bad = sum(1 for r in runs if "error" not in r and not _exact(r) and not r.get("output_independent_of_input"))
    out.append(f"{len(by)} models, {len(runs)} runs: {n_ex} exact (<= 1e-4, all float outputs), {n_bad} not exact, "
               f"{n_ind} not measurable (the original's output does not depend on the input), {n_err} raised, "
               f"{n_mut} mutated the original.\n")
    out.append("| model | library | params | route taken | rewritten / convs | skipped (reasons) | own route: rel. error |"
               " swap route forced: rewritten / convs, rel. error | original mutated |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for name, pair in by.items():
        own, sw = pair.get("own"), pair.get("swap")
        base = own if own is not None and "convs" in own else (sw if sw is not None and "convs" in sw else own or sw)
        reasons = ", ".join(f"{k} {v}" for k, v in sorted((base or {}).get("skip_reasons", {}).items(),
                                                            key=lambda kv: -kv[1])) or "-"
        mut = "; ".join(f"{k}: {'; '.join(r['mutated'])}" for k, r in pair.items() if r.get("mutated")) or "no"
        params = f"{base['params'] / 1e6:.2f}M" if base and base.get("params") else "-"
        out.append(f"| {name} | {base.get('library', '-') if base else '-'} | {params} | "
                   f"{own.get('route', '-') if own else '-'} | "
                   f"{(str(base.get('rewritten')) + ' / ' + str(base.get('convs'))) if base and 'convs' in base else '-'} | "
                   f"{reasons} | {_cell(own)} | {_cell(sw)} | {mut.replace('|', '/')} |")
    errs: Dict[str, List[str]] = {}
    for r in runs:
        if "error" in r:
            errs.setdefault(r["error"], []).append(f"{r['model']} ({r['route_asked']})")
    if errs:
        out.append("\nErrors, by message (the raising frame in the JSON's `raised_at`):\n")
        for e, who in sorted(errs.items(), key=lambda kv: -len(kv[1])):
            out.append(f"- `{e}` -- {', '.join(who)}")
    return "\n".join(out) + "\n"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    v = {}
    for d in ("transformers", "diffusers", "segmentation_models_pytorch", "torchaudio", "encodec", "demucs", "spandrel", "timm"):
        try:
            v[d] = version(d)
        except PackageNotFoundError:
            v[d] = None
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated names (default: all; --list)")
    ap.add_argument("--routes", default="own,swap")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one model and route may run")
    ap.add_argument("--out", default=os.path.join(HERE, "real_models_libs.json"))
    ap.add_argument("--md", default=os.path.join(HERE, "real_models_libs.md"))
    ap.add_argument("--code-at", metavar="REV", help="run on dsrewrite as committed at REV (e.g. HEAD), exported with "
                    "git archive, instead of the importable (working-tree) package")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", metavar="JSON", help="only print the Markdown table of an earlier run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    routes = a.routes.split(",")
    if a.child:
        child(a.child.split(","), a.child_out, routes)
        return
    if a.list:
        for n, (lib, _) in MODELS.items():
            print(f"{n:32s} {lib}")
        return
    if a.table:
        with open(a.table) as f:
            d = json.load(f)
        print(markdown(d["rows"], d.get("meta")))
        return
    header = ("# Coverage beyond timm: transformers, diffusers, smp, torchaudio, encodec, demucs, spandrel at "
              "rank=\"full\"\n\n")
    names = a.models.split(",") if a.models else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown models: {unknown} (see --list)")
    env = None
    if a.code_at:
        env, code_commit = code_env(a.code_at)
    where = subprocess.run([sys.executable, "-c", "import dsrewrite, os; print(os.path.dirname(dsrewrite.__file__))"],
                           capture_output=True, text=True, env=env, cwd=tempfile.gettempdir()).stdout.strip()
    print(f"dsrewrite imported from {where}", flush=True)
    rows: List[dict] = []
    t0 = time.perf_counter()
    def show(r: dict) -> None:
        err = r.get("rel_error")
        print(f"{r['model']:30s} {r['route_asked']:4s} {r.get('route', '-'):26s} {r.get('rewritten', '-')!s:>3}/"
              f"{r.get('convs', '-')!s:<4} err {'-' if err is None else f'{err:.1e}'} "
              f"{'MUTATED ' if r.get('mutated') else ''}{r.get('error', '')[:150]}  [{r.get('wall_s', '-')} s]", flush=True)

    groups: Dict[str, List[str]] = {}
    for n in names:  # one worker per library, in the order the models are listed
        groups.setdefault(MODELS[n][0], []).append(n)
    for lib, group in groups.items():
        rows.extend(run_group(group, routes, a.timeout, env, show))
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: (order[r["model"]], routes.index(r["route_asked"])))
    import torch

    if a.code_at:
        commit, dirty = code_commit[:7], False
    else:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "dsrewrite", "kernels"], capture_output=True,
                                    text=True, cwd=ROOT).stdout.strip())
    argv = sys.argv[1:]
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "dirty": dirty,
            "code": f"git archive of {a.code_at} ({commit})" if a.code_at else f"working tree ({where})",
            "torch": torch.__version__,
            "threads": int(os.environ.get("BENCH_THREADS", "2")), "python": sys.version.split()[0],
            "machine": f"{os.uname().machine}, {os.cpu_count()} cores", "versions": _versions(),
            "command": "python benchmarks/real_models_libs.py " + " ".join(argv),
            "total_s": round(time.perf_counter() - t0, 1)}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = markdown(rows, meta)
    with open(a.md, "w") as f:
        f.write(header + md)
    print("\n" + md)


if __name__ == "__main__":
    # a kernels.py in benchmarks/ (there was one) would, as sys.path[0], shadow the `kernels` distribution transformers probes
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in (HERE, ROOT)]
    main()
