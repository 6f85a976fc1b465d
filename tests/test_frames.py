"""One place for the frame geometry: every part counts encoder steps with `frames.output_lengths`."""

from __future__ import annotations

import pytest
import torch

from hf_ssl_speech.frames import FRAME_SECONDS, HOP_LENGTH, SAMPLING_RATE, hop_for, num_frames, output_lengths
from hf_ssl_speech.modeling_conformer_ssl import ConformerSslModel, ConformerSslSubsampling
from hf_ssl_speech.targets import stack_frames


def test_output_lengths_equal_repeated_stride_two_halving():
    lengths = torch.arange(0, 3001)
    for factor, stages in ((2, 1), (4, 2), (8, 3)):
        expected = lengths.clone()
        for _ in range(stages):
            expected = torch.div(expected + 1, 2, rounding_mode="floor")  # ceil(L / 2): conv k3 s2 p1
        assert torch.equal(output_lengths(lengths, factor), expected)
        assert [output_lengths(int(n), factor) for n in lengths[:200]] == expected[:200].tolist()


@pytest.mark.parametrize("subsampling,factor", [("striding", 4), ("dw_striding", 8), ("dw_striding", 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_the_real_subsampling_convs_give_output_lengths(tiny_config, subsampling, factor, causal):
    """The arithmetic matches what the convolutions actually produce, padded or not, causal or not."""
    config = tiny_config(subsampling=subsampling, subsampling_factor=factor, causal=causal)
    front = ConformerSslSubsampling(config).eval()
    for frames in (1, 2, 3, 7, 8, 9, 31, 64, 65):
        features = torch.randn(2, frames, config.num_mel_bins)
        lengths = torch.tensor([frames, max(1, frames - 3)])
        hidden, out = front(features, lengths)
        assert hidden.shape[1] == output_lengths(frames, factor)
        assert torch.equal(out, output_lengths(lengths, factor))


def test_model_targets_and_helper_agree(tiny_config):
    config = tiny_config()
    model = ConformerSslModel(config).eval()
    lengths = torch.tensor([50, 37, 3])
    features = torch.randn(3, 50, config.num_mel_bins)
    mask = (torch.arange(50)[None, :] < lengths[:, None]).long()
    encoded = model(features, attention_mask=mask)
    _, token_lengths = stack_frames(features, lengths, config.subsampling_factor)
    assert torch.equal(encoded.output_lengths, token_lengths)
    assert torch.equal(model._get_feat_extract_output_lengths(lengths), token_lengths)
    assert encoded.last_hidden_state.shape[1] == output_lengths(50, config.subsampling_factor)


def test_hop_and_frames():
    assert HOP_LENGTH == hop_for(SAMPLING_RATE) == 160
    assert FRAME_SECONDS == pytest.approx(0.01)
    assert hop_for(8000) == 80
    assert num_frames(16000) == 100 and num_frames(159) == 0
    assert torch.equal(num_frames(torch.tensor([320, 479])), torch.tensor([2, 2]))
