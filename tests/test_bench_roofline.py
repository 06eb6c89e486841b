"""bench.roofline: the work a forward pass needs, counted from the model's shape."""

from types import SimpleNamespace

from bench.roofline import forward_flops, linear_params

SMOLLM2_135M = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, head_dim=64)


def test_linear_params_of_the_bundled_shape() -> None:
    layers, head = linear_params(SMOLLM2_135M)
    # q, o: 576x576; k, v: 576x192 (3 key/value heads of 64); gate, up, down: 576x1536; 30 layers.
    assert layers == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) == 106_168_320
    assert head == 576 * 49152
    # With the tied embedding, the whole model is 134.5M parameters (+ norms): the published 135M.
    assert 134e6 < layers + head < 135e6


def test_forward_flops_counts_two_per_multiply_add() -> None:
    layers, head = linear_params(SMOLLM2_135M)
    assert forward_flops(SMOLLM2_135M, 23, 0) == 2 * 23 * layers
    assert forward_flops(SMOLLM2_135M, 10, 4) == 2 * (10 * layers + 4 * head)
    no_head_dim = SimpleNamespace(**{k: v for k, v in vars(SMOLLM2_135M).items() if k != "head_dim"})
    assert linear_params(no_head_dim) == (layers, head)
