"""Build tiny NeMo models with random weights, save them as .nemo and dump NeMo's own outputs as references.

Run with a NeMo interpreter (never the project's venv):

    $NEMO_PYTHON tests/nemo_parity/make_models.py OUT_DIR a.wav b.wav

Writes, for each model NAME in MODELS: OUT_DIR/NAME.nemo and OUT_DIR/NAME.pt, a dict of plain tensors
(weights_only-loadable) computed by NeMo in eval mode (no dither, no masking) on the given audio files:
  features (B, n_mels, T) and feature_lengths (B,)       NeMo preprocessor output (padded to pad_to)
  encoded (B, D, T') and encoded_lengths (B,)            ConformerEncoder output
  and per model kind:
  contrastive: gumbel_ids (B, T', G), target_ids (B, T'), quantized (B, T', proj_dim) from the contrastive loss's
               Gumbel quantizer on the clean stacked features; mlm_logits (B, T', C) and mlm_log_probs
  nest:        tokens (B, T', books) from the random-projection quantizer; logits (B, T', C * books) and
               log_probs (B, T', C, books) from the MultiSoftmaxDecoder
  ctc:         logits (B, T', V + 1) and log_probs from ConvASRDecoder (blank last)
  ctc_bpe:     the same, plus token_ids of `BPE_SENTENCE` (stored as sentence_utf8) from NeMo's tokenizer

The configs below are NeMo's own recipes (examples/asr/conf: ssl/conformer/conformer_ssl.yaml with the loss_list
of contrastive + mlm, ssl/nest/nest_fast-conformer.yaml, fastconformer/fast-conformer_ctc_char.yaml and
_ctc_bpe.yaml) shrunk to hidden 64, 2 layers and small codebooks so the whole script runs in well under a minute.
Every parameter and BatchNorm statistic is then randomised (NeMo initialises biases u/v, norms and BN statistics to
constants, which would hide mapping mistakes).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import soundfile
import torch
from omegaconf import OmegaConf

BPE_SENTENCE = "the quick brown fox jumps over the lazy dog"

PREPROCESSOR = """
_target_: nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor
sample_rate: 16000
normalize: per_feature
window_size: 0.025
window_stride: 0.01
window: hann
features: 80
n_fft: 512
log: true
frame_splicing: 1
dither: 0.00001
pad_to: 16
pad_value: 0.0
"""

ENCODER_COMMON = """
_target_: nemo.collections.asr.modules.ConformerEncoder
feat_in: 80
feat_out: -1
n_layers: 2
d_model: 64
ff_expansion_factor: 4
self_attention_model: rel_pos
n_heads: 4
att_context_size: [-1, -1]
xscaling: true
pos_emb_max_len: 5000
dropout: 0.1
dropout_pre_encoder: 0.1
dropout_emb: 0.0
dropout_att: 0.1
"""

# ssl/conformer/conformer_ssl.yaml (Conformer, 4x striding, batch norm) with its documented loss_list of contrastive
# on Gumbel-quantized targets + MLM on the quantizer ids; untie_biases false exercises the shared u/v biases.
CONTRASTIVE = """
sample_rate: 16000
spec_augment:
  _target_: nemo.collections.asr.modules.MaskedPatchAugmentation
  freq_masks: 3
  freq_width: 20
  patch_size: 48
  mask_patches: 0.5
encoder:
  subsampling: striding
  subsampling_factor: 4
  subsampling_conv_channels: -1
  untie_biases: false
  conv_kernel_size: 15
  conv_norm_type: batch_norm
decoder_out: 32
loss_list:
  contrastive:
    decoder:
      _target_: nemo.collections.asr.modules.ConvASRDecoderReconstruction
      feat_in: 64
      feat_hidden: 32
      feat_out: 32
      stride_layers: 0
      non_stride_layers: 0
    loss:
      _target_: nemo.collections.asr.losses.ContrastiveLoss
      in_dim: 80
      proj_dim: 32
      combine_time_steps: 4
      quantized_targets: true
      codebook_size: 12
      num_groups: 2
      sample_from_same_utterance_only: true
      sample_from_non_masked: false
  mlm:
    decoder:
      _target_: nemo.collections.asr.modules.ConvASRDecoder
      feat_in: 64
      num_classes: 144
    loss:
      _target_: nemo.collections.asr.losses.MLMLoss
      combine_time_steps: 4
    targets_from_loss: contrastive
    loss_alpha: 1000.0
"""

# ssl/nest/nest_fast-conformer.yaml (FastConformer, 8x dw_striding), 2 codebooks of 64 codes.
NEST = """
sample_rate: 16000
num_classes: 64
num_books: 2
code_dim: 16
squeeze_single: false
mask_position: pre_conv
spec_augment:
  _target_: nemo.collections.asr.modules.SpectrogramAugmentation
  freq_masks: 0
  time_masks: 0
  freq_width: 27
  time_width: 0.05
masking:
  _target_: nemo.collections.asr.modules.RandomBlockMasking
  block_size: 40
  mask_prob: 0.01
  feat_in: 80
  freeze: true
  allow_overlap: true
quantizer:
  _target_: nemo.collections.asr.modules.RandomProjectionVectorQuantizer
  feat_in: 80
  code_dim: 16
  num_books: 2
  num_classes: 64
  dist_fn: l2
  freeze: true
  squeeze_single: false
  combine_time_steps: 8
encoder:
  use_bias: true
  subsampling: dw_striding
  subsampling_factor: 8
  subsampling_conv_channels: 32
  causal_downsampling: false
  att_context_style: regular
  untie_biases: true
  conv_kernel_size: 9
  conv_norm_type: batch_norm
  conv_context_size: null
  stochastic_depth_drop_prob: 0.0
  stochastic_depth_mode: linear
  stochastic_depth_start_layer: 1
decoder:
  _target_: nemo.collections.asr.modules.MultiSoftmaxDecoder
  feat_in: 64
  num_classes: 64
  num_decoders: 2
  squeeze_single: false
  use_bias: true
loss:
  _target_: nemo.collections.asr.losses.MultiMLMLoss
  combine_time_steps: 8
  mask_threshold: 0.8
  num_decoders: 2
  squeeze_single: false
"""

LABELS = [
    " ",
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "g",
    "h",
    "i",
    "j",
    "k",
    "l",
    "m",
    "n",
    "o",
    "p",
    "q",
    "r",
    "s",
    "t",
    "u",
    "v",
    "w",
    "x",
    "y",
    "z",
    "'",
]

# asr/conf/fastconformer/fast-conformer_ctc_char.yaml: FastConformer CTC on characters, layer-norm conv module.
CTC = f"""
sample_rate: 16000
labels: {LABELS!r}
encoder:
  subsampling: dw_striding
  subsampling_factor: 8
  subsampling_conv_channels: 32
  causal_downsampling: false
  untie_biases: true
  conv_kernel_size: 9
  conv_norm_type: layer_norm
  conv_context_size: null
decoder:
  _target_: nemo.collections.asr.modules.ConvASRDecoder
  feat_in: null
  num_classes: -1
  vocabulary: {LABELS!r}
"""

# fastconformer/fast-conformer_ctc_bpe.yaml: the same encoder with a SentencePiece BPE tokenizer (trained here).
CTC_BPE = """
sample_rate: 16000
tokenizer:
  dir: TOKENIZER_DIR
  type: bpe
encoder:
  subsampling: dw_striding
  subsampling_factor: 8
  subsampling_conv_channels: 32
  causal_downsampling: false
  untie_biases: true
  conv_kernel_size: 9
  conv_norm_type: batch_norm
  conv_context_size: null
decoder:
  _target_: nemo.collections.asr.modules.ConvASRDecoder
  feat_in: null
  num_classes: -1
  vocabulary: null
"""

BPE_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "a wizard's job is to vex chumps quickly in fog",
    "pack my box with five dozen liquor jugs",
    "how vexingly quick daft zebras jump",
    "sphinx of black quartz judge my vow",
] * 20


def model_config(text: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.create(text))
    cfg["preprocessor"] = OmegaConf.to_container(OmegaConf.create(PREPROCESSOR))
    cfg["encoder"] = {**OmegaConf.to_container(OmegaConf.create(ENCODER_COMMON)), **cfg["encoder"]}
    return cfg


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Perturb every trainable parameter and BatchNorm statistic so no weight keeps a constant init value."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("preprocessor.") or "quantizer.codebooks" in name:
                continue  # the mel filterbank/window are fixed; the NEST codebooks are already random unit vectors
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype)
            param.add_(0.05 * noise)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d) and module.running_mean is not None:
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))


def read_audio(paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    audios = [torch.from_numpy(soundfile.read(p, dtype="float32")[0]) for p in paths]
    lengths = torch.tensor([len(a) for a in audios])
    batch = torch.zeros(len(audios), int(lengths.max()))
    for row, audio in enumerate(audios):
        batch[row, : len(audio)] = audio
    return batch, lengths


def encode(model, audio: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    features, feature_lengths = model.preprocessor(input_signal=audio, length=lengths)
    encoded, encoded_lengths = model.encoder(audio_signal=features, length=feature_lengths)
    return {
        "features": features,
        "feature_lengths": feature_lengths,
        "encoded": encoded,
        "encoded_lengths": encoded_lengths,
    }


def make_contrastive(out: Path, audio: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator) -> None:
    from nemo.collections.asr.models import SpeechEncDecSelfSupervisedModel

    model = SpeechEncDecSelfSupervisedModel(cfg=OmegaConf.create(model_config(CONTRASTIVE)))
    randomise(model, generator)
    model.eval()
    ref = encode(model, audio, lengths)
    contrastive = model.decoder_losses["contrastive"]["loss"]
    features = ref["features"].transpose(1, 2)  # (B, T, F), T a multiple of pad_to = 16
    steps = ref["encoded"].shape[-1]
    stacked = features.reshape(features.shape[0], steps, -1)  # frame-major, as ContrastiveLoss.forward
    quantized, _, _, target_ids = contrastive.quantizer(stacked, return_ids=True)
    quantizer = contrastive.quantizer
    code_logits = quantizer.weight_proj(stacked).view(*stacked.shape[:2], quantizer.groups, quantizer.num_vars)
    mlm_decoder = model.decoder_losses["mlm"]["decoder"]
    ref.update(
        gumbel_ids=code_logits.argmax(-1),
        target_ids=target_ids,
        quantized=quantized,
        mlm_logits=mlm_decoder.decoder_layers(ref["encoded"]).transpose(1, 2),
        mlm_log_probs=mlm_decoder(encoder_output=ref["encoded"]),
    )
    save(model, ref, out / "contrastive")


def make_nest(out: Path, audio: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator) -> None:
    from nemo.collections.asr.models import EncDecDenoiseMaskedTokenPredModel

    model = EncDecDenoiseMaskedTokenPredModel(cfg=OmegaConf.create(model_config(NEST)))
    randomise(model, generator)
    model.eval()
    ref = encode(model, audio, lengths)
    log_probs, encoded_len, _, tokens = model(
        input_signal=audio,
        input_signal_length=lengths,
        noisy_input_signal=audio,
        noisy_input_signal_length=lengths,
        apply_mask=False,
    )
    if not torch.equal(encoded_len, ref["encoded_lengths"]):
        raise RuntimeError("NeMo's model forward and encoder disagree on the output lengths")
    ref.update(
        tokens=tokens,
        logits=model.decoder.decoder_layers(ref["encoded"]).transpose(1, 2),
        log_probs=log_probs,
    )
    save(model, ref, out / "nest")


def make_ctc(out: Path, audio: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator) -> None:
    from nemo.collections.asr.models import EncDecCTCModel

    model = EncDecCTCModel(cfg=OmegaConf.create(model_config(CTC)))
    randomise(model, generator)
    model.eval()
    ref = encode(model, audio, lengths)
    ref.update(
        logits=model.decoder.decoder_layers(ref["encoded"]).transpose(1, 2),
        log_probs=model.decoder(encoder_output=ref["encoded"]),
    )
    save(model, ref, out / "ctc")


def make_ctc_bpe(out: Path, audio: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator) -> None:
    import sentencepiece
    from nemo.collections.asr.models import EncDecCTCModelBPE

    with tempfile.TemporaryDirectory() as folder:
        text_file = Path(folder) / "text.txt"
        text_file.write_text("\n".join(BPE_TEXT) + "\n")
        # NeMo's process_asr_text_tokenizer.py settings for a bpe tokenizer: no bos/eos, unk id 0.
        sentencepiece.SentencePieceTrainer.train(
            input=str(text_file),
            model_prefix=f"{folder}/tokenizer",
            vocab_size=48,
            model_type="bpe",
            character_coverage=1.0,
            bos_id=-1,
            eos_id=-1,
            unk_id=0,
            minloglevel=2,
        )
        # NeMo registers a vocab.txt next to the model as an artifact (its tokenizer script writes one too).
        pieces = sentencepiece.SentencePieceProcessor(model_file=f"{folder}/tokenizer.model")
        vocab = [pieces.id_to_piece(i) for i in range(pieces.get_piece_size())]
        (Path(folder) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        cfg = model_config(CTC_BPE)
        cfg["tokenizer"]["dir"] = folder
        model = EncDecCTCModelBPE(cfg=OmegaConf.create(cfg))
        randomise(model, generator)
        model.eval()
        ref = encode(model, audio, lengths)
        ref.update(
            logits=model.decoder.decoder_layers(ref["encoded"]).transpose(1, 2),
            log_probs=model.decoder(encoder_output=ref["encoded"]),
            token_ids=torch.tensor(model.tokenizer.text_to_ids(BPE_SENTENCE)),
            sentence_utf8=torch.tensor(list(BPE_SENTENCE.encode("utf-8"))),  # .pt files hold tensors only
        )
        save(model, ref, out / "ctc_bpe")


def save(model, ref: dict[str, torch.Tensor], stem: Path) -> None:
    model.save_to(str(stem.with_suffix(".nemo")))
    torch.save({k: v.detach().contiguous().clone() for k, v in ref.items()}, stem.with_suffix(".pt"))


MODELS = {"contrastive": make_contrastive, "nest": make_nest, "ctc": make_ctc, "ctc_bpe": make_ctc_bpe}


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(f"usage: {sys.argv[0]} OUT_DIR AUDIO.wav [AUDIO.wav ...]")
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("nemo_logger").setLevel(logging.ERROR)
    torch.manual_seed(0)
    audio, lengths = read_audio(argv[1:])
    names = os.environ.get("NEMO_PARITY_MODELS", ",".join(MODELS)).split(",")
    with torch.no_grad():
        for index, name in enumerate(names):
            MODELS[name](out, audio, lengths, torch.Generator().manual_seed(1000 + index))
            print(f"wrote {out / name}.nemo and {out / name}.pt", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
