"""Time one NeMo 3.0 pretraining step; run with the NeMo environment's python (benchmarks/README.md).

Called by benchmarks/bench_pretrain.py, one process per recipe, which reads the `RESULT {json}` line:

    /work/nemo_env/venv/bin/python benchmarks/nemo_pretrain_runner.py --recipe contrastive+mlm --layers 8

Recipes (YAMLs in benchmarks/nemo_configs/, NeMo's own recipes scaled to the benchmark size):
  contrastive       SpeechEncDecSelfSupervisedModel, conformer_ssl.yaml without its MLM loss
  contrastive+mlm   the same with the recipe's MLM loss (ConvASRDecoder over 300^2 classes, loss_alpha 1000)
  nest              EncDecDenoiseMaskedTokenPredModel, nest_fast-conformer.yaml (BEST-RQ + denoising)

The model is built in-process from the OmegaConf config with random weights and no datasets. The step does what
the model's `training_step` does with a batch (forward from raw audio, which includes NeMo's featurisation, then
the loss), and then what Lightning does around it: backward, gradient clipping at 1.0, AdamW step, zero_grad.
The batch is synthetic speech (8 x 160000 samples, all full length); for NEST the noisy copy that NeMo's data
loader would mix (MultiSpeakerNoiseAugmentation) is prepared once, outside the timed step. `finish` (from
bench_pretrain.py) also counts one step's FLOPs with torch's FlopCounterMode here, in the NeMo environment, and
measures the matmul peak in this process, for the FLOP-utilisation column.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_pretrain import SAMPLE_RATE, autocast, finish, synthetic_speech  # noqa: E402  (numpy + stdlib only)

CONFIGS = {
    "contrastive": HERE / "nemo_configs" / "conformer_ssl.yaml",
    "contrastive+mlm": HERE / "nemo_configs" / "conformer_ssl.yaml",
    "nest": HERE / "nemo_configs" / "nest_fast-conformer.yaml",
}


def load_config(recipe: str, args: argparse.Namespace):
    """The recipe's model config with the benchmark's encoder size."""
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.load(CONFIGS[recipe])
    with open_dict(cfg):
        cfg.encoder.d_model = args.hidden
        cfg.encoder.n_heads = args.heads
        cfg.encoder.n_layers = args.layers
        cfg.encoder.ff_expansion_factor = args.ffn // args.hidden
        cfg.encoder.conv_kernel_size = args.fast_kernel if recipe == "nest" else args.kernel
        if recipe == "contrastive":
            del cfg.loss_list.mlm
    if args.ffn % args.hidden:
        raise SystemExit(f"--ffn {args.ffn} must be a multiple of --hidden {args.hidden} (NeMo: ff_expansion_factor)")
    return cfg


def build_ssl_step(cfg, waves, lengths, optimizer_factory, precision):
    """SpeechEncDecSelfSupervisedModel: forward (preprocessor, patch masking, encoder), decoder_loss_step."""
    import torch
    from nemo.collections.asr.models.ssl_models import SpeechEncDecSelfSupervisedModel

    model = SpeechEncDecSelfSupervisedModel(cfg=cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_factory(params)

    def step(i: int) -> float:
        # training_step, without the Lightning trainer: global_step is i. bf16: Lightning's "bf16-mixed" autocast.
        with autocast(precision):
            spectrograms, spec_masks, encoded, encoded_len = model.forward(
                input_signal=waves, input_signal_length=lengths
            )
            for name, decoder_loss in model.decoder_losses.items():
                model.decoder_losses_active[name] = i >= model.start_step[name]
                if hasattr(decoder_loss["loss"], "set_num_updates"):
                    decoder_loss["loss"].set_num_updates(i)
            loss, _ = model.decoder_loss_step(spectrograms, spec_masks, encoded, encoded_len, None, None)
            if model.feat_pen:
                loss = loss + model.feat_pen
        model.reset_registry()
        # What Lightning does with the returned loss (gradient_clip_val 1.0 in the recipe).
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def build_nest_step(cfg, waves, lengths, optimizer_factory, precision):
    """EncDecDenoiseMaskedTokenPredModel: forward (preprocessor on clean and noisy audio, random-projection
    targets from the clean features, block masking of the noisy ones, encoder, decoder) and the MultiMLM loss."""
    import torch
    from nemo.collections.asr.models.ssl_models import EncDecDenoiseMaskedTokenPredModel

    model = EncDecDenoiseMaskedTokenPredModel(cfg=cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_factory(params)
    noise, noisy = denoising_batch(waves, lengths)

    def step(i: int) -> float:
        with autocast(precision):  # bf16: Lightning's "bf16-mixed" autocast around training_step
            log_probs, encoded_len, masks, tokens = model.forward(
                input_signal=waves,
                input_signal_length=lengths,
                noise_signal=noise,
                noise_signal_length=lengths,
                noisy_input_signal=noisy,
                noisy_input_signal_length=lengths,
                apply_mask=True,
            )
            loss = model.loss(masks=masks, decoder_outputs=log_probs, targets=tokens, decoder_lengths=encoded_len)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def denoising_batch(waves, lengths):
    """The NEST data loader's mix, made once: half the utterances get noise (-5..20 dB) or another utterance of
    the batch (-5..5 dB) over half their length (the recipe's mix rate 0.5)."""
    import torch

    rng = np.random.default_rng(1)
    clean = waves.numpy()
    noise = np.zeros_like(clean)
    batch, num_samples = clean.shape
    for b in range(batch):
        if rng.random() >= 0.5:
            continue
        start = int(rng.integers(0, num_samples // 2 + 1))
        span = slice(start, start + num_samples // 2)
        if rng.random() < 0.5:
            source, snr_db = rng.standard_normal(num_samples).astype(np.float32), rng.uniform(-5, 20)
        else:
            source, snr_db = clean[(b + 1) % batch], rng.uniform(-5, 5)
        scale = np.sqrt(np.mean(clean[b] ** 2) / (np.mean(source[span] ** 2) + 1e-9) / 10 ** (snr_db / 10))
        noise[b, span] = scale * source[span]
    return torch.from_numpy(noise), torch.from_numpy(clean + noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=tuple(CONFIGS), required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--kernel", type=int, default=31)
    parser.add_argument("--fast_kernel", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", type=int, default=0)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()

    import torch

    logging.disable(logging.WARNING)  # NeMo's config echo and Lightning chatter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    num_samples = int(args.seconds * SAMPLE_RATE)
    waves = torch.from_numpy(synthetic_speech(args.batch, num_samples))
    lengths = torch.full((args.batch,), num_samples, dtype=torch.long)

    def optimizer_factory(params):  # the same AdamW as every other system of the benchmark
        return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=1e-3)

    cfg = load_config(args.recipe, args)
    build = build_nest_step if args.recipe == "nest" else build_ssl_step
    model, step = build(cfg, waves, lengths, optimizer_factory, args.precision)
    encoder = "fastconformer" if args.recipe == "nest" else "conformer"
    objective = "bestrq (NEST)" if args.recipe == "nest" else args.recipe
    params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    finish({"objective": objective, "encoder": f"{encoder} (NeMo)", "params_m": params_m}, step, args)


if __name__ == "__main__":
    main()
