"""ConformerSslConfig: one config for the Conformer / FastConformer SSL model family.

Hub-bound: this file is copied next to the weights by `save_pretrained`, so it imports nothing beyond
torch, numpy and transformers, and siblings only as flat relative imports.

Field names follow transformers where the concept exists (`hidden_size`, `num_hidden_layers`,
`mask_time_prob`, `conv_depthwise_kernel_size`, ...) and NeMo's names are given in the comments.
"""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

from .frames import HOP_LENGTH
from .objectives import OBJECTIVES, objective_settings

# Closed sets of choices: the allowed values are listed in the error message.
SUBSAMPLING_TYPES = {
    "striding": "Conformer: Conv2d 3x3 stride 2 + ReLU per stage",
    "dw_striding": "FastConformer",
    "feature_projection": "w2v-BERT 2.0: LayerNorm -> Linear over stacked fbank frames, no time reduction",
}
CONV_NORM_TYPES = ("batch_norm", "layer_norm")
MASK_STRATEGIES = ("span", "patch", "block")
MASK_FILLS = ("learned", "frozen", "noise")
CONTRASTIVE_TARGETS = ("quantized", "projected")
RECONSTRUCTION_LOSSES = ("l1", "l2")
CTC_REDUCTIONS = ("mean", "sum")
# How attention sees positions (the modeling file holds one attention class and one position module per entry).
POSITION_EMBEDDINGS_TYPES = {
    "rel_pos": "Transformer-XL relative positions with u/v biases (NeMo / Parakeet parity)",
    "gated_rel_pos": "WavLM: bucketed relative position bias shared by the layers, gated per layer by the input",
    "rotary": "RoPE on queries and keys: no bias, so fused SDPA kernels apply when there is no padding",
    "relative_key": "w2v-BERT 2.0: Shaw et al. distance embeddings per layer, distances clipped at left/right maxima",
}

# Written into every saved config so each Auto class finds its code next to the weights (trust_remote_code),
# whichever head was saved: transformers would otherwise record only the saved head's class.
AUTO_MAP = {
    "AutoConfig": "configuration_conformer_ssl.ConformerSslConfig",
    "AutoFeatureExtractor": "feature_extraction_conformer_ssl.ConformerSslFeatureExtractor",
    "AutoModel": "modeling_conformer_ssl.ConformerSslModel",
    "AutoModelForCTC": "modeling_conformer_ssl.ConformerSslForCTC",
    "AutoModelForAudioClassification": "modeling_conformer_ssl.ConformerSslForSequenceClassification",
    "AutoModelForPreTraining": "modeling_conformer_ssl.ConformerSslForPreTraining",
}


def _check(condition: bool, field: str, value: object, allowed: str) -> None:
    """Raise a ValueError that names the field, the value and what is allowed."""
    if not condition:
        raise ValueError(f"ConformerSslConfig.{field}={value!r} is invalid: expected {allowed}.")


class ConformerSslConfig(PreTrainedConfig):
    r"""
    Configuration of a Conformer (4x `striding` subsampling) or FastConformer (8x `dw_striding`) speech
    encoder, with the heads for CTC, sequence classification and self-supervised pretraining.

    Encoder (NeMo `ConformerEncoder` names in brackets):
        num_mel_bins (`int`, 80): log-mel features per frame [feat_in].
        hidden_size (`int`, 256): model width [d_model].
        num_hidden_layers (`int`, 16): Conformer blocks [n_layers].
        num_attention_heads (`int`, 4): attention heads [n_heads].
        intermediate_size (`int`, 1024): feed-forward width [d_model * ff_expansion_factor].
        hidden_act (`str`, "silu"): activation of the feed-forward and conv modules.
        conv_depthwise_kernel_size (`int`, 31): depthwise conv kernel, odd [conv_kernel_size].
        conv_norm_type (`str`, "batch_norm"): norm after the depthwise conv, "batch_norm" or "layer_norm".
        conv_depthwise_causal (`bool`, False): left-pad the conv module's depthwise conv by kernel - 1 (output step t
            sees steps <= t) while attention stays bidirectional: w2v-BERT 2.0's conv module. `causal` implies it.
        subsampling (`str`, "striding"): "striding" (Conformer), "dw_striding" (FastConformer) or
            "feature_projection" (w2v-BERT 2.0: LayerNorm(num_mel_bins) -> Linear -> hidden_size on each input frame,
            no time reduction). Its input frames are transformers' `SeamlessM4TFeatureExtractor` output: 80 fbank bins
            stacked 2 frames at a time, so num_mel_bins=160, hop_length=320 (20 ms per frame) and
            subsampling_factor=1; the frames the objectives stack and mask are these 20 ms frames.
        subsampling_factor (`int`, 4): time reduction, a power of 2 (4 for Conformer, 8 for FastConformer; 1 with
            "feature_projection", whose extractor already stacked the frames).
        subsampling_conv_channels (`int`, -1): channels of the subsampling convs; -1 means `hidden_size`.
        max_position_embeddings (`int`, 5000): longest sequence (after subsampling) of the rel-pos table
            ("rel_pos" only: the other position types have no table).
        position_embeddings_type (`str`, "rel_pos"): how attention sees positions, one of
            "rel_pos" (Transformer-XL relative positions with u/v biases; NeMo [self_attention_model] and
            Parakeet parity), "gated_rel_pos" (WavLM's gated relative position bias, Chen et al. 2022) or
            "rotary" (RoPE, Su et al. 2021) or "relative_key" (Shaw et al. 2018, w2v-BERT 2.0: every layer learns
            one head-size vector per clipped distance j - i and adds q_i . E_(j-i) / sqrt(d) to the scores). Only
            "rel_pos" models convert to NeMo / Parakeet; only "relative_key" ones to transformers' Wav2Vec2Bert.
        left_max_position_embeddings (`int`, 64), right_max_position_embeddings (`int`, 8): "relative_key" only:
            keys further than this many steps before / after the query share the last distance embedding
            (w2v-BERT 2.0: 64 and 8).
        relative_attention_num_buckets (`int`, 320), relative_attention_max_distance (`int`, 800):
            "gated_rel_pos" only: T5-style buckets of the relative distance, half per direction, exact below a
            quarter of the buckets and log-spaced up to max_distance encoder steps (WavLM: 320 and 800).
        rotary_embedding_base (`float`, 10000.0): "rotary" only: the base of the RoPE frequencies
            (transformers: rope_parameters["rope_theta"]).
        xscaling (`bool`, True): multiply the subsampled input by sqrt(hidden_size).
        attention_bias / convolution_bias (`bool`, True): biases of the linear / conv layers.
        causal (`bool`, False): causal attention mask, left-padded depthwise and subsampling convs
            (needed by the APC and CPC objectives).
        hidden_dropout (`float`, 0.1): dropout on every residual branch [dropout].
        activation_dropout (`float`, 0.1): dropout after the feed-forward activation.
        attention_dropout (`float`, 0.1): dropout on attention probabilities [dropout_att].
        feat_proj_dropout (`float`, 0.1): dropout after subsampling [dropout_pre_encoder].
        dropout_positions (`float`, 0.0): dropout on the relative position embeddings [dropout_emb]
            ("rel_pos" only).
        layerdrop (`float`, 0.0): probability of skipping a whole block in training.
        layer_norm_eps (`float`, 1e-5), initializer_range (`float`, 0.02).

    Adapter after the encoder (transformers' Wav2Vec2Bert names; fine-tuning heads only, not pretraining):
        add_adapter (`bool`, False): stack `num_adapter_layers` adapter layers on the last block. Each pools the time
            axis with strided convs (LayerNorm -> Conv1d(kernel, stride) -> GLU on the residual and on the attention
            input), then self-attention and a feed-forward. `last_hidden_state`, `output_lengths` and
            `attention_mask` are then the adapter's; `hidden_states` stay the blocks'.
        adapter_kernel_size (`int`, 3), adapter_stride (`int`, 2), num_adapter_layers (`int`, 1),
        adapter_act (`str`, "relu"): the adapter's convs and feed-forward activation.
        output_hidden_size (`int` or None, None): adapter width (None = hidden_size; otherwise a Linear + LayerNorm
            projects to it first). The CTC head reads this width.
        use_intermediate_ffn_before_adapter (`bool`, False): a ReLU feed-forward added at half weight to the last
            block's output before the adapter (needs add_adapter).

    CTC head:
        vocab_size (`int` or None), pad_token_id (`int`, 0, the CTC blank), ctc_loss_reduction ("mean" or
        "sum"), ctc_zero_infinity (`bool`), final_dropout (`float`).

    Sequence classification head:
        use_weighted_layer_sum (`bool`), classifier_proj_size (`int`), num_labels (from PreTrainedConfig).

    Self-supervised pretraining (`ConformerSslForPreTraining`):
        objectives (`dict`): objective name -> {"weight": float, "start_step": int, "layer": int, ...}; the
            names and each one's settings and defaults are the entries of `objectives.OBJECTIVES` (contrastive,
            mlm, bestrq, hubert, reconstruction, apc, cpc). `layer` indexes the hidden states (-1 = final
            layer, k = output of block k, 0 = subsampling output). None: BEST-RQ alone (the NEST recipe).
        mask_strategy ("span" | "patch" | "block"), mask_time_prob, mask_time_length (in feature frames),
        mask_time_min_masks, mask_fill ("learned" | "frozen": the same vector, never trained, as NeMo NEST's
        `RandomBlockMasking(freeze=True)` | "noise"), mask_token_threshold (fraction of a token's
        stacked frames that must be masked for the token to count as masked).
        Gumbel quantizer / contrastive: num_codevector_groups, num_codevectors_per_group, codevector_dim,
        proj_codevector_dim, contrastive_target ("quantized" | "projected"), num_negatives,
        contrastive_logits_temperature, diversity_loss_weight.
        BEST-RQ: bestrq_num_codebooks, bestrq_codebook_size, bestrq_codebook_dim, bestrq_normalize_input
            (standardise the stacked frames per utterance before projecting, as BEST-RQ does; NeMo's NEST
            projects them as they are, so converted NEST checkpoints set it to False), bestrq_input_layer_norm
            (LayerNorm without affine over each stacked step before projecting: NeMo NEST's 2026 option).
        EMA-teacher objectives (data2vec, dinosr): their settings are in `objectives[name]` (top_k_layers,
            decoder_*, data2vec's encode_unmasked_only: the MAE-style student of data2vec 2.0, whose blocks skip
            the masked steps, codebook_*); clone_batch (`int`, 1): in training the student sees `clone_batch` copies of
            the batch, each with its own masks, against one teacher pass (data2vec 2.0: 8 for audio).
        HuBERT: hubert_num_labels.  Reconstruction: reconstruction_loss ("l1" | "l2").
        APC: apc_shift.  CPC: cpc_steps, cpc_num_negatives.
    """

    model_type = "conformer_ssl"

    # --- encoder
    num_mel_bins: int = 80
    hidden_size: int = 256
    num_hidden_layers: int = 16
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    hidden_act: str = "silu"
    conv_depthwise_kernel_size: int = 31
    conv_norm_type: str = "batch_norm"
    conv_depthwise_causal: bool = False
    subsampling: str = "striding"
    subsampling_factor: int = 4
    subsampling_conv_channels: int = -1
    max_position_embeddings: int = 5000
    position_embeddings_type: str = "rel_pos"
    relative_attention_num_buckets: int = 320
    relative_attention_max_distance: int = 800
    rotary_embedding_base: float = 10000.0
    left_max_position_embeddings: int = 64
    right_max_position_embeddings: int = 8
    xscaling: bool = True
    attention_bias: bool = True
    convolution_bias: bool = True
    causal: bool = False
    hidden_dropout: float = 0.1
    activation_dropout: float = 0.1
    attention_dropout: float = 0.1
    feat_proj_dropout: float = 0.1
    dropout_positions: float = 0.0
    layerdrop: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # --- adapter (transformers' Wav2Vec2Bert names)
    add_adapter: bool = False
    adapter_kernel_size: int = 3
    adapter_stride: int = 2
    num_adapter_layers: int = 1
    adapter_act: str = "relu"
    output_hidden_size: int | None = None
    use_intermediate_ffn_before_adapter: bool = False
    # --- feature geometry (kept in the model config so the ASR pipeline can chunk: hop x subsampling)
    hop_length: int = HOP_LENGTH
    # --- CTC head
    vocab_size: int | None = None
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    ctc_loss_reduction: str = "mean"
    ctc_zero_infinity: bool = True
    final_dropout: float = 0.1
    # --- sequence classification head
    use_weighted_layer_sum: bool = False
    classifier_proj_size: int = 256
    # --- pretraining: objectives and masking
    objectives: dict | None = None
    mask_strategy: str = "block"
    mask_time_prob: float = 0.01
    mask_time_length: int = 40
    mask_time_min_masks: int = 1
    mask_fill: str = "learned"
    mask_token_threshold: float = 0.8
    clone_batch: int = 1
    # --- pretraining: Gumbel quantizer and contrastive head
    num_codevector_groups: int = 2
    num_codevectors_per_group: int = 300
    codevector_dim: int = 256
    proj_codevector_dim: int = 256
    contrastive_target: str = "quantized"
    num_negatives: int = 100
    contrastive_logits_temperature: float = 0.1
    diversity_loss_weight: float = 0.1
    # --- pretraining: random-projection quantizer (BEST-RQ / NEST)
    bestrq_num_codebooks: int = 1
    bestrq_codebook_size: int = 8192
    bestrq_codebook_dim: int = 16
    bestrq_normalize_input: bool = True
    bestrq_input_layer_norm: bool = False
    # --- pretraining: other objectives
    hubert_num_labels: int = 500
    reconstruction_loss: str = "l1"
    apc_shift: int = 3
    cpc_steps: int = 12
    cpc_num_negatives: int = 10

    def __post_init__(self, **kwargs):
        if self.objectives is not None:
            # Fill each objective's defaults so saved configs are explicit about weight / start step / layer.
            self.objectives = objective_settings(self.objectives)
        super().__post_init__(**kwargs)
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def conv_channels(self) -> int:
        """Channels of the subsampling convs (NeMo: -1 means d_model)."""
        return self.hidden_size if self.subsampling_conv_channels == -1 else self.subsampling_conv_channels

    @property
    def inputs_to_logits_ratio(self) -> int:
        """Input samples per output frame: the ASR pipeline uses it to chunk and place timestamps."""
        pooling = self.adapter_stride**self.num_adapter_layers if self.add_adapter else 1
        return self.hop_length * self.subsampling_factor * pooling

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; each error names the field, the value and the allowed range."""
        positive_ints = (
            "num_mel_bins",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "hop_length",
            "classifier_proj_size",
            "num_codevector_groups",
            "num_codevectors_per_group",
            "codevector_dim",
            "proj_codevector_dim",
            "num_negatives",
            "bestrq_num_codebooks",
            "bestrq_codebook_size",
            "bestrq_codebook_dim",
            "hubert_num_labels",
            "apc_shift",
            "cpc_steps",
            "cpc_num_negatives",
            "mask_time_length",
            "clone_batch",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
            "left_max_position_embeddings",
            "right_max_position_embeddings",
            "adapter_kernel_size",
            "adapter_stride",
            "num_adapter_layers",
        )
        for name in positive_ints:
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value, "an integer >= 1")
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            "hidden_size",
            self.hidden_size,
            f"a multiple of num_attention_heads={self.num_attention_heads}",
        )
        _check(self.hidden_size % 2 == 0, "hidden_size", self.hidden_size, "an even number (sinusoidal positions)")
        k = self.conv_depthwise_kernel_size
        _check(isinstance(k, int) and k >= 1 and k % 2 == 1, "conv_depthwise_kernel_size", k, "an odd integer >= 1")
        _check(
            self.conv_norm_type in CONV_NORM_TYPES, "conv_norm_type", self.conv_norm_type, f"one of {CONV_NORM_TYPES}"
        )
        _check(
            self.subsampling in SUBSAMPLING_TYPES, "subsampling", self.subsampling, f"one of {tuple(SUBSAMPLING_TYPES)}"
        )
        f = self.subsampling_factor
        if self.subsampling == "feature_projection":
            _check(
                f == 1,
                "subsampling_factor",
                f,
                "1 with subsampling='feature_projection' (the model keeps every input frame; its feature extractor "
                "already stacked 2 fbank frames, which hop_length=320 counts)",
            )
        else:
            _check(
                isinstance(f, int) and f >= 2 and (f & (f - 1)) == 0,
                "subsampling_factor",
                f,
                "a power of 2 >= 2 (4 or 8)",
            )
            _check(
                self.num_mel_bins // f >= 1,
                "num_mel_bins",
                self.num_mel_bins,
                f"at least subsampling_factor={f} (the convs also halve the feature axis)",
            )
        c = self.subsampling_conv_channels
        _check(c == -1 or (isinstance(c, int) and c >= 1), "subsampling_conv_channels", c, "-1 (= hidden_size) or >= 1")
        for name in (
            "hidden_dropout",
            "activation_dropout",
            "attention_dropout",
            "feat_proj_dropout",
            "dropout_positions",
            "layerdrop",
            "final_dropout",
        ):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, name, value, "a probability in [0, 1)")
        _check(
            self.position_embeddings_type in POSITION_EMBEDDINGS_TYPES,
            "position_embeddings_type",
            self.position_embeddings_type,
            "one of " + "; ".join(f"{name!r} ({what})" for name, what in POSITION_EMBEDDINGS_TYPES.items()),
        )
        if self.position_embeddings_type != "rel_pos":
            _check(
                self.dropout_positions == 0.0,
                "dropout_positions",
                self.dropout_positions,
                f"0.0 with position_embeddings_type={self.position_embeddings_type!r} (it drops out the rel_pos "
                "sinusoid table, which only 'rel_pos' has)",
            )
        if self.position_embeddings_type == "gated_rel_pos":
            buckets = self.relative_attention_num_buckets
            _check(
                buckets >= 4 and buckets % 2 == 0,
                "relative_attention_num_buckets",
                buckets,
                "an even number >= 4 (half the buckets per direction, half of those for exact distances), e.g. 320",
            )
            exact = buckets // 2 // 2
            _check(
                self.relative_attention_max_distance > exact,
                "relative_attention_max_distance",
                self.relative_attention_max_distance,
                f"more than {exact}, the distances that relative_attention_num_buckets={buckets} keeps exact "
                "(log-spaced buckets span the rest), e.g. 800",
            )
        if self.position_embeddings_type == "rotary":
            _check(
                (self.hidden_size // self.num_attention_heads) % 2 == 0,
                "hidden_size",
                self.hidden_size,
                f"hidden_size / num_attention_heads even with rotary positions (RoPE rotates pairs of channels); "
                f"got head size {self.hidden_size // self.num_attention_heads}",
            )
            _check(
                self.rotary_embedding_base > 1, "rotary_embedding_base", self.rotary_embedding_base, "> 1, e.g. 10000"
            )
        if self.add_adapter:
            width = self.hidden_size if self.output_hidden_size is None else self.output_hidden_size
            _check(
                isinstance(width, int) and width >= 1 and width % self.num_attention_heads == 0,
                "output_hidden_size",
                self.output_hidden_size,
                f"None (= hidden_size) or a multiple of num_attention_heads={self.num_attention_heads} (the adapter's "
                "attention splits it into heads)",
            )
        else:
            _check(
                not self.use_intermediate_ffn_before_adapter,
                "use_intermediate_ffn_before_adapter",
                self.use_intermediate_ffn_before_adapter,
                "False without add_adapter=True (the feed-forward sits before the adapter, as in Wav2Vec2Bert)",
            )
        _check(self.layer_norm_eps > 0, "layer_norm_eps", self.layer_norm_eps, "> 0")
        _check(self.initializer_range > 0, "initializer_range", self.initializer_range, "> 0")
        _check(
            self.ctc_loss_reduction in CTC_REDUCTIONS,
            "ctc_loss_reduction",
            self.ctc_loss_reduction,
            f"one of {CTC_REDUCTIONS}",
        )
        if self.vocab_size is not None:
            _check(self.vocab_size >= 2, "vocab_size", self.vocab_size, "None or >= 2 (blank + one symbol)")
            _check(
                self.pad_token_id is not None and 0 <= self.pad_token_id < self.vocab_size,
                "pad_token_id",
                self.pad_token_id,
                f"the CTC blank id, in [0, vocab_size={self.vocab_size})",
            )
        # --- pretraining
        _check(self.mask_strategy in MASK_STRATEGIES, "mask_strategy", self.mask_strategy, f"one of {MASK_STRATEGIES}")
        _check(0.0 <= self.mask_time_prob <= 1.0, "mask_time_prob", self.mask_time_prob, "a probability in [0, 1]")
        _check(self.mask_time_min_masks >= 0, "mask_time_min_masks", self.mask_time_min_masks, "an integer >= 0")
        _check(self.mask_fill in MASK_FILLS, "mask_fill", self.mask_fill, f"one of {MASK_FILLS}")
        _check(
            0.0 < self.mask_token_threshold <= 1.0,
            "mask_token_threshold",
            self.mask_token_threshold,
            "a fraction in (0, 1]",
        )
        _check(
            self.contrastive_target in CONTRASTIVE_TARGETS,
            "contrastive_target",
            self.contrastive_target,
            f"one of {CONTRASTIVE_TARGETS}",
        )
        _check(
            self.codevector_dim % self.num_codevector_groups == 0,
            "codevector_dim",
            self.codevector_dim,
            f"a multiple of num_codevector_groups={self.num_codevector_groups}",
        )
        _check(
            self.contrastive_logits_temperature > 0,
            "contrastive_logits_temperature",
            self.contrastive_logits_temperature,
            "> 0",
        )
        _check(self.diversity_loss_weight >= 0, "diversity_loss_weight", self.diversity_loss_weight, ">= 0")
        _check(
            self.reconstruction_loss in RECONSTRUCTION_LOSSES,
            "reconstruction_loss",
            self.reconstruction_loss,
            f"one of {RECONSTRUCTION_LOSSES}",
        )
        if self.objectives is not None:
            names = tuple(OBJECTIVES)
            _check(
                isinstance(self.objectives, dict) and len(self.objectives) > 0,
                "objectives",
                self.objectives,
                f"a non-empty dict name -> settings, names from {names}",
            )
            for name, spec in self.objectives.items():
                _check(name in OBJECTIVES, "objectives", name, f"objective names from {names}")
                defaults = OBJECTIVES[name].defaults
                unknown = set(spec) - set(defaults)
                _check(not unknown, f"objectives.{name}", sorted(unknown), f"only the keys {tuple(defaults)}")
                weight = spec["weight"]
                _check(
                    isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0,
                    f"objectives.{name}.weight",
                    weight,
                    "a finite number >= 0",
                )
                _check(
                    isinstance(spec["start_step"], int) and spec["start_step"] >= 0,
                    f"objectives.{name}.start_step",
                    spec["start_step"],
                    "an integer >= 0",
                )
                layer = spec["layer"]
                n = self.num_hidden_layers
                _check(
                    isinstance(layer, int) and -n - 1 <= layer <= n,
                    f"objectives.{name}.layer",
                    layer,
                    f"an index into the {n + 1} hidden states, in [{-n - 1}, {n}]",
                )
            self._validate_teacher_objectives()
            if self.subsampling == "feature_projection":
                _check(
                    "hubert" not in self.objectives,
                    "objectives",
                    sorted(self.objectives),
                    "no 'hubert' with subsampling='feature_projection': its frame_labels count 10 ms frames, the "
                    "model's input frames are 20 ms stacked fbank frames",
                )
            causal_readers = sorted(n for n in self.objectives if OBJECTIVES[n].reads == "clean")
            if causal_readers:
                _check(
                    self.causal, "causal", self.causal, f"True: {causal_readers} predict the future from causal context"
                )

    def _validate_teacher_objectives(self) -> None:
        """The settings of data2vec and dinosr (their own keys in `objectives[name]`)."""
        n = self.num_hidden_layers
        for name in ("data2vec", "dinosr"):
            spec = self.objectives.get(name)
            if spec is None:
                continue
            k = spec["top_k_layers"]
            _check(
                isinstance(k, int) and 1 <= k <= n,
                f"objectives.{name}.top_k_layers",
                k,
                f"an integer in [1, num_hidden_layers={n}] (the teacher blocks averaged or clustered)",
            )
        if "data2vec" in self.objectives:
            spec = self.objectives["data2vec"]
            for key in ("decoder_layers", "decoder_dim", "decoder_groups"):
                value = spec[key]
                _check(isinstance(value, int) and value >= 1, f"objectives.data2vec.{key}", value, "an integer >= 1")
            kernel = spec["decoder_kernel"]
            _check(
                isinstance(kernel, int) and kernel >= 1 and kernel % 2 == 1,
                "objectives.data2vec.decoder_kernel",
                kernel,
                "an odd integer >= 1 (same-length convolution)",
            )
            _check(
                spec["decoder_dim"] % spec["decoder_groups"] == 0,
                "objectives.data2vec.decoder_dim",
                spec["decoder_dim"],
                f"a multiple of decoder_groups={spec['decoder_groups']}",
            )
            mae = spec["encode_unmasked_only"]
            _check(isinstance(mae, bool), "objectives.data2vec.encode_unmasked_only", mae, "true or false")
            if mae:  # the masked steps are never encoded: only data2vec's decoder predicts there
                others = sorted(n for n in self.objectives if n != "data2vec" and OBJECTIVES[n].reads == "masked")
                _check(
                    not others,
                    "objectives",
                    others,
                    "no other masked objective next to data2vec.encode_unmasked_only=true (the student skips the "
                    "masked steps they predict from)",
                )
        if "dinosr" in self.objectives:
            spec = self.objectives["dinosr"]
            size, decay = spec["codebook_size"], spec["codebook_decay"]
            _check(isinstance(size, int) and size >= 2, "objectives.dinosr.codebook_size", size, "an integer >= 2")
            _check(
                isinstance(decay, (int, float)) and 0.0 < decay < 1.0,
                "objectives.dinosr.codebook_decay",
                decay,
                "a number in (0, 1) (DinoSR: 0.9)",
            )


__all__ = ["ConformerSslConfig"]
