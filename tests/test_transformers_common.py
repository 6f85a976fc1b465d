"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) run against our models.

The mixins come from the transformers sdist of the installed version (they are not in the wheel):
`python scripts/fetch_transformers_tests.py` puts them in `.cache/transformers_tests/` (a CI set-up step).
Without that cache this module fails on purpose: silently skipping would hide that the suite never ran.

Our classes are not in transformers' own `MODEL_*_MAPPING_NAMES`, which the mixin uses to decide what kind
of model a class is (base model: no loss to train; CTC: needs labels; ...). Each test class adds
`conformer_ssl` to those name maps for its own duration only (see `CommonTestsBase.setUpClass`).
"""

from __future__ import annotations

import importlib.metadata
import sys
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers.models.auto import modeling_auto

from hf_ssl_speech import modeling_conformer_ssl as modeling
from hf_ssl_speech.configuration_conformer_ssl import ConformerSslConfig

CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "transformers_tests"
_VERSION_FILE = CACHE_DIR / "transformers_tests" / "VERSION"
_INSTALLED = importlib.metadata.version("transformers")
if not _VERSION_FILE.is_file():
    pytest.fail(
        f"transformers' common model tests are missing from {CACHE_DIR}: run "
        "`python scripts/fetch_transformers_tests.py` once (downloads the transformers sdist from PyPI).",
        pytrace=False,
    )
if _VERSION_FILE.read_text().strip() != _INSTALLED:
    pytest.fail(
        f"{CACHE_DIR} holds the tests of transformers {_VERSION_FILE.read_text().strip()} but {_INSTALLED} is "
        "installed: run `python scripts/fetch_transformers_tests.py` again.",
        pytrace=False,
    )
sys.path.insert(0, str(CACHE_DIR))

from transformers_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_tests.test_modeling_common import ModelTesterMixin, floats_tensor  # noqa: E402

# Which transformers name map each of our classes belongs in (so the mixin treats it as that kind of model).
# Every class must exist: a renamed class fails here instead of silently leaving the common suite.
CLASS_KINDS = {
    "ConformerSslModel": "MODEL_MAPPING_NAMES",
    "ConformerSslForCTC": "MODEL_FOR_CTC_MAPPING_NAMES",
    "ConformerSslForSequenceClassification": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "ConformerSslForPreTraining": "MODEL_FOR_PRETRAINING_MAPPING_NAMES",
}
_MISSING = [name for name in CLASS_KINDS if not hasattr(modeling, name)]
if _MISSING:
    pytest.fail(
        f"modeling_conformer_ssl.py has no {', '.join(_MISSING)}: the common suite would not cover them; "
        "restore the classes or update CLASS_KINDS",
        pytrace=False,
    )
MODEL_CLASSES = tuple(getattr(modeling, name) for name in CLASS_KINDS)


def skip_mixin_tests(reason: str, *prefixes: str):
    """Class decorator: skip every mixin test whose name starts with one of `prefixes`, with `reason`
    (parameterized mixin tests exist only under generated names such as `..._inference_00_fp16_pad_left`)."""

    def decorate(cls):
        for name in dir(ModelTesterMixin):
            if name.startswith(prefixes):

                @unittest.skip(reason)
                def skipped(self):
                    pass

                setattr(cls, name, skipped)
        return cls

    return decorate


COVERED_BY_STRIDING = (
    "covered by ConformerSslStridingModelTest: attention dispatch and dtype loading do not depend on the "
    "subsampling or the objectives (keeps this file fast on 2 cores)"
)


class ConformerSslModelTester:
    """Tiny configs and inputs for the mixin: 2 layers, hidden 32, 4 heads, kernel 3, 16 mel bins."""

    def __init__(
        self,
        parent: unittest.TestCase,
        subsampling: str = "striding",
        batch_size: int = 3,
        num_frames: int = 40,
        num_mel_bins: int = 16,
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 64,
        conv_depthwise_kernel_size: int = 3,
        vocab_size: int = 12,
        num_labels: int = 3,
        is_training: bool = True,
        config_overrides: dict | None = None,
    ):
        self.parent = parent
        self.config_overrides = dict(config_overrides or {})
        self.subsampling = subsampling
        self.subsampling_factor = {"striding": 4, "dw_striding": 8, "feature_projection": 1}[subsampling]
        self.batch_size = batch_size
        self.num_frames = num_frames
        self.num_mel_bins = num_mel_bins
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.conv_depthwise_kernel_size = conv_depthwise_kernel_size
        self.vocab_size = vocab_size
        self.num_labels = num_labels
        self.is_training = is_training
        # The mixin reads seq_length / encoder_seq_length / key_length as the length of hidden states and
        # attention maps, i.e. encoder steps after subsampling: ceil(L / 2) per stride-2 stage.
        steps = num_frames
        for _ in range(self.subsampling_factor.bit_length() - 1):
            steps = (steps + 1) // 2
        self.seq_length = self.encoder_seq_length = self.key_length = steps
        # Real frames per utterance: one full row, two padded ones (padding must not change anything).
        self.frame_lengths = [num_frames, num_frames - 7, num_frames - 13][:batch_size]

    def get_config(self) -> ConformerSslConfig:
        settings = dict(
            num_mel_bins=self.num_mel_bins,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            conv_depthwise_kernel_size=self.conv_depthwise_kernel_size,
            subsampling=self.subsampling,
            subsampling_factor=self.subsampling_factor,
            max_position_embeddings=64,
            vocab_size=self.vocab_size,
            pad_token_id=0,
            num_labels=self.num_labels,
            classifier_proj_size=8,
            # Pretraining (used once ConformerSslForPreTraining exists): objectives that need no external labels,
            # short masks for 40-frame inputs, small codebooks.
            objectives={"bestrq": {}, "reconstruction": {}},
            mask_time_length=4,
            mask_time_prob=0.2,
            bestrq_codebook_size=16,
            bestrq_codebook_dim=4,
            num_negatives=4,
            num_codevectors_per_group=4,
            codevector_dim=8,
            proj_codevector_dim=8,
            cpc_steps=2,
            cpc_num_negatives=2,
        )
        return ConformerSslConfig(**{**settings, **self.config_overrides})

    def prepare_config_and_inputs(self) -> tuple[ConformerSslConfig, torch.Tensor, torch.Tensor]:
        input_features = floats_tensor([self.batch_size, self.num_frames, self.num_mel_bins], scale=2.0) - 1.0
        attention_mask = torch.zeros(self.batch_size, self.num_frames, dtype=torch.long)
        for row, length in enumerate(self.frame_lengths):
            attention_mask[row, :length] = 1
        input_features = input_features * attention_mask[..., None]  # the extractor zeroes padded frames
        return self.get_config(), input_features, attention_mask

    def prepare_config_and_inputs_for_common(self) -> tuple[ConformerSslConfig, dict]:
        config, input_features, attention_mask = self.prepare_config_and_inputs()
        return config, {"input_features": input_features, "attention_mask": attention_mask}

    def ctc_labels(self) -> torch.Tensor:
        """Transcripts short enough for CTC on every utterance (ids 1.., blank 0 never a target), -100 padded."""
        generator = torch.Generator().manual_seed(0)
        max_len = max(1, self.seq_length // 3)
        labels = torch.full((self.batch_size, max_len), -100, dtype=torch.long)
        for row in range(self.batch_size):
            length = max_len - row % 2
            labels[row, :length] = torch.randint(1, self.vocab_size, (length,), generator=generator)
        return labels

    def create_and_check_model(self, config: ConformerSslConfig, input_features, attention_mask) -> None:
        model = modeling.ConformerSslModel(config).eval()
        with torch.no_grad():
            out = model(input_features, attention_mask=attention_mask)
        self.parent.assertEqual(
            tuple(out.last_hidden_state.shape), (self.batch_size, self.seq_length, self.hidden_size)
        )

    def create_and_check_ctc_loss(self, config: ConformerSslConfig, input_features, attention_mask) -> None:
        model = modeling.ConformerSslForCTC(config).eval()
        labels = self.ctc_labels()
        with torch.no_grad():
            out = model(input_features, attention_mask=attention_mask, labels=labels)
        self.parent.assertEqual(tuple(out.logits.shape), (self.batch_size, self.seq_length, self.vocab_size))
        self.parent.assertTrue(torch.isfinite(out.loss) and out.loss > 0)


class CommonTestsBase(ModelTesterMixin):
    """The mixin plus our tester; subclasses pick the subsampling and config. Skips below carry their reason."""

    subsampling = "striding"
    config_overrides: dict = {}
    all_model_classes = MODEL_CLASSES
    pipeline_model_mapping = {}
    is_encoder_decoder = False
    has_attentions = True
    test_resize_embeddings = False  # no token embeddings: the input is log-mel features
    test_mismatched_shapes = True
    test_missing_keys = True
    test_torch_exportable = False  # not claimed (the export mixin is a stub in the fetched tests)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._name_map_patches = [
            mock.patch.dict(getattr(modeling_auto, mapping), {"conformer_ssl": name})
            for name, mapping in CLASS_KINDS.items()
            if hasattr(modeling, name)
        ]
        for patch in cls._name_map_patches:
            patch.start()

    @classmethod
    def tearDownClass(cls):
        for patch in reversed(cls._name_map_patches):
            patch.stop()
        super().tearDownClass()

    def setUp(self):
        self.model_tester = ConformerSslModelTester(
            self, subsampling=self.subsampling, config_overrides=self.config_overrides
        )
        self.config_tester = ConfigTester(
            self, config_class=ConformerSslConfig, has_text_modality=False, hidden_size=36, num_attention_heads=4
        )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class.__name__ == "ConformerSslForCTC":
            # The mixin's CTC labels are all zeros (= our blank) over every step: not a valid CTC target.
            inputs_dict["labels"] = self.model_tester.ctc_labels().to(inputs_dict["input_features"].device)
        return inputs_dict

    # ------------------------------------------------------------------ skipped mixin tests (reasons)
    @unittest.skip("log-mel input: there is no token embedding table (nn.Embedding) to get or replace")
    def test_model_get_set_embeddings(self):
        pass

    # ------------------------------------------------------------------ our own checks
    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_ctc_loss(self):
        self.model_tester.create_and_check_ctc_loss(*self.model_tester.prepare_config_and_inputs())

    def test_padding_is_invisible(self):
        """An utterance gives the same outputs alone (no mask) as padded inside a batch (with its mask)."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            if model_class.__name__ == "ConformerSslForPreTraining":
                continue  # its output is a batch loss over masks drawn for the whole batch
            torch.manual_seed(0)
            model = model_class(config).eval()  # eval: BatchNorm uses running statistics, no dropout
            with torch.no_grad():
                batched = model(**inputs)[0]
                for row, frames in enumerate(self.model_tester.frame_lengths):
                    alone = model(input_features=inputs["input_features"][row : row + 1, :frames])[0]
                    if alone.ndim == 3:  # per-step outputs: compare the valid steps only
                        steps = model._get_feat_extract_output_lengths(frames)
                        self.assertEqual(alone.shape[1], steps)
                        got = batched[row : row + 1, :steps]
                    else:  # utterance-level outputs (classification logits)
                        got = batched[row : row + 1]
                    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5, msg=f"{model_class.__name__} {row=}")


class ConformerSslStridingModelTest(CommonTestsBase, unittest.TestCase):
    """Conformer: 4x `striding`, BatchNorm conv module, BEST-RQ + reconstruction pretraining."""

    subsampling = "striding"


@skip_mixin_tests(COVERED_BY_STRIDING, "test_eager_matches_sdpa_inference_", "test_bc_torch_dtype")
class ConformerSslDwStridingModelTest(CommonTestsBase, unittest.TestCase):
    """FastConformer: 8x `dw_striding`, here with the LayerNorm conv module to cover both norms."""

    subsampling = "dw_striding"
    config_overrides = {"conv_norm_type": "layer_norm"}


@skip_mixin_tests(COVERED_BY_STRIDING, "test_bc_torch_dtype")
class ConformerSslCausalModelTest(CommonTestsBase, unittest.TestCase):
    """Causal encoder (causal attention, left-padded convs) with the APC + CPC objectives."""

    config_overrides = {"causal": True, "objectives": {"apc": {}, "cpc": {}}}


@skip_mixin_tests(COVERED_BY_STRIDING, "test_eager_matches_sdpa_inference_", "test_bc_torch_dtype")
class ConformerSslGumbelPreTrainingTest(CommonTestsBase, unittest.TestCase):
    """wav2vec 2.0-style pretraining: Gumbel quantizer, contrastive + MLM objectives (pretraining head only)."""

    all_model_classes = tuple(cls for cls in MODEL_CLASSES if cls.__name__ == "ConformerSslForPreTraining")
    config_overrides = {"objectives": {"contrastive": {}, "mlm": {}}}

    @unittest.skip("no CTC head in this class (covered by the other classes)")
    def test_ctc_loss(self):
        pass

    @unittest.skip("no base model in this class (covered by the other classes)")
    def test_model(self):
        pass


@skip_mixin_tests(COVERED_BY_STRIDING, "test_bc_torch_dtype")
class ConformerSslGatedRelPosModelTest(CommonTestsBase, unittest.TestCase):
    """WavLM's gated relative position bias (position_embeddings_type="gated_rel_pos"); eager vs SDPA kept."""

    config_overrides = {"position_embeddings_type": "gated_rel_pos"}


@skip_mixin_tests(COVERED_BY_STRIDING, "test_bc_torch_dtype")
class ConformerSslRotaryModelTest(CommonTestsBase, unittest.TestCase):
    """Rotary positions (position_embeddings_type="rotary"): no bias, SDPA without attn_mask when unpadded."""

    config_overrides = {"position_embeddings_type": "rotary"}


@skip_mixin_tests(COVERED_BY_STRIDING, "test_bc_torch_dtype")
class ConformerSslW2vBertModelTest(CommonTestsBase, unittest.TestCase):
    """w2v-BERT 2.0's options: feature projection of stacked frames, relative_key attention, LayerNorm causal conv."""

    subsampling = "feature_projection"
    config_overrides = {
        "subsampling_factor": 1,
        "hop_length": 320,
        "position_embeddings_type": "relative_key",
        "left_max_position_embeddings": 8,
        "right_max_position_embeddings": 4,
        "conv_norm_type": "layer_norm",
        "conv_depthwise_causal": True,
        "convolution_bias": False,
        "xscaling": False,
    }
