"""The model adapter's batching: what a left-padded row sees. Pure: no model."""

from orchestrator.eval.model_adapter import left_pad


def test_left_pad_positions_count_real_tokens_only():
    ids, mask, pos = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
