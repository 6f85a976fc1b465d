"""NeMo's first NEST training step on a given batch: the loss, the mask NeMo drew, and the gradient norm.

Run with a NeMo interpreter (never the project's venv), on a NEST .nemo written by make_models.py:

    $NEMO_PYTHON tests/nemo_parity/nest_step.py nest.nemo OUT.pt clean_a.wav clean_b.wav -- noisy_a.wav noisy_b.wav

`EncDecDenoiseMaskedTokenPredModel.restore_from(nest.nemo)` in train mode runs what its `training_step` runs:
`forward(input_signal=clean, noisy_input_signal=noisy, apply_mask=True)` (clean features -> random-projection
tokens; noisy features -> `RandomBlockMasking` -> encoder -> MultiSoftmax decoder), then `MultiMLMLoss`, then
backward. Only what cannot be shared with another process is switched off: dither (`preprocessor.featurizer.dither
= 0`) and dropout (every `nn.Dropout` at p = 0; NEST's stochastic depth is 0 already). The noisy audio is given (in
NeMo the data layer mixes it), and the block mask comes from `torch.manual_seed(seed)`, the first seed from 0 whose
mask covers at least one encoder step of every utterance. BatchNorm runs in training mode (batch statistics).

Writes a dict of plain tensors: loss (), frame_mask (B, T) bool over NeMo's padded frames, features (B, T, F) and
noisy_features, feature_lengths (B,), tokens (B, T', books), grad_norm () over the parameters with a gradient
(encoder and decoder; NeMo freezes the quantizer and the mask embedding), seed ().
"""

from __future__ import annotations

import logging
import sys

import soundfile
import torch


def read(paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    audios = [torch.from_numpy(soundfile.read(p, dtype="float32")[0]) for p in paths]
    lengths = torch.tensor([len(a) for a in audios])
    batch = torch.zeros(len(audios), int(lengths.max()))
    for row, audio in enumerate(audios):
        batch[row, : len(audio)] = audio
    return batch, lengths


def main(argv: list[str]) -> None:
    from nemo.collections.asr.models import EncDecDenoiseMaskedTokenPredModel

    logging.getLogger("nemo_logger").setLevel(logging.ERROR)
    nemo_file, out, rest = argv[0], argv[1], argv[2:]
    split = rest.index("--")
    clean, clean_lengths = read(rest[:split])
    noisy, noisy_lengths = read(rest[split + 1 :])
    model = EncDecDenoiseMaskedTokenPredModel.restore_from(nemo_file, map_location="cpu")
    model.train()
    model.preprocessor.featurizer.dither = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    factor = model.cfg.loss.combine_time_steps
    for seed in range(100):
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        log_probs, encoded_len, masks, tokens = model.forward(
            input_signal=clean,
            input_signal_length=clean_lengths,
            noisy_input_signal=noisy,
            noisy_input_signal_length=noisy_lengths,
            apply_mask=True,
        )
        steps = masks.transpose(1, 2).reshape(masks.shape[0], masks.shape[2] // factor, -1).mean(-1) > 0.8
        if bool(steps.any(-1).all()):
            break
    else:
        raise RuntimeError("no seed below 100 masks every utterance: use longer audio")
    loss = model.loss(masks=masks, decoder_outputs=log_probs, targets=tokens, decoder_lengths=encoded_len)
    loss.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        features, feature_lengths = model.preprocessor(input_signal=clean, length=clean_lengths)
        noisy_features, _ = model.preprocessor(input_signal=noisy, length=noisy_lengths)
    results = {
        "loss": loss.detach(),
        "frame_mask": masks[:, 0, :].bool(),
        "features": features.transpose(1, 2).contiguous(),
        "noisy_features": noisy_features.transpose(1, 2).contiguous(),
        "feature_lengths": feature_lengths,
        "tokens": tokens,
        "masked_steps": steps.sum(),
        "grad_norm": torch.cat(grads).norm(),
        "seed": torch.tensor(seed),
    }
    # Plain tensors (NeMo's outputs carry their neural types, which a weights_only load refuses).
    torch.save({k: v.detach().contiguous().clone() for k, v in results.items()}, out)
    print(f"loss {float(loss):.8f} grad_norm {float(torch.cat(grads).norm()):.8f} seed {seed}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
