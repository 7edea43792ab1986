"""Local parameter names map to canonical (TP1/PP1, global-layer) names for both layer specs."""
from megatron_prune.models.shard import canonical_name


def test_pipeline_stage_layers_get_their_global_index():
    layer_map = {0: 4, 1: 5}  # stage 2 of a pipeline whose stages hold 2 layers each
    assert canonical_name("decoder.layers.1.mlp.linear_fc2.weight", layer_map, tied=False) == \
        "decoder.layers.5.mlp.linear_fc2.weight"


def test_transformer_engine_fused_norms_map_to_the_local_spec_norms():
    layer_map = {0: 0}
    assert canonical_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", layer_map,
                          tied=False) == "decoder.layers.0.input_layernorm.weight"
    assert canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_bias", layer_map,
                          tied=False) == "decoder.layers.0.pre_mlp_layernorm.bias"


def test_last_stage_copy_of_a_tied_embedding_is_the_word_embedding():
    assert canonical_name("output_layer.weight", {}, tied=True) == "embedding.word_embeddings.weight"
    assert canonical_name("output_layer.weight", {}, tied=False) == "output_layer.weight"
